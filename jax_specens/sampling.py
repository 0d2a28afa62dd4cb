"""Per-row sampling parameters and the distributions they define, in log space.

Every parameter is a traced `[B]` array, so changing temperature, top-k, top-p or min-p between
calls never recompiles. Greedy decoding is `temperature == 0`: the distribution becomes one-hot at
the argmax of the logits. Distributions are log-probabilities with `-inf` for removed tokens; no
function here produces NaN, also when every token of a row has been removed.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplingParams:
  """Per-row sampling parameters (all `[B]`).

  temperature: 0 means greedy (argmax), > 0 divides the logits.
  top_k: keep the k most likely tokens (ties at the k-th value are kept too); 0 disables.
  top_p: keep the smallest set of most likely tokens whose mass reaches p; 1 disables.
  min_p: keep tokens with `p(x) >= min_p * max p`; 0 disables.
  """

  temperature: Float[Array, "B"]
  top_k: Int[Array, "B"]
  top_p: Float[Array, "B"]
  min_p: Float[Array, "B"]

  @classmethod
  def make(cls, batch_size: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
           ) -> "SamplingParams":
    """Broadcasts scalars or `[B]` arrays (Python, numpy or traced) to `[B]` arrays."""

    def row(x, dtype):
      return jnp.broadcast_to(jnp.asarray(x, dtype), (batch_size,))

    return cls(temperature=row(temperature, jnp.float32), top_k=row(top_k, jnp.int32),
               top_p=row(top_p, jnp.float32), min_p=row(min_p, jnp.float32))

  @property
  def greedy(self) -> Bool[Array, "B"]:
    return self.temperature <= 0

  def unfiltered_when_greedy(self) -> "SamplingParams":
    """Greedy rows get temperature 1 and no filtering (how docs/algorithms.md §2 defines a greedy ensemble)."""
    g = self.greedy
    return SamplingParams(
        temperature=jnp.where(g, 1.0, self.temperature), top_k=jnp.where(g, 0, self.top_k),
        top_p=jnp.where(g, 1.0, self.top_p), min_p=jnp.where(g, 0.0, self.min_p))


def per_row(x: Array, ndim: int) -> Array:
  """`[B]` -> `[B, 1, ..., 1]` broadcastable against an array of rank `ndim` (batch first)."""
  return x.reshape(x.shape + (1,) * (ndim - 1))


def normalize(logp: Float[Array, "... V"]) -> Float[Array, "... V"]:
  """Renormalises log-weights. A row whose mass is all removed stays all `-inf` (never NaN)."""
  lse = jax.nn.logsumexp(logp, axis=-1, keepdims=True)
  return jnp.where(jnp.isfinite(lse), logp - jnp.where(jnp.isfinite(lse), lse, 0.0), NEG_INF)


def argmax(x: Array) -> Int[Array, "..."]:
  """The first maximum over the last axis, NaN ignored (as the sampling distributions treat it:
  a NaN logit is a removed token); 0 when a row has no number. `jnp.argmax(x, axis=-1)` wherever
  x has no NaN.

  XLA's CPU backend runs `jnp.argmax` as one variadic (value, index) reduction that is not
  vectorised, and a one-stage max-then-match reads x twice, the second time out of cache on large
  inputs. So, when the last axis splits into blocks of 256-4096: the maximum of every block (one
  vectorised pass), the first block holding the overall maximum, the first maximum inside it.
  XLA's CPU max treats a NaN inconsistently, and masking NaN inside the reduction stops its
  vectorisation, so a separate pass checks for NaN and only arrays holding one are cleaned first.
  `[8, 4, 262144]`: 43 ms one-stage, 9 ms in blocks with the check; `[8, 49152]`: 0.7 / 0.4."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return _argmax_blocks(x)
  return jax.lax.cond(jnp.any(jnp.isnan(x)),
                      lambda: _argmax_blocks(jnp.where(jnp.isnan(x), -jnp.inf, x)),
                      lambda: _argmax_blocks(x))


