"""Converted Hugging Face models reproduce their PyTorch reference, family by family.

For every case of `tests/fixtures_models.CASES` (tiny random models covering GQA/MQA, tied and
untied embeddings, biases, RoPE scaling, partial rotary, sliding windows shorter than the sequence,
soft-capping, q/k norms, learned positions), the model converted to safetensors -> our checkpoint
-> `load_model`:
  (a) scores a batch of ragged right-padded prompts in one forward with the PyTorch logits;
  (b) scores the same tokens fed one at a time through the KV cache with the same logits;
  (c) decodes 32 greedy tokens identical to `generate(do_sample=False)`, continuing each row from
      the cache of (a) at its own length (the padding written past it is never read).
Float32, tolerance 1e-4 max abs. All three run in one jitted program per case (one compile; the
loops are `lax.scan`s over the pure `jax_specens.forward`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_specens
from tests.fixtures_models import CASES, VOCAB, one_torch_thread

B, T, NEW, CACHE = 4, 12, 32, 48
RING = 2  # ring slack of a W = 1 decode (`cache.ring_slack(0)`)
LENGTHS = np.array([12, 7, 3, 10], np.int32)
ATOL = 1e-4
NAMES = sorted(CASES)
# Tiny programs: XLA's backend optimisations cost more compile time than they save at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _prompts(seed: int = 0):
  rng = np.random.default_rng(seed)
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  return np.where(valid, rng.integers(3, VOCAB, (B, T)), 0).astype(np.int32), valid


PROMPTS, VALID = _prompts()


def _run(model, prompts, lengths):
  """Our three answers: batch logits `[B,T,V]`, token-by-token logits `[B,T,V]`, greedy `[B,NEW]`.

  Sliding layers (windows 4-6 here) keep ring caches of window + RING slots (`cache.py`), as
  `decode` builds them: the prompt pass is wider than a ring and every later pass goes round it.
  """
  start = jnp.zeros(B, jnp.int32)
  batch_logits, cache = jax_specens.forward(
      model, model.init_cache(B, CACHE, ring_slack=RING), prompts, start, lengths)

  def one_token(cache, t):
    logits, cache = jax_specens.forward(model, cache, prompts[:, t, None], start + t)
    return cache, logits[:, 0]

  _, steps = jax.lax.scan(one_token, model.init_cache(B, CACHE, ring_slack=RING), jnp.arange(T))

  def greedy_step(carry, i):
    cache, token = carry
    logits, cache = jax_specens.forward(model, cache, token[:, None], lengths + i)
    token = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    return (cache, token), token

  first = jnp.argmax(batch_logits[jnp.arange(B), lengths - 1], -1).astype(jnp.int32)
  _, rest = jax.lax.scan(greedy_step, (cache.rollback(lengths), first), jnp.arange(NEW - 1))
  return batch_logits, steps.swapaxes(0, 1), jnp.concatenate([first[:, None], rest.T], 1)


run = jax.jit(_run, compiler_options=FAST_COMPILE)
_ours: dict[str, tuple[np.ndarray, ...]] = {}
_torch: dict[str, tuple[np.ndarray, ...]] = {}


def ours(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if case.name not in _ours:
    _ours[case.name] = tuple(np.asarray(x) for x in run(case.model, jnp.asarray(PROMPTS),
                                                          jnp.asarray(LENGTHS)))
  return _ours[case.name]


def reference(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch: logits `[B,T,V]` of the right-padded batch (attention mask on the padding), and
  `generate` on the left-padded batch: tokens `[B,NEW]` and their logits `[B,NEW,V]`."""
  import torch
  from transformers import GenerationConfig
  if case.name in _torch:
    return _torch[case.name]
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
    with torch.no_grad(), one_torch_thread():
      logits = case.torch_model(input_ids=torch.tensor(PROMPTS, dtype=torch.long),
                                attention_mask=torch.tensor(VALID, dtype=torch.long)).logits
      out = case.torch_model.generate(torch.tensor(left, dtype=torch.long),
                                      attention_mask=torch.tensor(mask, dtype=torch.long),
                                      generation_config=config)
  finally:
    model_config.eos_token_id = eos
  assert out.sequences.shape == (B, T + NEW), "generate stopped early"
  _torch[case.name] = (logits.float().numpy(), out.sequences[:, T:].numpy(),
                       torch.stack(out.logits, 1).float().numpy())
  return _torch[case.name]


def _max_err(ours_logits: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(ours_logits - ref)[VALID].max())


@pytest.mark.parametrize("name", NAMES)
def test_prompt_batch_logits_match_torch(hf_zoo, name):
  case = hf_zoo[name]
  batch_logits = ours(case)[0]
  assert batch_logits.shape == (B, T, VOCAB) and batch_logits.dtype == np.float32
  err = _max_err(batch_logits, reference(case)[0])
  assert err < ATOL, f"{name}: max abs logit error {err:.2e} over valid positions"


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_through_cache_matches_torch(hf_zoo, name):
  case = hf_zoo[name]
  err = _max_err(ours(case)[1], reference(case)[0])
  assert err < ATOL, f"{name}: max abs logit error {err:.2e} feeding one token at a time"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_torch_generate(hf_zoo, name):
  case = hf_zoo[name]
  tokens = ours(case)[2]
  _, ref, ref_logits = reference(case)
  # The comparison means something only if the random model does not repeat one token.
  assert len(np.unique(ref)) >= 4, f"{name}: degenerate reference {ref}"
  if not np.array_equal(tokens, ref):
    b, t = np.argwhere(tokens != ref)[0]
    top2 = np.sort(ref_logits[b, t])[-2:]
    pytest.fail(f"{name}: row {b} differs at new token {t}: ours {tokens[b, t]}, torch "
                f"{ref[b, t]} (torch top-2 logit margin {top2[1] - top2[0]:.2e})\n"
                f"ours  {tokens[b]}\ntorch {ref[b]}")


def test_jitted_step_continues_prompt_like_forward(hf_zoo):
  """The public jitted `step` (donated cache) gives the same prompt logits as the scan above."""
  case = hf_zoo[NAMES[0]]
  logits, cache = jax_specens.step(case.model, case.model.init_cache(B, CACHE),
                                   jnp.asarray(PROMPTS), jnp.zeros(B, jnp.int32))
  np.testing.assert_array_equal(np.asarray(cache.pos), np.full(B, T))
  np.testing.assert_allclose(np.asarray(logits)[VALID], ours(case)[0][VALID], atol=1e-5)
