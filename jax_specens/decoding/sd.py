"""Plain speculative decoding (draft + target), lossless w.r.t. the target (docs/algorithms.md §2).

The two-model case of the speculative-ensemble engine (se.py) with target `r = p_target` and
gammas `(gamma, 1)`: the draft proposes gamma tokens, one target pass verifies them; when all are
accepted, the target's own proposal at the next position is accepted with probability 1 — the
"bonus" token. Only the draft's proposals count in `stats.proposed/accepted`.
"""

from __future__ import annotations

import functools

from jax_specens.decoding import se
from jax_specens.decoding.loop import Method, gammas_per_model


def gammas(gamma, num_models: int) -> tuple[int, ...]:
  if not isinstance(gamma, int):
    raise ValueError(f"sd takes one gamma (the draft's speculation length), got {gamma!r}")
  return gammas_per_model(gamma, 1) + (1,)


METHOD = Method(init=se.init, step=functools.partial(se.step, counted=(0,)), uses_draft=True,
                num_models=(2, 2), speculative=True, target=-1, lookahead=se.lookahead,
                gammas=gammas, prepare=se.prepare)  # acceptance_rule=, as se
