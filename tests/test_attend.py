"""Blocked attention (jax_specens/models/attend.py) is the dense attention, reading less.

- `blocked` equals `dense` within float32 rounding on random inputs: ragged rows whose positions
  differ by more than a block, W > 1, sliding windows smaller and larger than a block, soft-capping,
  GQA and MQA, a cache that is not a multiple of the block;
- it never reads a block outside `block_range`: NaN values there leave its output finite (and make
  the dense output NaN, the negative control);
- `attend` keeps the dense program for a cache of at most one block and for passes wider than a
  block (prompt passes, training);
- greedy `decode` (ar, se) on tiny models whose caches span many blocks gives the same tokens
  with blocked attention as with dense attention.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.decoding.api import decode
from jax_specens.models import attend as A
from jax_specens.models.model import with_attention_block
from tests.decode_models import LENGTHS, PROMPTS, config, scaled
from jax_specens import create_model

BLOCK = 8
S = 61  # not a multiple of BLOCK: the last block is read from S - BLOCK
# rows 0 / 1 / 2 start 30 / 10 slots apart (> BLOCK); row 2 is near the end of the cache
STARTS = np.array([2, 32, 42], np.int32)


def inputs(w: int, heads: int, kv_heads: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  d = 8
  q = jnp.asarray(rng.normal(size=(3, w, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, S, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, S, kv_heads, d)), jnp.float32)
  positions = jnp.asarray(STARTS[:, None] + np.arange(w)[None, :], jnp.int32)
  return q, k, v, positions


@pytest.mark.parametrize("w", [1, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 3, 20], ids=["full", "window<block", "window>block"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
def test_blocked_equals_dense(w, heads, kv_heads, window, softcap):
  q, k, v, positions = inputs(w, heads, kv_heads)
  kw = dict(scale=0.7, window=window, softcap=softcap)
  want = A.dense(q, k, v, positions, **kw)
  got = jax.jit(functools.partial(A.blocked, block=BLOCK, **kw))(q, k, v, positions)
  chex.assert_trees_all_close(got, want, atol=2e-6, rtol=2e-6)
  assert got.shape == want.shape == q.shape


def test_block_range_spans_the_visible_slots_of_every_row():
  positions = jnp.asarray(STARTS[:, None] + np.arange(5)[None, :], jnp.int32)  # 2..46
  assert [int(x) for x in A.block_range(positions, S, BLOCK, None)] == [0, 46 // BLOCK]
  # sliding window 20: the first visible slot is 2 - 20 + 1 < 0 -> block 0; a window of 3 from
  # rows starting at 32 and 42 (row 0 moved there too) starts at slot 30 -> block 3
  later = positions.at[0].set(positions[1])
  assert [int(x) for x in A.block_range(later, S, BLOCK, 3)] == [30 // BLOCK, 46 // BLOCK]
  # a position past the cache (writes dropped) reads up to the last block
  assert int(A.block_range(jnp.asarray([[70]]), S, BLOCK, None)[1]) == (S - 1) // BLOCK


@pytest.mark.parametrize("window", [None, 3])
def test_blocked_reads_no_block_outside_its_range(window):
  q, k, v, positions = inputs(2, 4, 2)
  positions = positions.at[0].set(positions[1])  # every row at slots >= 32
  first, last = (int(x) for x in A.block_range(positions, S, BLOCK, window))
  assert last < (S - 1) // BLOCK and (window is None or first > 0)
  slots = np.arange(S)
  outside = (slots >= (last + 1) * BLOCK) | (slots < first * BLOCK)
  v = v.at[:, outside].set(jnp.nan)
  kw = dict(scale=0.7, window=window)
  assert np.isfinite(np.asarray(A.blocked(q, k, v, positions, block=BLOCK, **kw))).all()
  assert np.isnan(np.asarray(A.dense(q, k, v, positions, **kw))).any()  # negative control


def _has_loop(fn, *args) -> bool:
  return "while" in str(jax.make_jaxpr(fn)(*args))


def test_attend_keeps_the_dense_program_for_one_block_and_wide_passes():
  q, k, v, positions = inputs(5, 4, 2)
  kw = dict(scale=0.7, window=None, softcap=None)
  dense = A.dense(q, k, v, positions, **kw)
  # the cache fits one block (or block None): exactly the dense result, no loop
  for block in (S, 2 * S, None):
    fn = functools.partial(A.attend, block=block, **kw)
    np.testing.assert_array_equal(fn(q, k, v, positions), dense)
    assert not _has_loop(fn, q, k, v, positions)
  # a pass wider than the block (a prompt pass, training): dense too
  assert not _has_loop(functools.partial(A.attend, block=4, **kw), q, k, v, positions)
  # a decode pass over a cache of several blocks: the loop
  assert _has_loop(functools.partial(A.attend, block=BLOCK, **kw), q, k, v, positions)


def test_a_block_larger_than_the_cache_or_not_positive_is_rejected():
  q, k, v, positions = inputs(1, 4, 2)
  with pytest.raises(ValueError, match="larger than the cache"):
    A.blocked(q, k, v, positions, scale=1.0, block=S + 1)
  with pytest.raises(ValueError, match="attention_block must be a positive"):
    dataclasses.replace(config(), attention_block=0)


# ---- end to end: decode with a cache of many blocks ----------------------------------------------
N, CACHE, SMALL_BLOCK = 24, 48, 4  # 12 blocks; ragged prompts, rows drift apart in sd/se

@functools.cache
def tiny(seed: int):
  return scaled(create_model(config(layers=2), seed=seed), 15.0)


def greedy(method: str, block: int | None) -> np.ndarray:
  target, other = (with_attention_block(tiny(s), block) for s in (0, 1))
  kw = dict(max_new_tokens=N, temperature=0.0, cache_len=CACHE)
  if method == "ar":
    out = decode(target, PROMPTS, LENGTHS, method="ar", **kw)
  else:
    out = decode([target, other], PROMPTS, LENGTHS, method="se", gamma=(3, 1), **kw)
  np.testing.assert_array_equal(out.lengths, [N] * 3)
  return np.asarray(out.tokens)


# (sliding-window models decode through ring caches, `tests/test_ring_cache.py`: their sliding
# layers never take the blocked loop in `decode`; `test_blocked_equals_dense` covers its windows)
@pytest.mark.parametrize("method", ["ar", "se"])
def test_greedy_decode_blocked_equals_dense(method):
  dense = greedy(method, None)
  assert len({tuple(r) for r in dense}) == 3 and np.mean([len(set(r)) for r in dense]) > 4
  np.testing.assert_array_equal(greedy(method, SMALL_BLOCK), dense)
