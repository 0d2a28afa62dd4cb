"""Converted Hugging Face models reproduce their PyTorch reference, family by family.

For every case of `tests/fixtures_models.CASES` (tiny random models covering GQA/MQA, tied and
untied embeddings, biases, RoPE scaling, partial rotary, sliding windows shorter than the sequence,
soft-capping, q/k norms, learned positions), the model converted to safetensors -> our checkpoint
-> `load_model`:
  (a) scores a batch of ragged right-padded prompts in one forward with the PyTorch logits;
  (b) scores the same tokens fed one at a time through the KV cache with the same logits;
  (c) decodes 32 greedy tokens identical to `generate(do_sample=False)`.
Float32, tolerance 1e-4 max abs. All cases share the same shapes (one batch, one cache length).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_specens
from tests.fixtures_models import CASES, VOCAB

B, T, NEW, CACHE = 4, 12, 32, 48
LENGTHS = np.array([12, 7, 3, 10], np.int32)
ATOL = 1e-4
NAMES = sorted(CASES)


def _prompts(seed: int = 0):
  rng = np.random.default_rng(seed)
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  return np.where(valid, rng.integers(3, VOCAB, (B, T)), 0).astype(np.int32), valid


PROMPTS, VALID = _prompts()
_torch_logits: dict[str, np.ndarray] = {}


def torch_logits(case) -> np.ndarray:
  """PyTorch logits `[B, T, V]` of the right-padded batch (attention mask on the padding)."""
  import torch
  if case.name not in _torch_logits:
    with torch.no_grad():
      out = case.torch_model(input_ids=torch.tensor(PROMPTS, dtype=torch.long),
                             attention_mask=torch.tensor(VALID, dtype=torch.long))
    _torch_logits[case.name] = out.logits.float().numpy()
  return _torch_logits[case.name]


def torch_greedy(case) -> tuple[np.ndarray, np.ndarray]:
  """`generate` on the left-padded batch: tokens `[B, NEW]` and their logits `[B, NEW, V]`."""
  import torch
  from transformers import GenerationConfig
  left, mask = np.zeros_like(PROMPTS), np.zeros_like(PROMPTS)
  for b, n in enumerate(LENGTHS):
    left[b, T - n:], mask[b, T - n:] = PROMPTS[b, :n], 1
  config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
  # Our loop neither stops at EOS nor suppresses it (min_new_tokens would): neither may torch.
  # `generate` fills unset fields from the model's generation config, so unset EOS there.
  model_config = case.torch_model.generation_config
  eos, model_config.eos_token_id = model_config.eos_token_id, None
  try:
    with torch.no_grad():
      out = case.torch_model.generate(torch.tensor(left, dtype=torch.long),
                                      attention_mask=torch.tensor(mask, dtype=torch.long),
                                      generation_config=config)
  finally:
    model_config.eos_token_id = eos
  assert out.sequences.shape == (B, T + NEW), "generate stopped early"
  return out.sequences[:, T:].numpy(), torch.stack(out.logits, 1).float().numpy()


def greedy(model, prompts: np.ndarray, lengths: np.ndarray, new: int) -> np.ndarray:
  """Greedy decoding with the jitted `jax_specens.step`: one prefill, then one token per call."""
  cache = model.init_cache(B, CACHE)
  logits, cache = jax_specens.step(model, cache, jnp.asarray(prompts), jnp.zeros(B, jnp.int32))
  lengths = jnp.asarray(lengths)
  token = jnp.argmax(logits[jnp.arange(B), lengths - 1], -1)
  cache = cache.rollback(lengths)
  out = [token]
  for i in range(new - 1):
    logits, cache = jax_specens.step(model, cache, token[:, None].astype(jnp.int32), lengths + i)
    token = jnp.argmax(logits[:, 0], -1)
    out.append(token)
  return np.asarray(jnp.stack(out, 1))


def _max_err(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(ours - ref)[VALID].max())


@pytest.mark.parametrize("name", NAMES)
def test_prompt_batch_logits_match_torch(hf_zoo, name):
  case = hf_zoo[name]
  cache = case.model.init_cache(B, CACHE)
  logits, cache = jax_specens.step(case.model, cache, jnp.asarray(PROMPTS),
                                   jnp.zeros(B, jnp.int32))
  assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(cache.pos), np.full(B, T))
  err = _max_err(np.asarray(logits), torch_logits(case))
  assert err < ATOL, f"{name}: max abs logit error {err:.2e} over valid positions"


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_through_cache_matches_torch(hf_zoo, name):
  case = hf_zoo[name]
  cache = case.model.init_cache(B, CACHE)
  steps = []
  for t in range(T):
    logits, cache = jax_specens.step(case.model, cache, jnp.asarray(PROMPTS[:, t:t + 1]),
                                     jnp.full(B, t, jnp.int32))
    steps.append(np.asarray(logits[:, 0]))
  err = _max_err(np.stack(steps, 1), torch_logits(case))
  assert err < ATOL, f"{name}: max abs logit error {err:.2e} feeding one token at a time"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_torch_generate(hf_zoo, name):
  case = hf_zoo[name]
  ref, ref_logits = torch_greedy(case)
  ours = greedy(case.model, PROMPTS, LENGTHS, NEW)
  # The comparison means something only if the random model does not repeat one token.
  assert len(np.unique(ref)) >= 4, f"{name}: degenerate reference {ref}"
  if not np.array_equal(ours, ref):
    b, t = np.argwhere(ours != ref)[0]
    top2 = np.sort(ref_logits[b, t])[-2:]
    pytest.fail(f"{name}: row {b} differs at new token {t}: ours {ours[b, t]}, torch {ref[b, t]} "
                f"(torch top-2 logit margin {top2[1] - top2[0]:.2e})\nours  {ours[b]}\ntorch {ref[b]}")
