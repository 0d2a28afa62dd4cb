"""Speculative acceptance against any target distribution (docs/algorithms.md §2), batched, in log space.

A proposer drew `x_j ~ q_j`; the target is `r_j`. Token j is accepted iff `u_j <= r_j(x_j)/q_j(x_j)`
(in order, `u_j ~ U(0, 1]`); at the first rejection the replacement is drawn from
`norm(max(0, r_j - q_j))`. The emitted tokens are then distributed exactly as draws from r.
Greedy needs no special case: with one-hot q and r the rule accepts iff `x_j = argmax r_j` and the
residual is one-hot at `argmax r_j`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jax_specens.sampling import NEG_INF, normalize, sample


@flax.struct.dataclass
class Verdict:
  """num_accepted `[B]`: leading accepted tokens; rejected `[B]`: whether a valid token was
  rejected; token `[B]`: the replacement drawn at the first rejection (meaningless otherwise)."""

  num_accepted: Int[Array, "B"]
  rejected: Bool[Array, "B"]
  token: Int[Array, "B"]


def residual(logr: Float[Array, "... V"], logq: Float[Array, "... V"]) -> Float[Array, "... V"]:
  """log norm(max(0, r - q)); falls back to r where the residual has no mass (r == q)."""
  diff = jnp.where(logr > logq, logr + jnp.log1p(-jnp.exp(jnp.minimum(logq - logr, 0.0))), NEG_INF)
  res = normalize(diff)
  return jnp.where(jnp.isfinite(jnp.max(res, axis=-1, keepdims=True)), res, normalize(logr))


def gather_token(logp: Float[Array, "B G V"], tokens: Int[Array, "B G"]) -> Float[Array, "B G"]:
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def verify(key: Array, tokens: Int[Array, "B G"], logq: Float[Array, "B G V"],
           logr: Float[Array, "B G V"], num_valid: Int[Array, "B"]) -> Verdict:
  """Checks the first `num_valid[b]` proposals of each row in order (the lossless rule)."""
  k_u, k_res = jax.random.split(key)
  b, g = tokens.shape
  u = 1.0 - jax.random.uniform(k_u, (b, g))  # (0, 1]: a zero-probability token is never accepted
  ok = jnp.log(u) <= gather_token(logr, tokens) - gather_token(logq, tokens)
  return _first_rejection(k_res, ok, logq, logr, num_valid)


def _first_rejection(key, ok: Bool[Array, "B G"], logq, logr, num_valid) -> Verdict:
  """Counts leading accepted valid tokens and draws the replacement from the residual there."""
  g = ok.shape[1]
  valid = jnp.arange(g)[None, :] < num_valid[:, None]
  num_accepted = jnp.sum(jnp.cumprod(ok | ~valid, axis=1) * valid, axis=1).astype(jnp.int32)
  rejected = num_accepted < num_valid
  at = jnp.minimum(num_accepted, g - 1)[:, None, None]
  r_at = jnp.take_along_axis(logr, at, axis=1)[:, 0]
  q_at = jnp.take_along_axis(logq, at, axis=1)[:, 0]
  return Verdict(num_accepted=num_accepted, rejected=rejected,
                 token=sample(key, residual(r_at, q_at)))