def _argmax_blocks(x: Array) -> Int[Array, "..."]:
  """argmax of x without NaN, in blocks where the last axis allows."""
  v = x.shape[-1]
  c = max((c for c in range(256, 4097) if v % c == 0 and v // c >= 2), default=None)
  if c is None:
    return _argmax_flat(x)
  blocks = x.reshape(x.shape[:-1] + (v // c, c))
  first = _argmax_flat(jnp.max(blocks, axis=-1))
  inner = jnp.take_along_axis(blocks, first[..., None, None], axis=-2)[..., 0, :]
  return first * c + _argmax_flat(inner)


def _argmax_flat(x: Array) -> Int[Array, "..."]:
  """The first maximum of x without NaN, as a max and a min over the last axis."""
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def one_hot_log(index: Int[Array, "..."], vocab: int) -> Float[Array, "... V"]:
  """Log of a one-hot distribution: 0 at `index`, -inf elsewhere."""
  return jnp.where(jnp.arange(vocab) == index[..., None], 0.0, NEG_INF)


def _filter(logp: Float[Array, "B ... V"], params: SamplingParams) -> Float[Array, "B ... V"]:
  """Applies top-k, then top-p on the renormalised survivors, then min-p. Keeps the argmax.

  Without sorting: XLA's CPU sort costs ~16 ms a row at V = 49152 (a top-p decode step sorts
  every scored position), so both cut-offs are found by bisection over the values' order (32
  masked reductions over V each, `_largest_key_where`). The result is the sorted definition's:
  top-k keeps every value >= the k-th largest (ties included) and renormalises over exactly k
  tokens; top-p keeps the values whose strictly larger survivors hold less than p of that mass.
  """
  vocab_size = logp.shape[-1]
  k = per_row(params.top_k, logp.ndim)
  p = per_row(params.top_p, logp.ndim)
  keys = _order_key(logp)
  top = jnp.max(logp, axis=-1, keepdims=True)
  shift = jnp.where(jnp.isfinite(top), top, 0.0)  # a row with every token removed: 0
  e = jnp.exp(logp - shift)  # 0 for removed tokens
  lowest = _order_key(jnp.full_like(top, NEG_INF))
  highest = jnp.max(keys, axis=-1, keepdims=True)
  # top-k: the largest value with at least k values >= it (every value when k is off or >= V)
  use_k = (k > 0) & (k < vocab_size)
  kth = jax.lax.cond(jnp.any(use_k), lambda: jnp.where(use_k, _largest_key_where(
      lambda v: jnp.sum(keys >= v, axis=-1, keepdims=True) >= k, lowest, highest), lowest),
      lambda: jnp.broadcast_to(lowest, highest.shape))
  above = keys > kth
  kth_e = jnp.exp(_from_order_key(kth) - shift)
  # the mass of exactly k tokens: those above the k-th value and as many ties as fill k
  mass_k = jnp.where(use_k, jnp.sum(jnp.where(above, e, 0.0), axis=-1, keepdims=True)
                     + (k - jnp.sum(above, axis=-1, keepdims=True)) * kth_e,
                     jnp.sum(e, axis=-1, keepdims=True))
  # top-p: keep v iff the mass strictly above v is < p * mass_k; the largest v failing that
  # (at least one exists below the k-th value, as p <= 1) bounds the kept ones from below
  last_out = jax.lax.cond(jnp.any(p < 1.0), lambda: _largest_key_where(
      lambda v: jnp.sum(jnp.where(keys > v, e, 0.0), axis=-1, keepdims=True) >= p * mass_k,
      kth - 1, highest), lambda: kth - 1)
  keep = jnp.where(p >= 1.0, keys >= kth, keys > last_out)
  mp = per_row(params.min_p, logp.ndim)
  keep &= (mp <= 0) | (logp >= top + jnp.log(jnp.maximum(mp, 1e-38)))
  keep |= logp == top
  return jnp.where(keep, logp, NEG_INF)


def _order_key(x: Float[Array, "..."]) -> Array:
  """float32 -> uint32 with the same order (-inf lowest)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _from_order_key(u: Array) -> Float[Array, "..."]:
  i = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def _largest_key_where(pred, lo: Array, hi: Array) -> Array:
  """Per row, the largest key v in [lo, hi] with pred(v), for a pred that is true at lo and
  stays false once false (32 halvings of the uint32 range)."""

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2 + ((hi - lo) & 1)  # upper middle, no overflow
    ok = pred(mid) & (mid > lo)
    return jnp.where(ok, mid, lo), jnp.where(ok | (mid <= lo), hi, mid - 1)

  return jax.lax.fori_loop(0, 32, halve, (lo, jnp.maximum(hi, lo)))[0]


def log_probs(logits: Float[Array, "B ... V"], params: SamplingParams) -> Float[Array, "B ... V"]:
  """The sampling distribution defined by `params`, as log-probabilities (batch axis first).

  Greedy rows get the one-hot distribution at `argmax(logits)`. Filtering (`_filter`) is skipped
  at run time when no row uses top-k, top-p or min-p.
  """
  nd = logits.ndim
  t = per_row(params.temperature, nd)
  greedy = t <= 0
  x = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, t), axis=-1)
  x = jnp.where(jnp.isnan(x), NEG_INF, x)
  needs_filter = jnp.any((params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0))
  x = jax.lax.cond(needs_filter, lambda y: normalize(_filter(y, params)), lambda y: y, x)
  hard = one_hot_log(argmax(logits), logits.shape[-1])
  return jnp.where(greedy, hard, x)


def sample(key: Array, logp: Float[Array, "B ... V"]) -> Int[Array, "B ..."]:
  """One draw per row from log-probabilities. A row with no mass left gives token 0.

  Inverse-CDF sampling: one uniform per row against the running sum of the probabilities, instead
  of Gumbel noise over the whole vocabulary (V random numbers from a threefry loop: ~200 us per
  draw at V = 4096 on CPU, 6x the cost of this). When every row has at most one token of nonzero
  probability (greedy decoding: one-hot distributions) the draw is that token and no random number
  is generated at all.
  """
  deterministic = jnp.all(jnp.sum(jnp.isfinite(logp), axis=-1) <= 1)
  tok = jax.lax.cond(deterministic, lambda: argmax(logp),
                     lambda: _inverse_cdf(key, logp))
  return jnp.where(jnp.isfinite(jnp.max(logp, axis=-1)), tok, 0).astype(jnp.int32)


def draw(key: Array, logits: Float[Array, "B ... V"], params: SamplingParams
         ) -> Int[Array, "B ..."]:
  """`sample(key, log_probs(logits, params))`, token for token. When every row is greedy (the
  common case for verification-heavy decoding) it is `argmax(logits)` at run time: two passes
  over V instead of the dozen of the one-hot distribution and its draw (`[8, 4, 262144]`: see
  benchmarks/verify_bench.py)."""
  return draw_with_dist(key, logits, params)[0]


def draw_with_dist(key: Array, logits: Float[Array, "B ... V"], params: SamplingParams,
                   always: bool = False
                   ) -> tuple[Int[Array, "B ..."], Float[Array, "B ... V"]]:
  """`draw` and the distribution drawn from, `log_probs(logits, params)`, for a verifier that
  needs it later. When every row is greedy (and not `always`, static) the distribution is not
  built: the second output is then `logits` itself, which the verifier must not read
  (`acceptance.greedy_verdict` does not)."""

  def sampled():
    logp = log_probs(logits, params)
    return sample(key, logp), logp

  if always:
    return sampled()
  return jax.lax.cond(jnp.all(params.greedy), lambda: (argmax(logits).astype(jnp.int32), logits),
                      sampled)


def _inverse_cdf(key: Array, logp: Float[Array, "B ... V"]) -> Int[Array, "B ..."]:
  """The first token whose cumulative (unnormalised) probability exceeds `u * total`,
  u ~ U[0, 1): token i is drawn with probability p_i; zero-probability tokens never are."""
  top = jnp.max(logp, axis=-1, keepdims=True)
  cdf = jnp.cumsum(jnp.exp(logp - jnp.where(jnp.isfinite(top), top, 0.0)), axis=-1)
  u = jax.random.uniform(key, logp.shape[:-1] + (1,), cdf.dtype) * cdf[..., -1:]
  above = cdf > u
  # u * total can round up to total: then take the most likely token
  return jnp.where(jnp.any(above, axis=-1), argmax(above), argmax(logp))


def concrete(x) -> np.ndarray | None:
  """`x` as a numpy array, or None when it is traced (inside a user's jit): what can be checked
  before tracing is checked on the concrete values only."""
  try:
    return np.asarray(x)
  except Exception:  # a tracer (jax raises several types for it)
    return None


def check_params(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> None:
  """Raises ValueError for out-of-range sampling parameters (concrete values only; call before
  tracing)."""
  t, k, p, m = (concrete(x) for x in (temperature, top_k, top_p, min_p))
  if t is not None and (np.any(t < 0) or np.any(~np.isfinite(t))):
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t}; pass temperature=0 for "
                     "greedy decoding or a positive value for sampling")
  if k is not None and np.any(k < 0):
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {k}")
  if p is not None and (np.any(p <= 0) or np.any(p > 1)):
    raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p}")
  if m is not None and (np.any(m < 0) or np.any(m > 1)):
    raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {m}")
