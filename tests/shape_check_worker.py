"""Decodes with every method while jaxtyping + beartype check every annotated signature.

Llama-style models decode (greedy and sampled share one program per method); the Mistral-style
model with ring caches is traced only (`jax.eval_shape`: every annotated call is checked when it
is traced, nothing is compiled; tests/test_ring_cache.py runs its programs).

Run by tests/test_shape_contract.py in a fresh process, because the import hook must be in place
before `jax_specens` is first imported. Prints one JSON line: the tokens of each run, and whether
the negative control (a call with a wrong shape) was refused.
"""

import dataclasses
import functools
import json

from jaxtyping import install_import_hook

with install_import_hook("jax_specens", "beartype.beartype"):
  from jax_specens import acceptance
  from jax_specens.decoding.api import decode
  from jax_specens.models.config import ModelConfig
  from jax_specens.models.model import create_model

import jax
import jax.numpy as jnp
import numpy as np

LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=128)
# sliding-window layers (ring caches) next to a global one
MISTRAL = dataclasses.replace(LLAMA, family="mistral", num_layers=3, sliding_window=4,
                              layer_types=("sliding", "full", "sliding"))
RUNS = [("ar", 1, False), ("sd", 1, True), ("ensemble", 2, False), ("se", 2, False),
        ("cosd", 1, True)]


def main():
  prompts = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], np.int32)
  lengths = np.array([5, 3], np.int32)
  out = {}
  for name, cfg in (("llama", LLAMA), ("mistral", MISTRAL)):
    # scaled weights: varied greedy tokens rather than one repeated id
    a, b = (jax.tree_util.tree_map(lambda x: 3 * x, create_model(cfg, s)) for s in (0, 1))
    for method, members, with_draft in RUNS:
      for temperature in (0.0, 1.0) if name == "llama" else (0.0,):
        kw = dict(draft=b, gamma=3) if with_draft else {}
        if method == "se":
          kw = dict(gamma=3)
        models = [a, b] if members == 2 else a
        run = functools.partial(decode, prompts=prompts, prompt_lengths=lengths, method=method,
                                max_new_tokens=10, temperature=temperature, **kw)
        if name == "llama":
          out[f"{name} {method} {temperature}"] = run(models).to_lists()
        else:  # traced (the models as tracers, as inside a user's jit): shapes, no compile
          out[f"{name} {method} {temperature}"] = jax.eval_shape(lambda m: run(m).tokens, models).shape
  try:
    acceptance.gather_token(jnp.zeros((2, 3, 4)), jnp.zeros((2, 5), jnp.int32))
    refused = False
  except Exception as e:  # jaxtyping's TypeCheckError
    refused = "tokens" in str(e)
  print(json.dumps({"runs": out, "control_refused": refused}))


if __name__ == "__main__":
  main()
