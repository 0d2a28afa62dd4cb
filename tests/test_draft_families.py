"""A distilled draft's starting point is exact for every family: a draft made of some of the
target's layers (`draft.init_from_target`) computes what the target's own PyTorch model computes
with only those layers, on its K ids, and -inf elsewhere.

This pins what `draft_config` carries over per layer (sliding or global window, local or global
RoPE, Gemma's soft-capping and embedding scale, Qwen2's `max_window_layers`, GPT-2's learned
positions): a draft of Gemma 3's layers 0 and 2 is one local and one global layer, as in the
target. The reference is the tiny random Hugging Face model of `tests/fixtures_models.py` with its
decoder layer list cut to the same layers (each HF layer keeps its own attention type). Float32,
1e-4 max abs, as the parity tests.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_specens
from jax_specens.decoding.api import decode
from jax_specens.draft import init_from_target
from jax_specens.draft.model import grown, target_layers
from jax_specens.models.layout import unrolled
from tests.fixtures_models import CASES, VOCAB, one_torch_thread

B, T, CACHE = 2, 12, 32
ATOL = 1e-4
SUBSET = np.sort(np.random.default_rng(0).choice(VOCAB, 24, replace=False)).astype(np.int32)
TOKENS = np.random.default_rng(1).integers(3, 40, (B, T)).astype(np.int32)  # the tokenizer has 49


def draft_layers(num_layers: int) -> tuple[int, ...]:
  """Not a prefix: the last layer alone, or the first and the last of three."""
  return (num_layers - 1,) if num_layers == 2 else (0, num_layers - 1)


def torch_logits_with_layers(torch_model, layers: tuple[int, ...]) -> np.ndarray:
  """The HF model's logits `[B, T, V]` with its decoder layers cut to `layers` (a copy)."""
  import torch
  m = copy.deepcopy(torch_model)
  stack = m.transformer if hasattr(m, "transformer") else m.model  # GPT-2 / the rest
  name = "h" if hasattr(stack, "h") else "layers"
  setattr(stack, name, torch.nn.ModuleList([getattr(stack, name)[i] for i in layers]))
  m.config.num_hidden_layers = len(layers)  # the forward iterates layers[:num_hidden_layers]
  if getattr(m.config, "layer_types", None):
    m.config.layer_types = [m.config.layer_types[i] for i in layers]
  with torch.no_grad(), one_torch_thread():
    logits = m(input_ids=torch.tensor(TOKENS, dtype=torch.long), use_cache=False).logits
  return logits.float().numpy()


@jax.jit
def our_logits(model, tokens):
  logits, _ = jax_specens.forward(model, model.init_cache(B, CACHE), tokens,
                                  jnp.zeros((B,), jnp.int32))
  return logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_draft_of_some_target_layers_is_the_target_cut_to_them(hf_zoo, name):
  case = hf_zoo[name]
  layers = draft_layers(case.config.num_layers)
  draft = init_from_target(case.model, layers, SUBSET)
  assert draft.config.num_layers == len(layers)
  if case.config.layer_types:
    assert draft.config.layer_types == tuple(case.config.layer_type(i) for i in layers)
  ours = np.asarray(our_logits(draft, jnp.asarray(TOKENS)))
  ref = torch_logits_with_layers(case.torch_model, layers)
  outside = np.setdiff1d(np.arange(VOCAB), SUBSET)
  assert np.all(ours[..., outside] == -np.inf), f"{name}: ids outside the draft's K not -inf"
  err = float(np.abs(ours[..., SUBSET] - ref[..., SUBSET]).max())
  assert err < ATOL, f"{name}: draft of target layers {layers}: max abs logit error {err:.2e}"


def test_the_test_has_power(hf_zoo):
  """The same draft against the target cut to other layers, or to all of them, is far off."""
  case = hf_zoo["gemma3-local-rope-tied"]
  draft = init_from_target(case.model, (0, 2), SUBSET)
  ours = np.asarray(our_logits(draft, jnp.asarray(TOKENS)))[..., SUBSET]
  for other in ((0, 1), (1, 2), (0, 1, 2)):
    ref = torch_logits_with_layers(case.torch_model, other)[..., SUBSET]
    assert np.abs(ours - ref).max() > 100 * ATOL, other


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_grown_draft_computes_what_its_parent_did_with_the_new_layers_types(hf_zoo, name):
  """`grown`: the target's layer 0 inserted before a draft of its last layer starts as the
  identity (output projections zero), so the logits are the parent's; the new layer keeps its
  own window and RoPE type, and its other weights are the target's."""
  case = hf_zoo[name]
  last = case.config.num_layers - 1
  parent = init_from_target(case.model, (last,), SUBSET)
  child = grown(parent, case.model, (0,))
  assert child.config.num_layers == 2
  if case.config.layer_types:
    assert child.config.layer_types == (case.config.layer_type(0), case.config.layer_type(last))
  a = np.asarray(our_logits(parent, jnp.asarray(TOKENS)))[..., SUBSET]
  b = np.asarray(our_logits(child, jnp.asarray(TOKENS)))[..., SUBSET]
  np.testing.assert_allclose(b, a, atol=ATOL)
  layer = nnx.to_pure_dict(child.params)["layers"][0]
  source = nnx.to_pure_dict(unrolled(case.model).params)["layers"][0]
  assert not np.any(np.asarray(layer["attn"]["o"]["kernel"]))
  assert not np.any(np.asarray(layer["mlp"]["down"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(layer["attn"]["q"]["kernel"]),
                                np.asarray(source["attn"]["q"]["kernel"]))


@pytest.mark.parametrize("name", ["gemma3-softcap-mqa-untied", "mistral-gqa-window5-untied",
                                  "qwen2-mqa-window-layers-untied"])
def test_greedy_sd_with_a_sliding_window_draft_equals_ar(hf_zoo, name):
  """A draft of every layer of a sliding-window target (ring caches in both models) whose K ids
  are every other token `ar` emits leaves greedy output unchanged over 24 tokens past every
  window: it proposes the target's own token wherever that is one of its K, so some proposals are
  accepted and some rejected."""
  case = hf_zoo[name]
  lengths = jnp.asarray([T, T - 5], jnp.int32)
  ar = decode(case.model, TOKENS, lengths, method="ar", max_new_tokens=24, temperature=0.0)
  emitted = np.unique(np.asarray(ar.tokens))
  assert len(emitted) >= 4, f"{name}: degenerate reference {np.asarray(ar.tokens)}"
  draft = init_from_target(case.model, range(case.config.num_layers), emitted[::2])
  sd = decode(case.model, TOKENS, lengths, draft=draft, method="sd", gamma=3, max_new_tokens=24,
              temperature=0.0)
  np.testing.assert_array_equal(np.asarray(sd.tokens), np.asarray(ar.tokens))
  stats = sd.stats.to_dict()
  assert stats["accepted"] > 0 and stats["rejections"] > 0, f"{name}: {stats}"


@pytest.mark.parametrize("layers,flag,named", [((0, 4), "--layers", "[4]"), ((), "--layers", "[]"),
                                               ((-1,), "--grow-layers", "[-1]")])
def test_layer_indices_outside_the_target_are_refused_by_their_flag(layers, flag, named):
  config = jax_specens.ModelConfig(family="llama", vocab_size=16, hidden_size=8,
                                   intermediate_size=16, num_layers=4, num_heads=2, num_kv_heads=1,
                                   head_dim=4)
  assert target_layers((3, 0), config, flag) == [3, 0]
  with pytest.raises(ValueError, match="^" + re.escape(f"{flag} {named} not in [0, 4)")):
    target_layers(layers, config, flag)
