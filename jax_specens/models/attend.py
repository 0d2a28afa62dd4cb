"""Attention of W new queries per row over the preallocated KV cache: dense or blocked.

Query at position p sees cache slot j iff j <= p (and p - j < window on sliding layers); slots past
a row's position hold stale keys of rolled-back tokens and are never visible (see `cache.py`).

- `dense`: one einsum over all S slots and the mask. Its cost follows S, the preallocated length.
- `blocked`: a `lax.fori_loop` over KV blocks of `block` slots, from the first block any query of
  the batch can see (0; on sliding layers min over the queries of p - window + 1) to the block of
  the largest query position of the batch, with an online (flash-style) softmax: a running
  maximum, sum and output in float32. Its cost follows the length in use. The trip count is
  traced, so one compiled program serves every length (and it runs inside `lax.while_loop`).
- `ring`: a sliding layer's ring cache (`cache.py`) of R slots: the ring as it was before the pass
  plus the pass's own W keys, one dense einsum over R + W keys. Its cost follows the window.
- `attend` picks by static shapes and the backend: on CPU, `blocked` when the cache holds more
  than one block and the pass is at most one block wide (decode and verification passes), else
  `dense`. Small caches, prompt passes over a whole cache and training (W = S) therefore keep the
  dense program, which is also reverse-differentiable (a traced trip count is not).
- The caches come as stored (`cache.py`: a bfloat16 cache on CPU is uint16 bits); each function
  reads values with `cache.values` after slicing, so XLA's CPU backend, which converts a
  bfloat16 array to float32 around a dynamic slice, never converts a whole cache (SmolLM2 in
  bfloat16 at 8192 slots: every layer's whole K and V, every step).
- With the opt-in CPU kernel, decode passes (at most 16 tokens) use `kernels/attention.cc`, which
  reads each visible slot once (no block copies, one call a layer); prompts keep XLA's programs.
- On GPU (and TPU) `attend` is always `dense`. Measured on an H200 (`benchmarks/attention_kernels`,
  1B shapes: 32 heads over 8 kv heads, bf16, 8192 slots), one attention of 1 new query at batch 1
  took 27-37 us dense whatever the length in use, and 89 / 300 / 532 us blocked at 512 / 4096 /
  8000 used slots: each block is a sequential loop trip of small kernels, while the dense fusion
  reads the whole cache at full bandwidth. `jax.nn.dot_product_attention` measured no faster:
  `xla` 21-45 us (the same einsum), `cudnn` 50-156 us at batch 1 and 109-528 us at batch 16. So
  neither is wired in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jax_specens.cache import values as read
from jax_specens.kernels import cpu

NEG_INF = -1e30


def visible(
    positions: Int[Array, "B W"], slots: Int[Array, "S"], window: int | None
) -> Bool[Array, "B W S"]:
  """Query at position p sees slot j iff j <= p (and p - j < window for sliding layers)."""
  p, j = positions[:, :, None], slots[None, None, :]
  mask = j <= p
  if window is not None:
    mask &= j > p - window
  return mask


def _scores(
    qg: Float[Array, "B W K G Dh"], keys: Float[Array, "B S K Dh"], scale: float,
    softcap: float | None,
) -> Float[Array, "B K G W S"]:
  """float32 scaled (and soft-capped) scores of the grouped queries against the keys."""
  scores = jnp.einsum("bwkgd,bskd->bkgws", qg, keys.astype(qg.dtype),
                      preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  return scores


def _grouped(q: Float[Array, "B W H Dh"], num_kv_heads: int) -> Float[Array, "B W K G Dh"]:
  b, w, h, d = q.shape
  return q.reshape(b, w, num_kv_heads, h // num_kv_heads, d)


def dense(
    q: Float[Array, "B W H Dh"], cache_k: Float[Array, "B S K Dh"],
    cache_v: Float[Array, "B S K Dh"], positions: Int[Array, "B W"], *, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> Float[Array, "B W H Dh"]:
  """Softmax attention over all S slots (GQA: H = K x G query heads share a kv head)."""
  mask = visible(positions, jnp.arange(cache_k.shape[1]), window)
  return _masked(q, read(cache_k), read(cache_v), mask[:, None, None], scale, softcap)


def _masked(
    q: Float[Array, "B W H Dh"], keys: Float[Array, "B S K Dh"], values: Float[Array, "B S K Dh"],
    mask: Bool[Array, "B 1 1 W S"], scale: float, softcap: float | None,
) -> Float[Array, "B W H Dh"]:
  """Softmax attention of the queries over the S keys the mask lets each see."""
  scores = jnp.where(mask, _scores(_grouped(q, keys.shape[2]), keys, scale, softcap), NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgws,bskd->bwkgd", probs, values.astype(q.dtype))
  return out.reshape(q.shape)


def block_range(
    positions: Int[Array, "B W"], num_slots: int, block: int, window: int | None
) -> tuple[Int[Array, ""], Int[Array, ""]]:
  """[first, last] block index (inclusive) holding any slot a query of the batch can see."""
  last = jnp.minimum(jnp.max(positions), num_slots - 1) // block
  if window is None:
    return jnp.zeros_like(last), last
  first = jnp.clip(jnp.min(positions) - window + 1, 0, num_slots - 1) // block
  return first, last


def blocked(
    q: Float[Array, "B W H Dh"], cache_k: Float[Array, "B S K Dh"],
    cache_v: Float[Array, "B S K Dh"], positions: Int[Array, "B W"], *, scale: float,
    window: int | None = None, softcap: float | None = None, block: int = 512,
) -> Float[Array, "B W H Dh"]:
  """`dense`, reading only the blocks of `block` slots from `block_range` (online softmax).

  Block i covers slots [i * block, (i + 1) * block); when S is not a multiple of `block` the last
  block is read from S - block and its slots before i * block (already counted) are masked.
  """
  b, s, k, d = cache_k.shape
  if block > s:
    raise ValueError(f"block={block} is larger than the cache ({s} slots)")
  qg = _grouped(q, k)
  g, w = qg.shape[3], qg.shape[1]

  def body(i, carry):
    run_max, run_sum, acc = carry  # B K G W; B K G W; B K G W Dh (float32)
    start = jnp.minimum(i * block, s - block)
    keys = read(lax.dynamic_slice_in_dim(cache_k, start, block, axis=1))
    values = read(lax.dynamic_slice_in_dim(cache_v, start, block, axis=1))
    slots = start + jnp.arange(block)
    mask = (visible(positions, slots, window) & (slots >= i * block)[None, None])[:, None, None]
    scores = _scores(qg, keys, scale, softcap)
    new_max = jnp.maximum(run_max, jnp.max(jnp.where(mask, scores, NEG_INF), axis=-1))
    probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
    fix = jnp.exp(run_max - new_max)
    run_sum = run_sum * fix + jnp.sum(probs, axis=-1)
    acc = acc * fix[..., None] + jnp.einsum(
        "bkgws,bskd->bkgwd", probs.astype(q.dtype), values.astype(q.dtype),
        preferred_element_type=jnp.float32)
    return new_max, run_sum, acc

  init = (jnp.full((b, k, g, w), NEG_INF, jnp.float32), jnp.zeros((b, k, g, w), jnp.float32),
          jnp.zeros((b, k, g, w, d), jnp.float32))
  first, last = block_range(positions, s, block, window)
  _, run_sum, acc = lax.fori_loop(first, last + 1, body, init)
  out = acc / run_sum[..., None]  # every query sees at least its own slot: run_sum > 0
  return jnp.einsum("bkgwd->bwkgd", out).reshape(q.shape).astype(q.dtype)


def ring_positions(start: Int[Array, "B"], num_slots: int) -> Int[Array, "B R"]:
  """The position ring slot j holds before a pass at `start`: the q in [start - R, start - 1]
  with q = j mod R (negative: never written; `cache.py` says why the others are current)."""
  j = jnp.arange(num_slots)[None, :]
  back = start[:, None] - 1
  return back - jnp.mod(back - j, num_slots)


def ring(
    q: Float[Array, "B W H Dh"], ring_k: Float[Array, "B R K Dh"],
    ring_v: Float[Array, "B R K Dh"], new_k: Float[Array, "B W K Dh"],
    new_v: Float[Array, "B W K Dh"], positions: Int[Array, "B W"], *, scale: float, window: int,
    softcap: float | None = None,
) -> Float[Array, "B W H Dh"]:
  """Sliding-window attention of W queries at `positions` over a ring of R slots (read before
  the pass writes into it) and the pass's own keys: `dense` over the R + W keys by position."""
  keys = jnp.concatenate([read(ring_k).astype(new_k.dtype), new_k], axis=1)
  values = jnp.concatenate([read(ring_v).astype(new_v.dtype), new_v], axis=1)
  key_pos = jnp.concatenate([ring_positions(positions[:, 0], ring_k.shape[1]), positions], 1)
  p, j = positions[:, :, None], key_pos[:, None, :]
  mask = (j <= p) & (j > p - window) & (j >= 0)  # B W R+W
  return _masked(q, keys, values, mask[:, None, None], scale, softcap)


