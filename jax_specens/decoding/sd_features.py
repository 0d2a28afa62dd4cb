"""Speculative decoding with a draft that reads the target's hidden states (EAGLE style).

A feature-input draft (`ModelConfig.feature_input`, built by `jax_specens.draft.model`) takes,
beside each token x_i, the feature of the position before it: the final-normed hidden state that
the head scores there. For committed tokens that is the target's own, f_{i-1}; along its chain of
proposals, the draft's own last output. The target's features come for free with its
verification pass. The output stays exactly the target's distribution (docs/algorithms.md §2):
the draft only changes which tokens are proposed.

One loop step per row, with c committed tokens (`seq[:c]`), the target having fed c - 1 of them
and the draft d (d = the previous step's c; at the start `prompt_len - 1` for both):
  1. catch-up: the draft feeds `seq[d:c]` (what the last verification committed, 1..gamma+1
     tokens) with the target's features f_{d-1} .. f_{c-2}, and proposes x_c from its output at
     position c - 1;
  2. gamma - 1 chain passes of one token: the last proposal with the draft's last output as its
     feature, each proposing the next token;
  3. the target feeds `[x_{c-1}, proposals]` (gamma + 1 tokens): its logits for positions
     c .. c + gamma, and its features f_{c-1} .. f_{c+gamma-1}, kept in a ring by position;
  4. `acceptance.verify_logits` checks the gamma proposals at once: the accepted ones are
     emitted, then the residual draw at the first rejection or the target's bonus token after all
     gamma (greedy rows: ids only); the target's cache moves back to the new last token, the
     draft's to c (its chain's K/V are rewritten from the target's features by the next catch-up).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jax_specens import acceptance, vocab
from jax_specens.decoding.loop import LoopState, Request, Config, emit, prefill_hidden
from jax_specens.sampling import draw_with_dist
from jax_specens.step import forward_hidden


@flax.struct.dataclass
class FeatureState:
  """ring `[B, R, F]`: the target's feature of position s at `ring[:, s % R]` (R = gamma + 1;
  F = D, or (1 + taps) D for a draft with `feature_taps`)."""

  ring: Float[Array, "B R F"]


def init(models, req: Request, cfg: Config) -> LoopState:
  state, hidden = prefill_hidden(models, req, cfg)  # hidden: the target's, `[B, T, F]`
  b = hidden.shape[0]
  r = cfg.gammas[0] + 1
  last = req.prompt_lengths.astype(jnp.int32) - 2  # f_{c-2}: the first catch-up's feature
  ring = jnp.zeros((b, r, hidden.shape[-1]), jnp.float32)
  f = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  ring = ring.at[jnp.arange(b), last % r].set(jnp.where(last[:, None] >= 0, f, 0.0))
  return state.replace(extra=FeatureState(ring=ring))


def step(models, req: Request, cfg: Config, state: LoopState) -> LoopState:
  draft, target = models
  g = cfg.gammas[0]
  r = g + 1
  size = vocab.shared_size(models)
  ring = state.extra.ring
  b, s = state.seq.shape
  rows = jnp.arange(b)
  act = state.active
  c = state.committed(req)
  at = lambda pos: jnp.where(act, pos, 0)  # noqa: E731  finished rows run at 0 and never move

  # 1. catch-up: seq[d:c] with the target's features of the positions before them
  dcache = state.caches[0]
  d = dcache.pos
  pos = d[:, None] + jnp.arange(g + 1)[None, :]
  tokens = jnp.take_along_axis(state.seq, jnp.clip(pos, 0, s - 1), axis=1)
  feats = jnp.where((pos >= 1)[..., None], ring[rows[:, None], (pos - 1) % r], 0.0)
  logits, x, dcache = forward_hidden(draft, dcache, tokens, at(d), features=feats)
  last = jnp.clip(c - d - 1, 0, g)[:, None, None]
  logits = vocab.restrict(jnp.take_along_axis(logits, last, axis=1)[:, 0], size)
  feat = jnp.take_along_axis(x, last, axis=1)[:, 0]
  state, key = state.next_key()
  custom = cfg.options.acceptance_rule is not None  # a rule of the user's reads every logq
  tok0, logq0 = draw_with_dist(key, logits, req.sampling, custom)  # logq0: see step 4

  # 2. the chain: gamma - 1 passes of one token on the draft's own features
  def chain(carry, key):
    cache, tok, feat, pos = carry
    logits, x, cache = forward_hidden(draft, cache, tok[:, None], at(pos),
                                      features=feat[:, None])
    nxt, logq = draw_with_dist(key, vocab.restrict(logits[:, 0], size), req.sampling, custom)
    return (cache, nxt, x[:, 0], pos + 1), (nxt, logq)

  state, key = state.next_key()
  (dcache, _, _, _), (toks, logqs) = jax.lax.scan(chain, (dcache, tok0, feat, c),
                                                   jax.random.split(key, g - 1))
  proposals = jnp.concatenate([tok0[:, None], jnp.moveaxis(toks, 0, 1)], axis=1)  # B g
  logq = jnp.concatenate([logq0[:, None], jnp.moveaxis(logqs, 0, 1)], axis=1)  # B g V
  dcache = dcache.rollback(jnp.where(act, c, d))

  # 3. the target verifies: [x_{c-1}, proposals] at c - 1 .. c + g - 1, keeping its features
  tcache = state.caches[1]
  tpos = tcache.pos
  tokens = jnp.concatenate([state.seq[rows, jnp.maximum(c - 1, 0)][:, None], proposals], axis=1)
  logits, x, tcache = forward_hidden(target, tcache, tokens, at(c - 1),
                                     taps=draft.config.feature_taps)
  slots = jnp.where(act[:, None], (c[:, None] - 1 + jnp.arange(g + 1)[None, :]) % r, r)
  ring = ring.at[rows[:, None], slots].set(x.astype(jnp.float32), mode="drop")
  logits = vocab.restrict(logits, size)  # B g+1 V

  # 4. verification and emission (when every row is greedy the ids decide)
  state, key = state.next_key()
  v, bonus = acceptance.verify_logits(key, proposals, logq, logits, jnp.where(act, g, 0),
                                      req.sampling, cfg.options.acceptance_rule)
  a = v.num_accepted
  j = jnp.arange(g + 1)[None, :]
  last_tok = jnp.where(v.rejected, v.token, bonus)
  new = jnp.where(j < a[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), last_tok[:, None])
  tcache = tcache.rollback(jnp.where(act, c + a, tpos))
  state = state.replace(caches=(dcache, tcache), extra=FeatureState(ring=ring))
  state = state.count_call(0).count_call(1)
  state = state.replace(stats=state.stats.replace(
      model_calls=state.stats.model_calls.at[0].add(g - 1)))
  length0 = state.length
  state = emit(state, req, cfg, new, a + 1)
  # stats count what was emitted: a stop id or max_new_tokens may cut the accepted run short
  e = state.length - length0
  a_out = jnp.minimum(a, e)
  rej = v.rejected & (e > a)
  proposed = jnp.where(act, jnp.where(rej, g, a_out), 0)
  st = state.stats.count(proposed=jnp.stack([jnp.sum(proposed), 0]),
                         accepted=jnp.stack([a_out, jnp.zeros_like(a_out)], axis=1),
                         rejected=rej.astype(jnp.int32), rounds=jnp.sum(act))
  return state.replace(stats=st)
