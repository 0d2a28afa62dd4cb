"""Ring caches for sliding-window layers (jax_specens/cache.py, models/attend.py `ring`).

A sliding layer of window w keeps `w + slack` slots instead of the whole length, and rollback is
still only a move of `pos`:
- a pass over a ring gives the logits of the same pass over a full-length cache, through a wide
  right-padded prompt (longer than the ring) and a run of passes of random width <= slack + 1,
  each rolled back by a random amount — the acceptance pattern of speculative decoding;
- greedy `decode` (se, whose loop sd runs too, and cosd) on a model of sliding and global layers
  gives the same tokens with ring caches as with full-length ones (the HF parity tests of the
  sliding families, whose greedy decodes go through rings too, compare against transformers, and
  tests/test_gguf_real.py real Gemma 3 past its 512-token window);
- the ring layers' memory is `window + slack` slots, whatever the cache length, and the memory
  check before a decode counts them at that size;
- a pass too wide for the ring, without the count of its real tokens, is refused by name.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import cache as kv
from jax_specens import create_model
from jax_specens.decoding.api import decode
from jax_specens.decoding import loop
from jax_specens.models import attend as A
from jax_specens.step import forward, forward_prompt
from tests.decode_models import LENGTHS, PROMPTS, config, scaled

WINDOW, SLACK, LEN = 4, 3, 64  # ring of 7 slots against 64


@functools.cache
def tiny(seed: int):
  """Sliding (window 4), global, sliding layers: the ring and the full cache side by side."""
  cfg = dataclasses.replace(config(layers=3), family="mistral", sliding_window=WINDOW,
                            layer_types=("sliding", "full", "sliding"))
  return scaled(create_model(cfg, seed=seed), 15.0)


def test_ring_positions_name_the_last_R_positions_before_the_pass():
  got = A.ring_positions(jnp.asarray([0, 3, 9]), 4)
  # start 9: slots 0..3 hold positions 8, 5, 6, 7; start 3: 0, 1, 2 and -1 (never written)
  np.testing.assert_array_equal(got, [[-4, -3, -2, -1], [0, 1, 2, -1], [8, 5, 6, 7]])


def test_ring_layers_hold_window_plus_slack_slots():
  model = tiny(0)
  full, ring = model.init_cache(2, LEN), model.init_cache(2, LEN, ring_slack=SLACK)
  assert [x.shape[1] for x in ring.k] == [WINDOW + SLACK, LEN, WINDOW + SLACK]
  assert ring.ring == (True, False, True) and ring.max_len == full.max_len == LEN
  assert kv.cache_bytes(ring) == kv.kv_bytes(model.config, 2, LEN, 4, SLACK)
  assert kv.cache_bytes(full) == kv.kv_bytes(model.config, 2, LEN, 4)
  assert kv.cache_bytes(ring) == kv.cache_bytes(full) * (2 * 7 + 64) // (3 * 64)
  # a cache no longer than the ring keeps full-length layers
  assert model.init_cache(2, WINDOW + SLACK, ring_slack=SLACK).ring == (False,) * 3


def test_forward_prompt_scores_each_rows_last_token_as_the_full_pass_does():
  """The prompt pass runs the head on each row's last token only, through a ring narrower than
  the prompt too: those logits, and the cache, are the full pass's."""
  model = tiny(0)
  rng = np.random.default_rng(1)
  lengths = np.array([12, 9, 2], np.int32)
  prompt = rng.integers(1, 64, size=(3, 12)).astype(np.int32)
  zero = jnp.zeros((3,), jnp.int32)
  for slack in (None, SLACK):
    full, want_cache = jax.jit(forward)(model, model.init_cache(3, LEN, ring_slack=slack),
                                        jnp.asarray(prompt), zero, jnp.asarray(lengths))
    last, cache = jax.jit(forward_prompt)(model, model.init_cache(3, LEN, ring_slack=slack),
                                          jnp.asarray(prompt), jnp.asarray(lengths))
    chex.assert_trees_all_close(last, full[np.arange(3), lengths - 1], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((cache.k, cache.v), (want_cache.k, want_cache.v), atol=1e-6)
    np.testing.assert_array_equal(cache.pos, lengths)


def test_passes_with_rollbacks_match_a_full_cache():
  model = tiny(0)
  rng = np.random.default_rng(0)
  b, width = 3, 12  # the prompt pass is wider than the 7-slot ring
  lengths = np.array([12, 9, 2], np.int32)
  prompt = rng.integers(1, 64, size=(b, width)).astype(np.int32)
  prompt[np.arange(width)[None, :] >= lengths[:, None]] = 0
  run = jax.jit(forward)
  caches = [model.init_cache(b, LEN), model.init_cache(b, LEN, ring_slack=SLACK)]
  zero = jnp.zeros((b,), jnp.int32)
  outs = [run(model, c, jnp.asarray(prompt), zero, jnp.asarray(lengths)) for c in caches]
  for j in range(b):  # each row's real positions
    chex.assert_trees_all_close(outs[1][0][j, :lengths[j]], outs[0][0][j, :lengths[j]],
                                atol=2e-4, rtol=1e-5)
  caches = [c.rollback(jnp.asarray(lengths)) for _, c in outs]
  for _ in range(25):
    w = int(rng.integers(1, SLACK + 2))  # <= slack + 1: the widest pass a ring allows
    tokens = jnp.asarray(rng.integers(1, 64, size=(b, w)), jnp.int32)
    start = caches[0].pos
    outs = [run(model, c, tokens, start) for c in caches]
    chex.assert_trees_all_close(outs[1][0], outs[0][0], atol=2e-4, rtol=1e-5)
    keep = jnp.asarray(rng.integers(0, w + 1, size=b), jnp.int32)  # 0..w tokens accepted
    caches = [c.rollback(start + keep) for _, c in outs]
  assert int(jnp.min(caches[0].pos)) > 3 * (WINDOW + SLACK)  # every row went round its ring


def test_a_pass_too_wide_for_the_ring_needs_its_real_token_count():
  model = tiny(0)
  cache = model.init_cache(1, LEN, ring_slack=SLACK)
  tokens = jnp.ones((1, SLACK + 2), jnp.int32)
  with pytest.raises(ValueError, match="valid="):
    forward(model, cache, tokens, jnp.zeros((1,), jnp.int32))


N = 40  # tokens: every row runs many times round its ring


def greedy(method: str) -> np.ndarray:
  target, other = tiny(0), tiny(1)
  kw = dict(max_new_tokens=N, temperature=0.0)
  if method == "cosd":
    out = decode(target, PROMPTS, LENGTHS, method="cosd", draft=other, gamma=3, **kw)
  else:
    out = decode([target, other], PROMPTS, LENGTHS, method="se", gamma=(3, 2), **kw)
  np.testing.assert_array_equal(out.lengths, [N] * 3)
  return np.asarray(out.tokens)


@pytest.mark.parametrize("method", ["se", "cosd"])
def test_greedy_decode_with_rings_equals_full_caches(method, monkeypatch):
  with_rings = greedy(method)
  monkeypatch.setattr(loop, "ring_slack", lambda lookahead: None)  # every layer full length
  jax.clear_caches()
  np.testing.assert_array_equal(with_rings, greedy(method))


def test_the_memory_check_counts_ring_layers_at_their_size():
  cfg, slots = tiny(0).config, 10_000
  ring = kv.kv_bytes(cfg, 1, slots, 4, kv.ring_slack(0))
  assert 2.9 * ring < kv.kv_bytes(cfg, 1, slots, 4)  # two of three layers are 6-slot rings
  need = ring + 4 * 3 * slots + 4 * 2 * cfg.vocab_size  # + loop state, + a pass's logits
  kv.check_memory([cfg], [4], 1, 10, slots - 10, available=need)
  with pytest.raises(ValueError, match="needs about"):
    kv.check_memory([cfg], [4], 1, 10, slots - 10, available=need - 1)