def attend(
    q: Float[Array, "B W H Dh"], cache_k: Float[Array, "B S K Dh"],
    cache_v: Float[Array, "B S K Dh"], positions: Int[Array, "B W"], *, scale: float,
    window: int | None = None, softcap: float | None = None, block: int | None = 512,
    layer: Int[Array, ""] | None = None,
) -> Float[Array, "B W H Dh"]:
  """With the CPU kernel computing (`JAX_SPECENS_CPU_KERNELS=1`, `cpu.attention`) a pass of at
  most `cpu.MAX_ROWS` tokens (head size a multiple of 16, at most `cpu.MAX_HEAD_DIM`) goes to
  `cpu.attend`; else on CPU `blocked` when S > block >= W (static shapes), else `dense`; block
  None or another backend: always `dense` (see the module's notes).

  layer: the caches are a scanned model's stacks `[n, B, S, K, Dh]`, this layer's at `layer`
  (the kernel reads it in place; XLA slices it).
  """
  kw = dict(scale=scale, window=window, softcap=softcap)
  dh = q.shape[-1]
  if q.shape[1] <= cpu.MAX_ROWS and dh % 16 == 0 and dh <= cpu.MAX_HEAD_DIM and cpu.attention():
    def reference(q, k, v, positions, layer):  # its gradient is the kernel's
      if layer is not None:
        k, v = k[layer], v[layer]
      return dense(q, k, v, positions, **kw).astype(jnp.float32)

    kernel = lambda *args: cpu.attend(*args, **kw)
    return cpu.with_xla_gradient(kernel, reference)(q, cache_k, cache_v, positions,
                                                     layer).astype(q.dtype)
  if layer is not None:
    cache_k, cache_v = cache_k[layer], cache_v[layer]
  s, w = cache_k.shape[1], q.shape[1]
  if block is not None and s > block >= w and jax.default_backend() == "cpu":
    return blocked(q, cache_k, cache_v, positions, block=block, **kw)
  return dense(q, cache_k, cache_v, positions, **kw)
