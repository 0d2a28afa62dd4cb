"""The plain ensemble (the baseline SE accelerates): every model is called once per token.

Each step feeds the last committed token to each of the n models, combines their next-token logits
with the ensemble function into r (docs/algorithms.md §1) and samples one token from r. With one model and the
`select` ensemble this is ordinary autoregressive decoding (`ar`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_specens.decoding.loop import Config, LoopState, Method, Request, emit, feed, prefill


def init(models, req: Request, cfg: Config) -> LoopState:
  return prefill(models, req, cfg)


def step(models, req: Request, cfg: Config, state: LoopState) -> LoopState:
  ones = jnp.ones_like(state.length)
  logits = []
  for k in range(len(models)):
    state, lg, _ = feed(state, models, k, 1, ones)
    logits.append(lg[:, 0])
  state, key = state.next_key()
  tok = req.ensemble.draw(key, jnp.stack(logits), req.sampling)
  return emit(state, req, cfg, tok[:, None], ones)


METHOD = Method(init=init, step=step, num_models=(1, None))
