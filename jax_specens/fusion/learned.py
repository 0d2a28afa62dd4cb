"""The "learned" ensemble function (docs/algorithms.md §1, §5): weighted probabilities with per-position weights.

    r = sum_k lambda_k(prefix) p_k,   lambda = softmax(head(argmax features of the n models))

The features are the models' own distributions at the position and their argmax candidates, so
lambda depends on the prefix only and speculative ensembles that verify against `r` stay lossless.
`LearnedEnsemble` has the signature of `jax_specens.ensemble_fns` functions and is a pytree, so
`decode(..., ensemble=LearnedEnsemble(head))` traces the head's weights (no recompile per head).
"""

from __future__ import annotations

import os

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jax_specens.ensemble_fns import logsumexp_models
from jax_specens.fusion.features import argmax_features
from jax_specens.fusion.head import FusionHeadFn, load_head
from jax_specens.sampling import SamplingParams, log_probs


@flax.struct.dataclass
class LearnedEnsemble:
  """fn(logits `[N, B, ..., V]`, SamplingParams) -> log r `[B, ..., V]` with a weights head."""

  head: FusionHeadFn

  def weights(self, logits: Float[Array, "N B *P V"]) -> Float[Array, "B *P N"]:
    """lambda at every position, from the models' temperature-1 distributions."""
    return self.head.weights(argmax_features(list(logits)))

  def __call__(self, logits: Float[Array, "N B *P V"], params: SamplingParams
               ) -> Float[Array, "B *P V"]:
    n = logits.shape[0]
    if n != self.head.config.num_models:
      raise ValueError(f"this weights head was trained for {self.head.config.num_models} models "
                       f"but the ensemble has {n}")
    lam = jnp.moveaxis(self.weights(logits), -1, 0)[..., None]  # [N, B, *P, 1]
    logp = jax.vmap(log_probs, in_axes=(0, None))(logits, params)
    return logsumexp_models(logp + jnp.log(jnp.maximum(lam, 1e-30)))


def learned_ensemble(path: str | os.PathLike) -> LearnedEnsemble:
  """Loads a weights head (a `train-fusion --head weights` output, or its weights_head/ dir)."""
  from pathlib import Path
  p = Path(path)
  if (p / "weights_head").is_dir():
    p = p / "weights_head"
  head = load_head(p)
  if head.config.kind != "weights":
    raise ValueError(f"{path} holds a verifier head, not ensemble weights; train one with "
                     "`jax-specens train-fusion --head weights` (or both)")
  return LearnedEnsemble(head)
