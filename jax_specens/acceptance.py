"""Speculative acceptance against any target distribution (docs/algorithms.md §2), batched, in log space.

A proposer drew `x_j ~ q_j`; the target is `r_j`. Token j is accepted iff `u_j <= r_j(x_j)/q_j(x_j)`
(in order, `u_j ~ U(0, 1]`); at the first rejection the replacement is drawn from
`norm(max(0, r_j - q_j))`. The emitted tokens are then distributed exactly as draws from r.
Greedy needs no special case: with one-hot q and r the rule accepts iff `x_j = argmax r_j` and the
residual is one-hot at `argmax r_j`. `greedy_verdict` is that case computed from the ids alone,
which the decoding loops take at run time when every row is greedy.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jax_specens.sampling import NEG_INF, SamplingParams, argmax, log_probs, normalize, sample


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


def verify_logits(key: Array, tokens: Int[Array, "B G"], logq: Float[Array, "B G V"],
                  logits: Float[Array, "B G+1 V"], num_valid: Int[Array, "B"],
                  params: SamplingParams, rule=None) -> tuple[Verdict, Int[Array, "B"]]:
  """sd's verification from the target's raw logits at the G proposals and the position after
  them: `rule` (default `verify`) against the target's sampling distribution, and the bonus token
  drawn after the last proposal (emitted when all are accepted). When every row is greedy and no
  rule is given, the ids decide (`greedy_verdict`, the bonus is the argmax) and logq, which
  `sampling.draw_with_dist` then leaves unbuilt, is not read."""
  k_rule, k_bonus = jax.random.split(key)
  g = tokens.shape[1]

  def full():
    logr = log_probs(logits, params)
    return (rule or verify)(k_rule, tokens, logq, logr[:, :g], num_valid), sample(k_bonus,
                                                                              logr[:, g])

  def greedy():
    best = argmax(logits).astype(jnp.int32)
    return greedy_verdict(tokens, best[:, :g], num_valid), best[:, g]

  return full() if rule is not None else jax.lax.cond(jnp.all(params.greedy), greedy, full)


def greedy_verdict(tokens: Int[Array, "B G"], best: Int[Array, "B G"],
                   num_valid: Int[Array, "B"]) -> Verdict:
  """`verify` when every row is greedy, without the distributions: q is one-hot at the proposal
  and r one-hot at `best` (the target's argmax), so a proposal is accepted iff it equals `best`
  and the residual draw at the first rejection is `best` there. The same verdict as `verify` on
  those one-hot distributions (tests/test_acceptance.py), at the cost of comparing ids."""
  num_accepted, rejected = _leading(tokens == best, num_valid)
  at = jnp.minimum(num_accepted, tokens.shape[1] - 1)[:, None]
  return Verdict(num_accepted=num_accepted, rejected=rejected,
                 token=jnp.take_along_axis(best, at, axis=1)[:, 0].astype(jnp.int32))


def _leading(ok: Bool[Array, "B G"], num_valid: Int[Array, "B"]):
  """(leading accepted valid tokens `[B]`, whether a valid token was rejected `[B]`)."""
  valid = jnp.arange(ok.shape[1])[None, :] < num_valid[:, None]
  num_accepted = jnp.sum(jnp.cumprod(ok | ~valid, axis=1) * valid, axis=1).astype(jnp.int32)
  return num_accepted, num_accepted < num_valid


def _first_rejection(key, ok: Bool[Array, "B G"], logq, logr, num_valid) -> Verdict:
  """Counts leading accepted valid tokens and draws the replacement from the residual there."""
  num_accepted, rejected = _leading(ok, num_valid)
  at = jnp.minimum(num_accepted, ok.shape[1] - 1)[:, None, None]
  r_at = jnp.take_along_axis(logr, at, axis=1)[:, 0]
  q_at = jnp.take_along_axis(logq, at, axis=1)[:, 0]
  return Verdict(num_accepted=num_accepted, rejected=rejected,
                 token=sample(key, residual(r_at, q_at)))
