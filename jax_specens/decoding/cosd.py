"""Collaborative Speculative Decoding (docs/algorithms.md §4): a draft writes, an assistant fixes. Not lossless.

Models in method order: (draft, assistant). One loop step is one window per row:
  1. the draft drafts K tokens x~_1..x~_K, one pass each (sampled from its sampling distribution;
     argmax when greedy), written as pending tokens into `seq` after the committed ones;
  2. the assistant scores the last committed token and the K drafts in one pass of width K + 1,
     giving its candidates x^_1..x^_{K+1}: its top tokens (argmax, at any temperature: docs/algorithms.md §4);
  3. the verifier (rule, tree, learned head: any `jax_specens.fusion` verifier, a pytree in
     `Request.extra`) reads the features of both models at the K positions; the first position it
     marks, where the candidates differ, is replaced: emit x~_1..x~_{j-1}, x^_j and drop the rest.
     With no replacement all K are emitted, plus x^_{K+1} when the `bonus` option is on.
Each row has its own replacement point; the draft resumes from each row's new end next step.

Cache positions follow `loop.py` (fed = committed - 1), except that after a bonus token the draft
lags one more token (it never fed x~_K): with `bonus` on its first pass of a window has width 2 and
starts at its own position, which re-feeds nothing twice (a row that does not lag feeds one stale
slot that is overwritten before it is ever read).

Stats: model_calls = (draft passes, assistant passes); proposed[0]/accepted[0] = drafted (up to the
cut of a window that a stop id or max_new_tokens ends) / emitted
draft tokens; proposed[1] = accepted[1] = tokens emitted from the assistant (replacements and
bonus tokens); rounds = windows and rejections = windows with a replacement (row-events).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jax_specens import vocab
from jax_specens.decoding.loop import (Config, LoopState, Method, Request, advance, emit, feed,
                                       prefill)
from jax_specens.fusion.features import position_features
from jax_specens.fusion.verifier import as_verifier
from jax_specens.sampling import argmax, draw

DRAFT, ASSISTANT = 0, 1


def window(cfg: Config) -> int:
  return cfg.gammas[DRAFT]


def lookahead(cfg: Config) -> int:
  return window(cfg) + 1


def init(models, req: Request, cfg: Config) -> LoopState:
  return prefill(models, req, cfg)


def _set_pending(state: LoopState, at: Int[Array, "B"], tok: Int[Array, "B"]) -> LoopState:
  rows = jnp.arange(tok.shape[0])
  at = jnp.where(state.active, at, state.seq.shape[1])
  return state.replace(seq=state.seq.at[rows, at].set(tok, mode="drop"))


def _draft(models, req: Request, cfg: Config, state: LoopState):
  """K draft passes; returns the state, drafts `[B, K]` and the draft's logits `[B, K, V]`."""
  k = window(cfg)
  c = state.committed(req)
  b, v = c.shape[0], vocab.shared_size(models)
  d_logits, drafts = jnp.zeros((b, k, v), jnp.float32), jnp.zeros((b, k), jnp.int32)
  if cfg.options.bonus:
    # first pass: the tokens the draft has not fed yet (1, or 2 after a bonus token); without
    # bonus tokens it is one token like the others, so the loop below makes it (one compiled
    # sampling site instead of two)
    lag = c - 1 - state.caches[DRAFT].pos
    state, logits, start = feed(state, models, DRAFT, 2, lag + 1)
    first = jnp.take_along_axis(logits, (c - 1 - start)[:, None, None], axis=1)[:, 0]
    state, key = state.next_key()
    tok = draw(key, first, req.sampling)
    state = _set_pending(state, c, tok)
    d_logits, drafts = d_logits.at[:, 0].set(first), drafts.at[:, 0].set(tok)

  def body(j, carry):
    state, d_logits, drafts = carry
    state, logits, _ = feed(state, models, DRAFT, 1, jnp.ones_like(c))
    state, key = state.next_key()
    tok = draw(key, logits[:, 0], req.sampling)
    state = _set_pending(state, c + j, tok)
    return state, d_logits.at[:, j].set(logits[:, 0]), drafts.at[:, j].set(tok)

  return jax.lax.fori_loop(int(cfg.options.bonus), k, body, (state, d_logits, drafts))


