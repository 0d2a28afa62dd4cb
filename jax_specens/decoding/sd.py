"""Plain speculative decoding (draft + target), lossless w.r.t. the target (docs/algorithms.md §2).

The two-model case of the speculative-ensemble engine (se.py) with target `r = p_target` and
gammas `(gamma, 1)`: the draft proposes gamma tokens, one target pass verifies them; when all are
accepted, the target's own proposal at the next position is accepted with probability 1 — the
"bonus" token. Only the draft's proposals count in `stats.proposed/accepted`.

A draft that reads the target's hidden states (`ModelConfig.feature_input`, EAGLE style) runs the
loop of `sd_features.py` instead: the same lossless rule, fed the target's features.
"""

from __future__ import annotations

from jax_specens.decoding import sd_features, se
from jax_specens.decoding.loop import Method, gammas_per_model


def gammas(gamma, num_models: int) -> tuple[int, ...]:
  if not isinstance(gamma, int):
    raise ValueError(f"sd takes one gamma (the draft's speculation length), got {gamma!r}")
  return gammas_per_model(gamma, 1) + (1,)


def init(models, req, cfg):
  return (sd_features.init if models[0].config.feature_input else se.init)(models, req, cfg)


def step(models, req, cfg, state):
  if models[0].config.feature_input:
    return sd_features.step(models, req, cfg, state)
  return se.step(models, req, cfg, state, counted=(0,))


METHOD = Method(init=init, step=step, uses_draft=True,
                num_models=(2, 2), speculative=True, target=-1, lookahead=se.lookahead,
                gammas=gammas, prepare=se.prepare)  # acceptance_rule=, as se
