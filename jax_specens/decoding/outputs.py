"""What every decode returns (docs/algorithms.md §6): tokens, lengths, finish reasons and statistics."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

FINISH_REASONS = ("running", "stop", "length", "cache_full")
RUNNING, STOP, LENGTH, CACHE_FULL = range(len(FINISH_REASONS))


@flax.struct.dataclass
class DecodeStats:
  """Counters of one decode, summed over the batch (the `row_` ones per row).

  model_calls: `[N]` batched forward passes of each model inside the loop (prefill not counted);
    models in method order (sd: draft, target; se/ensemble: as given).
  proposed: `[N]` speculated tokens resolved (accepted, or rejected/discarded), by proposing model.
  accepted: `[N]` of those, the accepted ones.
  rounds: verifications that checked at least one token (row-events): mean accepted length is
    `accepted / rounds`.
  steps: iterations of the decode loop.
  row_accepted: `[B]` the `accepted` tokens of each row, summed over models.
  row_rejections: `[B]` rounds of each row that ended by replacing a proposal: sd / se, a rejected
    token replaced by a residual draw; cosd, a window in which the assistant replaced a draft
    token. `rejections` is their sum. Rows of one batch accept at different rates (their texts
    differ), and the loop runs until the slowest row is done
    (`jax_specens.pricing.expected_steps` takes one alpha per row).
  """

  model_calls: Int[Array, "N"]
  proposed: Int[Array, "N"]
  accepted: Int[Array, "N"]
  rounds: Int[Array, ""]
  steps: Int[Array, ""]
  row_accepted: Int[Array, "B"]
  row_rejections: Int[Array, "B"]

  @classmethod
  def zeros(cls, num_models: int, batch_size: int) -> "DecodeStats":
    z, rows = jnp.zeros((num_models,), jnp.int32), jnp.zeros((batch_size,), jnp.int32)
    return cls(model_calls=z, proposed=z, accepted=z, rounds=jnp.int32(0), steps=jnp.int32(0),
               row_accepted=rows, row_rejections=rows)

  def count(self, proposed: Int[Array, "N"], accepted: Int[Array, "B N"],
            rejected: Int[Array, "B"], rounds: Int[Array, ""]) -> "DecodeStats":
    """Adds one verification: `proposed` resolved per model, `accepted` per row and model,
    `rejected` rounds per row, `rounds` row-events."""
    row_accepted = jnp.sum(accepted, axis=1)
    return self.replace(proposed=self.proposed + proposed,
                        accepted=self.accepted + jnp.sum(accepted, axis=0),
                        rounds=self.rounds + rounds,
                        row_accepted=self.row_accepted + row_accepted,
                        row_rejections=self.row_rejections + rejected)

  @property
  def rejections(self) -> Int[Array, ""]:
    """Rounds that ended by replacing a proposal, over all rows (row-events)."""
    return jnp.sum(self.row_rejections)

  @property
  def acceptance_rate(self) -> float:
    p = int(np.sum(self.proposed))
    return float(np.sum(self.accepted)) / p if p else float("nan")

  @property
  def mean_accepted_length(self) -> float:
    r = int(self.rounds)
    return float(np.sum(self.accepted)) / r if r else float("nan")

  def to_dict(self) -> dict:
    rate = self.acceptance_rate
    return {
        "model_calls": [int(x) for x in np.asarray(self.model_calls)],
        "proposed": int(np.sum(self.proposed)),
        "accepted": int(np.sum(self.accepted)),
        "acceptance_rate": None if np.isnan(rate) else rate,
        "mean_accepted_length": (None if np.isnan(self.mean_accepted_length)
                                 else self.mean_accepted_length),
        "rounds": int(self.rounds),
        "rejections": int(self.rejections),
        "steps": int(self.steps),
        "row_accepted": [int(x) for x in np.asarray(self.row_accepted)],
        "row_rejections": [int(x) for x in np.asarray(self.row_rejections)],
    }


@flax.struct.dataclass
class DecodeOutput:
  """tokens: `[B, max_new_tokens]`, entries past `lengths[b]` are 0; lengths: `[B]` generated
  tokens per row (a stop token is included); finish_reason: `[B]` index into FINISH_REASONS;
  wall_time: seconds, set when `decode` ran outside any jit (None otherwise); gamma_choice: what
  gamma="auto" chose (`jax_specens.autogamma.GammaChoice`), None for an explicit gamma."""

  tokens: Int[Array, "B N"]
  lengths: Int[Array, "B"]
  finish_reason: Int[Array, "B"]
  stats: DecodeStats
  wall_time: float | None = flax.struct.field(pytree_node=False, default=None)
  gamma_choice: Any = flax.struct.field(pytree_node=False, default=None)

  def finish_reasons(self) -> list[str]:
    return [FINISH_REASONS[int(i)] for i in np.asarray(self.finish_reason)]

  def to_lists(self) -> list[list[int]]:
    """Each row's generated tokens, trimmed to its length."""
    toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
    return [toks[b, :lens[b]].tolist() for b in range(toks.shape[0])]

  def to_dict(self) -> dict:
    stats = self.stats.to_dict()
    if self.wall_time is not None:
      stats["wall_time_s"] = self.wall_time
      stats["tokens_per_s"] = float(np.sum(self.lengths)) / max(self.wall_time, 1e-9)
    if self.gamma_choice is not None:
      stats["gamma_auto"] = self.gamma_choice.to_dict()
    return {"tokens": self.to_lists(), "lengths": [int(x) for x in np.asarray(self.lengths)],
            "finish_reasons": self.finish_reasons(), "stats": stats}
