"""One process of the 2-process test in test_parallel_multihost.py (not collected by pytest).

    python tests/multihost_worker.py RANK PORT MODEL_DIR OUT_JSON

Each process has 2 CPU devices; together they form a data=2 x model=2 mesh. The process restores
only its shards of the checkpoint, feeds its half of the batch, runs a prefill and a greedy decode
of the whole batch, and checks the gathered results against the same on its own single device.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_specens import checkpoint, forward_prompt, init_cache  # noqa: E402
from jax_specens import parallel as par  # noqa: E402
from jax_specens.decoding.api import decode  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def last_logits(model, tokens, lengths):
  cache = par.constrain_cache(init_cache(model.config, tokens.shape[0], 16), model.config)
  return forward_prompt(model, cache, tokens, lengths)[0]


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def greedy(model, tokens, lengths):
  return decode(model, tokens, lengths, method="ar", max_new_tokens=5, temperature=0.0).tokens


def main(rank: int, port: int, model_dir: str, out: str) -> None:
  par.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
  mesh = par.make_mesh(data=2, model=2)
  rng = np.random.default_rng(0)  # the same global batch on both processes
  tokens = rng.integers(0, 64, (4, 6)).astype(np.int32)
  lengths = np.array([6, 2, 5, 3], np.int32)
  rows = slice(2 * rank, 2 * rank + 2)

  model = par.load_model(model_dir, mesh=mesh)
  q = model.params["layers"][0]["attn"]["q"]["kernel"][...]
  g_tokens = par.global_batch(tokens[rows], mesh)
  g_lengths = par.global_batch(lengths[rows], mesh)
  with jax.set_mesh(mesh):
    got = par.to_host(jax.jit(last_logits)(model, g_tokens, g_lengths))
  # greedy decoding of the whole batch; par.decode gathers the output onto every process
  result = par.decode(model, g_tokens, g_lengths, mesh=mesh, method="ar", max_new_tokens=5,
                   temperature=0.0)
  decoded = result.tokens

  local = checkpoint.load_model(model_dir)  # whole model on this process's first device
  want = np.asarray(jax.jit(last_logits)(local, jnp.asarray(tokens), jnp.asarray(lengths)))
  want_decoded = greedy(local, jnp.asarray(tokens), jnp.asarray(lengths))
  json.dump({
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
      "q_fully_addressable": q.is_fully_addressable,
      "q_local_shards": [list(s.data.shape) for s in q.addressable_shards],
      "tokens_local_shards": [list(s.data.shape) for s in g_tokens.addressable_shards],
      "max_abs_diff": float(np.abs(got - want).max()),
      "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all()),
      "decoded_is_numpy": isinstance(decoded, np.ndarray), "decoded": decoded.tolist(),
      "want_decoded": np.asarray(want_decoded).tolist(),
  }, open(out, "w"))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
