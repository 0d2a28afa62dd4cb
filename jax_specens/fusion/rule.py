"""The CoSD rule verifier (docs/algorithms.md §4, paper defaults alpha = beta = 0.5).

Replace the draft's token x~ by the assistant's x^ iff

    x~ != x^   and   p_d(x~) < alpha   and   p_a(x^) > beta * p_d(x~).
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jax_specens.fusion import features as F


def rule_replace(
    features: Float[Array, "*P F"], alpha: float | Array = 0.5, beta: float | Array = 0.5
) -> Bool[Array, "*P"]:
  """The rule on two-model features (see `features.position_features`); alpha, beta may be traced."""
  p_d = features[..., F.P_D_XD]
  p_a = features[..., F.P_A_XA]
  disagree = features[..., F.AGREE] < 0.5
  return disagree & (p_d < alpha) & (p_a > beta * p_d)


@flax.struct.dataclass
class RuleVerifier:
  """`rule_replace` as a verifier pytree: alpha and beta are leaves (new values do not recompile)."""

  alpha: Float[Array, ""] = 0.5
  beta: Float[Array, ""] = 0.5

  def scores(self, features: Float[Array, "*P F"]) -> Float[Array, "*P"]:
    """1.0 where the rule replaces, else 0.0."""
    return rule_replace(features, self.alpha, self.beta).astype(jnp.float32)

  def __call__(self, features: Float[Array, "*P F"]) -> Bool[Array, "*P"]:
    return rule_replace(features, self.alpha, self.beta)