def step(models, req: Request, cfg: Config, state: LoopState) -> LoopState:
  k = window(cfg)
  bonus = cfg.options.bonus
  act = state.active
  c = state.committed(req)
  length0 = state.length
  state, d_logits, drafts = _draft(models, req, cfg, state)
  # the assistant scores [last committed, x~_1 .. x~_K]
  state, a_logits, _ = feed(state, models, ASSISTANT, k + 1, jnp.full_like(c, k + 1))
  # x^ is the assistant's top token at any temperature (docs/algorithms.md §4; the verifiers are fit on argmax
  # candidates); only the draft samples
  cands = argmax(a_logits).astype(jnp.int32)  # [B, K + 1]
  feats = position_features([d_logits, a_logits[:, :k]], [drafts, cands[:, :k]])
  verifier = req.extra
  replace = verifier(feats) & (drafts != cands[:, :k])
  replaced = jnp.any(replace, axis=1)
  first = jnp.where(replaced, jnp.argmax(replace, axis=1), k)
  i = jnp.arange(k + 1)[None, :]
  drafts_ext = jnp.concatenate([drafts, cands[:, k:]], axis=1)
  new = jnp.where(i < first[:, None], drafts_ext, cands)
  count = jnp.where(replaced, first + 1, k + int(bonus))
  state = emit(state, req, cfg, new, count)
  # positions: both models have fed the committed prefix minus its last token
  emitted = jnp.where(act, state.length - length0, 0)
  c_new = c + emitted
  state = advance(state, ASSISTANT, c_new - 1)
  state = advance(state, DRAFT, jnp.minimum(c_new - 1, c + k - 1))
  # stats
  from_draft = jnp.minimum(emitted, first)
  from_assistant = emitted - from_draft
  # a row cut short by a stop id or max_new_tokens resolved only the drafts it emitted
  cut = emitted < count
  drafted = jnp.where(act, jnp.where(cut, from_draft, k), 0)
  st = state.stats.count(proposed=jnp.stack([jnp.sum(drafted), jnp.sum(from_assistant)]),
                         accepted=jnp.stack([from_draft, from_assistant], axis=1),
                         rejected=(act & replaced & (emitted > first)).astype(jnp.int32),
                         rounds=jnp.sum(act))
  return state.replace(stats=st)


@dataclasses.dataclass(frozen=True)
class CosdOptions:
  """Static options of cosd. bonus: after a window with no replacement, also emit the
  assistant's next token (its top token from the verification pass)."""

  bonus: bool = False


def prepare(models, options: dict):
  """cosd options: verifier ("rule" | "tree" | "learned" | a verifier object), verifier_path,
  alpha, beta (rule), bonus (emit the assistant's next token after a window with no replacement)."""
  options = dict(options)
  verifier = options.pop("verifier", "rule")
  path = options.pop("verifier_path", None)
  alpha = options.pop("alpha", 0.5)
  beta = options.pop("beta", 0.5)
  bonus = options.pop("bonus", False)
  if options:
    raise ValueError(f"unknown options for method 'cosd': {sorted(options)}; it takes verifier, "
                     "verifier_path, alpha, beta, bonus")
  if not isinstance(bonus, bool):
    raise ValueError(f"bonus must be True or False; got {bonus!r}")
  return as_verifier(verifier, path=path, alpha=alpha, beta=beta), CosdOptions(bonus=bonus)


METHOD = Method(init=init, step=step, uses_draft=True, num_models=(2, 2), speculative=True,
                target=None, lookahead=lookahead, prepare=prepare)
