"""Speculative Ensemble with the alternate proposal framework for n models (docs/algorithms.md §3).

State per row, besides the shared loop state: `pending` proposals sit in `seq` after the committed
tokens, `src` records which model proposed each, and each model keeps the raw logits it computed for
positions `committed .. cache.pos` in a ring buffer (`ring[k, :, s % R]` holds position s). A model
"has scored" pending position s iff `s <= cache.pos` (its queue).

One loop step is a fixed round-robin cycle shared by all rows: for model k = 0..n-1, one *scoring
pass* followed by `gamma_k - 1` *drafting passes* (`passes`). Every pass of model k:
  1. feeds the tokens model k has not fed yet (the last committed one and/or pending proposals),
     storing the distributions it gets;
  2. (scoring pass) verifies, oldest first, the pending tokens every model has scored, against
     `r = C(p_1..p_n)` with the proposer's distribution as q (`acceptance.verify`; when every row
     is greedy, ids against `Ensemble.greedy_token`): accepted ones are emitted; at the first
     rejection the residual draw is emitted, all pending proposals are dropped and every cache
     rolls back to the committed length;
  3. if model k has the distribution for the position after the last pending token, samples its
     proposal there (its "bonus" token) and appends it to the pending tokens.
With two models this is exactly the alternate proposal framework: the verifier's bonus becomes the
first token of its own proposal. The schedule depends only on the past, so the output follows the
ensemble distribution exactly. Plain speculative decoding is the case (draft, target) with
`C = p_target` and gammas (gamma, 1) (see sd.py).

Static window sizes: model k feeds at most `1 + sum_{j != k} gamma_j` tokens and verifies at most
`sum_{j != k} gamma_j`; at most `sum(gamma)` tokens are ever pending (the cache lookahead).

The passes run in one `lax.fori_loop` whose body runs the pass's feed (one program per distinct
(model, width)), its verification and the one proposal, with the model index traced. A
verification is a loop over pending positions, oldest first, that stops once every row has
rejected or run out of proposals: one program for every width, and no position after the last
row's first rejection is scored. The sampling and acceptance math (most of a small model's
program) is thus compiled once per step, not once per pass kind or verification width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jax_specens import acceptance, vocab
from jax_specens.decoding.loop import (Config, LoopState, Method, Request, advance, emit, feed,
                                       prefill)
from jax_specens.sampling import draw, log_probs


@flax.struct.dataclass
class SpecState:
  """ring `[N, B, R, V]`: each model's raw logits by position mod R; src `[B, S]` proposer of each
  pending position; pending `[B]` number of pending proposals."""

  ring: Float[Array, "N B R V"]
  src: Int[Array, "B S"]
  pending: Int[Array, "B"]


def lookahead(cfg: Config) -> int:
  return sum(cfg.gammas)


def ring_size(cfg: Config) -> int:
  return sum(cfg.gammas) + 1


def scoring_width(gammas, k: int) -> int:
  """Tokens model k feeds in its scoring pass: its last token plus the others' proposals (the
  passes of one step are priced from this in `jax_specens.pricing.step_passes`)."""
  return 1 + sum(gammas) - gammas[k]


def init(models, req: Request, cfg: Config) -> LoopState:
  state = prefill(models, req, cfg)
  b, s = state.seq.shape
  r = ring_size(cfg)
  ring = jnp.zeros((len(models), b, r, vocab.shared_size(models)), jnp.float32)
  return state.replace(extra=SpecState(ring=ring, src=jnp.zeros((b, s), jnp.int32),
                                       pending=jnp.zeros((b,), jnp.int32)))


@dataclasses.dataclass(frozen=True)
class Pass:
  """One pass of a loop step: model k feeds up to `width` tokens, then verifies up to
  `verify_width` pending proposals (0: a drafting pass, which verifies nothing)."""

  k: int
  width: int
  verify_width: int


def passes(gammas) -> tuple[Pass, ...]:
  """The passes of one loop step in order: per model its scoring pass, then `gamma_k - 1` drafting
  passes of one token (`jax_specens.pricing` prices a step from these)."""
  out = []
  for k, g in enumerate(gammas):
    width = scoring_width(gammas, k)
    out += [Pass(k, width, width - 1)] + [Pass(k, 1, 0)] * (g - 1)
  return tuple(out)


def step(models, req: Request, cfg: Config, state: LoopState, counted=None) -> LoopState:
  """One round-robin cycle (`passes`), as one loop over the passes. counted: models whose
  proposals count in stats (default all)."""
  order = passes(cfg.gammas)
  feeds = sorted({(p.k, p.width) for p in order})
  branch = jnp.array([feeds.index((p.k, p.width)) for p in order], jnp.int32)
  model = jnp.array([p.k for p in order], jnp.int32)
  limit = jnp.array([p.verify_width for p in order], jnp.int32)

  def one_pass(i, s: LoopState) -> LoopState:
    for j, (k, w) in enumerate(feeds):
      s = _when(branch[i] == j, functools.partial(_feed, models, req, cfg, k, w), s)
    verify = functools.partial(_verify, req, cfg, limit=limit[i], counted=counted)
    s = _when(limit[i] > 0, verify, s)
    return _propose(req, cfg, s, model[i])

  return jax.lax.fori_loop(0, len(order), one_pass, state)


def _when(pred: Array, fn: Callable[[LoopState], LoopState], state: LoopState) -> LoopState:
  """`fn(state)` if pred else `state`, as a loop run 0 or 1 times: a loop updates the caches it
  carries in place, where XLA copies every buffer that a `lax.cond` / `lax.switch` branch passes
  through unchanged (the other models' KV caches, once per pass)."""
  return jax.lax.fori_loop(0, pred.astype(jnp.int32), lambda _, s: fn(s), state)


def _feed(models, req, cfg, k: int, width: int, state: LoopState) -> LoopState:
  """Model k feeds the tokens it has not fed yet (at most `width`) and keeps their logits."""
  ex: SpecState = state.extra
  r = ring_size(cfg)
  c = state.committed(req)
  todo = jnp.clip(c + ex.pending - state.caches[k].pos, 0, width)
  state, logits, start = feed(state, models, k, width, todo)
  b = logits.shape[0]
  i = jnp.arange(width)[None, :]
  slots = jnp.where((i < todo[:, None]) & state.active[:, None], (start[:, None] + i + 1) % r, r)
  ring = ex.ring.at[k, jnp.arange(b)[:, None], slots].set(logits, mode="drop")
  return state.replace(extra=ex.replace(ring=ring))


def _gather(x: Array, pos: Int[Array, "B G"]) -> Array:
  """x `[B, L, ...]` at per-row positions `[B, G]` (clipped to L)."""
  pos = jnp.clip(pos, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)


def _verify(req, cfg, state: LoopState, limit: Int[Array, ""], counted) -> LoopState:
  """Verifies, oldest first, up to `limit` of the pending proposals that every model has scored.

  One position per trip of a loop that ends when every row has rejected or run out of valid
  proposals: the rule sees one position at a time (`G = 1`), so a verification of any width is
  one program, and positions after every row's first rejection are never scored."""
  ex: SpecState = state.extra
  r = ring_size(cfg)
  n, b = ex.ring.shape[:2]
  rows = jnp.arange(b)
  act = state.active
  c = state.committed(req)
  m = ex.pending
  scored = jnp.min(jnp.stack([cache.pos for cache in state.caches]), axis=0) - c + 1
  num_valid = jnp.where(act, jnp.clip(scored, 0, jnp.minimum(m, limit)), 0)
  state, key = state.next_key()
  custom = cfg.options.acceptance_rule is not None
  rule = cfg.options.acceptance_rule or acceptance.verify
  all_greedy = jnp.all(req.sampling.greedy)  # then the ids decide (`acceptance.greedy_verdict`)

  def live(j, rej):  # rows whose proposal at c + j is still to be checked (all before it accepted)
    return (j < num_valid) & ~rej

  def position(carry):
    j, a, rej, tok = carry
    pos = c + j
    logits = ex.ring[:, rows, pos % r]  # [N, B, V]
    proposal = state.seq[rows, pos][:, None]
    go = live(j, rej).astype(jnp.int32)

    def full():
      logq = log_probs(logits[ex.src[rows, pos], rows], req.sampling)
      logr = req.ensemble.target(logits, req.sampling)
      return rule(jax.random.fold_in(key, j), proposal, logq[:, None], logr[:, None], go)

    def greedy():
      return acceptance.greedy_verdict(proposal, req.ensemble.greedy_token(logits)[:, None], go)

    v = full() if custom else jax.lax.cond(all_greedy, greedy, full)
    go = go > 0
    return j + 1, a + v.num_accepted, rej | (v.rejected & go), jnp.where(v.rejected & go,
                                                                           v.token, tok)

  zeros = jnp.zeros((b,), jnp.int32)
  _, a, rej, replacement = jax.lax.while_loop(lambda s: jnp.any(live(s[0], s[2])), position,
                                              (jnp.int32(0), zeros, zeros > 0, zeros))
  span = sum(cfg.gammas)
  j = jnp.arange(span)[None, :]
  new = jnp.where(j < a[:, None], _gather(state.seq, c[:, None] + j), replacement[:, None])
  length0 = state.length
  state = emit(state, req, cfg, new, a + rej)
  # stats count what was emitted: a stop id or max_new_tokens may cut the accepted run (and the
  # residual draw after it) short
  e = state.length - length0
  state = _count(state, cfg, c, m, jnp.minimum(a, e), rej & (e > a), num_valid, counted, n)
  # a rejection drops every pending proposal and rolls every model back to the new last token
  for kk in range(n):
    state = advance(state, kk, jnp.where(rej, jnp.minimum(state.caches[kk].pos, c + a),
                                         state.caches[kk].pos))
  pending = jnp.where(rej, 0, jnp.where(act, m - a, m))
  return state.replace(extra=state.extra.replace(pending=pending))


def _count(state, cfg, c, m, a, rej, num_valid, counted, n) -> LoopState:
  """Proposals resolved this verification, by proposer: accepted ones, and on a rejection every
  pending proposal (the rejected one and those discarded after it). a: accepted tokens that were
  emitted; rej: rows whose residual draw was emitted (the caller cuts both at the output's end)."""
  ex: SpecState = state.extra
  span = sum(cfg.gammas)
  pos = c[:, None] + jnp.arange(span)[None, :]
  src = _gather(ex.src, pos)
  j = jnp.arange(span)[None, :]
  resolved = j < jnp.where(rej, m, a)[:, None]
  accepted = j < a[:, None]
  weight = jnp.ones((n,), jnp.int32) if counted is None else (
      jnp.zeros((n,), jnp.int32).at[jnp.asarray(counted)].set(1))
  onehot = jax.nn.one_hot(src, n, dtype=jnp.int32) * weight
  rounds = jnp.sum((num_valid > 0) & jnp.any(weight[src] * (j < num_valid[:, None]), axis=1))
  rejected_src = jnp.take_along_axis(src, jnp.minimum(a, span - 1)[:, None], axis=1)[:, 0]
  st = state.stats.count(proposed=jnp.sum(onehot * resolved[..., None], axis=(0, 1)),
                         accepted=jnp.sum(onehot * accepted[..., None], axis=1),
                         rejected=(rej & (weight[rejected_src] > 0)).astype(jnp.int32),
                         rounds=rounds)
  return state.replace(stats=st)


def _propose(req, cfg, state: LoopState, k: Int[Array, ""]) -> LoopState:
  """Model k (traced) samples its proposal at the position after the pending tokens, when it has
  scored that position (not on a row it just rejected in, nor a finished one)."""
  ex: SpecState = state.extra
  r = ring_size(cfg)
  c = state.committed(req)
  end = c + ex.pending
  fed = jnp.stack([cache.pos for cache in state.caches])[k]
  can = state.active & (fed == end)
  b, s = state.seq.shape
  rows = jnp.arange(b)
  logits = ex.ring[k, rows, end % r]  # [B, V]
  state, key = state.next_key()
  tok = draw(key, logits, req.sampling)
  at = jnp.where(can, end, s)
  seq = state.seq.at[rows, at].set(tok, mode="drop")
  src = ex.src.at[rows, at].set(k, mode="drop")
  return state.replace(seq=seq, extra=ex.replace(src=src, pending=ex.pending + can))


@dataclasses.dataclass(frozen=True)
class SpecOptions:
  """Static options of se and sd. acceptance_rule: a function with the signature of
  `acceptance.verify` replacing it (experiments and tests), called on one position at a time
  (`G = 1`, with its own key; `num_valid` 0 or 1); None: the lossless rule."""

  acceptance_rule: Callable | None = None


def prepare(models, options: dict) -> tuple[None, SpecOptions]:
  """se (and sd) accept `acceptance_rule=` (see `SpecOptions`)."""
  rule = options.pop("acceptance_rule", None)
  if options:
    raise ValueError(f"unknown options for method 'se' / 'sd': {sorted(options)}; they take "
                     "acceptance_rule")
  if rule is not None and not callable(rule):
    raise ValueError("acceptance_rule must be a function like jax_specens.acceptance.verify")
  return None, SpecOptions(acceptance_rule=rule)


METHOD = Method(init=init, step=step, num_models=(2, None), speculative=True,
                lookahead=lookahead, prepare=prepare)
