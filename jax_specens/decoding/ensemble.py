"""The plain ensemble (the baseline SE accelerates): every model is called once per token.

Each step feeds the last committed token to each of the n models, combines their next-token logits
with the ensemble function into r (docs/algorithms.md §1) and samples one token from r. With one model and the
`select` ensemble this is ordinary autoregressive decoding (`ar`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_specens.decoding.loop import Config, LoopState, Method, Request, emit, feed, prefill
from jax_specens.sampling import sample


def init(models, req: Request, cfg: Config) -> LoopState:
  return prefill(models, req, cfg)


def step(models, req: Request, cfg: Config, state: LoopState) -> LoopState:
  ones = jnp.ones_like(state.length)
  logits = []
  for k in range(len(models)):
    state, lg, _ = feed(state, models, k, 1, ones)
    logits.append(lg[:, 0])
  logr = req.ensemble.target(jnp.stack(logits), req.sampling)
  state, key = state.next_key()
  return emit(state, req, cfg, sample(key, logr)[:, None], ones)


METHOD = Method(init=init, step=step, num_models=(1, None))
