"""Choosing a CoSD verifier by name (docs/algorithms.md §4).

A verifier is any pytree with `__call__(features [*P, F]) -> bool [*P]` ("replace the draft's
token here") and `scores(features) -> float [*P]` (a replace score in [0, 1], used for AUC). The
decoding loop additionally keeps every position where both models agree, whatever it says.
"""

from __future__ import annotations

import os
from pathlib import Path

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jax_specens.fusion.head import FusionHeadFn, load_head
from jax_specens.fusion.rule import RuleVerifier
from jax_specens.fusion.tree import TREE_FILE, TreeVerifier

VERIFIERS = ("rule", "tree", "learned")


@flax.struct.dataclass
class ConstantVerifier:
  """Always replaces (`replace=True`) or never does: CoSD then reduces to one model's output."""

  replace: bool = flax.struct.field(pytree_node=False, default=False)

  def scores(self, features: Float[Array, "*P F"]) -> Float[Array, "*P"]:
    return jnp.full(features.shape[:-1], float(self.replace), jnp.float32)

  def __call__(self, features: Float[Array, "*P F"]) -> Bool[Array, "*P"]:
    return jnp.full(features.shape[:-1], self.replace, bool)


def load_verifier(kind: str = "rule", path: str | os.PathLike | None = None, *,
                  alpha: float = 0.5, beta: float = 0.5):
  """The verifier named `kind`: "rule" (alpha, beta), "tree" or "learned" (loaded from `path`).

  `path` may be the output directory of `jax-specens train-fusion` (holding tree.json and head/),
  or the tree file / head directory itself.
  """
  if kind not in VERIFIERS:
    raise ValueError(f"unknown verifier {kind!r}; choose one of {', '.join(VERIFIERS)}")
  if kind == "rule":
    if not (0.0 <= alpha <= 1.0) or beta < 0.0:
      raise ValueError(f"the rule needs 0 <= alpha <= 1 and beta >= 0; got alpha={alpha}, "
                       f"beta={beta}")
    return RuleVerifier(alpha=jnp.float32(alpha), beta=jnp.float32(beta))
  if path is None:
    raise ValueError(f"the {kind} verifier needs a trained checkpoint: pass verifier_path "
                     "(--verifier-path) pointing at the output of `jax-specens train-fusion`")
  if not Path(path).exists():
    raise FileNotFoundError(f"verifier checkpoint {path} does not exist; train one with "
                            "`jax-specens train-fusion --draft DIR --model DIR --data FILE --out OUT`")
  if kind == "tree":
    return TreeVerifier.load(path)
  head = load_head(path)
  if head.config.kind != "verifier":
    raise ValueError(f"{path} holds an ensemble-weights head, not a verifier head; pass the "
                     "train-fusion output directory or its head/ folder")
  return head


def as_verifier(verifier, *, path=None, alpha: float = 0.5, beta: float = 0.5):
  """A verifier object from a name (see `load_verifier`) or an object already callable."""
  if isinstance(verifier, str):
    return load_verifier(verifier, path, alpha=alpha, beta=beta)
  if isinstance(verifier, FusionHeadFn | TreeVerifier | RuleVerifier | ConstantVerifier) or (
      callable(verifier) and hasattr(verifier, "scores")):
    return verifier
  raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)} or a verifier object "
                   f"(RuleVerifier, TreeVerifier, FusionHeadFn); got {verifier!r}")


__all__ = ["VERIFIERS", "ConstantVerifier", "load_verifier", "as_verifier", "TREE_FILE"]
