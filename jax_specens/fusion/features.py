"""Per-position features of two or more models' next-token distributions (docs/algorithms.md §4-5).

Every verifier (rule, tree, learned head) and the learned ensemble weights read the same feature
vector, computed from the models' raw logits at one position (softmax at temperature 1, so a
verifier's decision does not depend on the sampling temperature) and one candidate token per model:

    probs    p_k(c_m) for every model k and every candidate m   (n*n values, row-major in k)
    entropy  H(p_k) in nats                                      (n values)
    margin   top-1 minus top-2 probability of p_k                (n values)
    agree    1 when all candidates are the same token            (1 value)

For CoSD (n = 2, model 0 the draft d, model 1 the assistant a, candidates x~ from the draft and x^
from the assistant) the first four are `p_d(x~), p_d(x^), p_a(x~), p_a(x^)`. For ensemble weights
the candidates are each model's argmax, so the features depend only on the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jax_specens.sampling import argmax

# Indices into a two-model (draft, assistant) feature vector.
P_D_XD, P_D_XA, P_A_XD, P_A_XA = 0, 1, 2, 3
AGREE = -1


def num_features(num_models: int) -> int:
  return num_models * num_models + 2 * num_models + 1


def feature_names(num_models: int = 2) -> tuple[str, ...]:
  """Human-readable names, in feature order (d/a and x~/x^ for two models)."""
  m = ("d", "a") if num_models == 2 else tuple(str(k) for k in range(num_models))
  c = ("x~", "x^") if num_models == 2 else tuple(f"c{k}" for k in range(num_models))
  return (tuple(f"p_{m[k]}({c[j]})" for k in range(num_models) for j in range(num_models))
          + tuple(f"entropy_{m[k]}" for k in range(num_models))
          + tuple(f"margin_{m[k]}" for k in range(num_models)) + ("agree",))


def position_features(
    logits: Sequence[Float[Array, "*P V"]],
    candidates: Sequence[Int[Array, "*P"]],
) -> Float[Array, "*P F"]:
  """Features at every position `*P` (any leading shape) from n models' logits and candidates.

  Args:
    logits: n arrays `[*P, V]` of raw logits (one per model, same vocabulary).
    candidates: n int arrays `[*P]`, model k's candidate token at each position.
  Returns:
    float32 `[*P, n*n + 2n + 1]` in the order documented in the module docstring. NaN-free for
    any finite logits, including distributions with all mass on one token.
  """
  n = len(logits)
  if n < 2 or len(candidates) != n:
    raise ValueError(f"position_features needs n >= 2 models with one candidate each; got "
                     f"{n} logits and {len(candidates)} candidates")
  agree = jnp.all(jnp.stack([c == candidates[0] for c in candidates]), axis=0)
  return translated_features(logits, [list(candidates)] * n, agree)


def translated_features(
    logits: Sequence[Float[Array, "*P V_k"]],
    candidates: Sequence[Sequence[Int[Array, "*P"]]],
    agree: Bool[Array, "*P"],
) -> Float[Array, "*P F"]:
  """`position_features` for models with different vocabularies (cross-tokenizer CoSD).

  candidates[k][m]: candidate m (proposed by model m) written in model k's vocabulary, so that
  `p_k(c_m)` can be read from model k's logits; agree: whether the candidates are the same text.
  """
  return assemble_features([model_features(l, c) for l, c in zip(logits, candidates)], agree)


def model_features(
    logits: Float[Array, "*P V"], candidates: Sequence[Int[Array, "*P"]],
) -> tuple[Float[Array, "*P N"], Float[Array, "*P"], Float[Array, "*P"]]:
  """One model's part of the features: its probabilities of the n candidates `[*P, n]`, its
  entropy and its top-1 margin `[*P]` (so each model's part can be computed where its logits
  live, e.g. inside its own compiled pass; `assemble_features` joins the parts)."""
  # one exp pass over V (V = 262144 for Gemma): z = logits - max, s = sum(exp z); no sort
  lg = logits.astype(jnp.float32)
  top = argmax(lg)[..., None]
  z = lg - jnp.take_along_axis(lg, top, axis=-1)
  e = jnp.exp(z)
  s = jnp.sum(e, axis=-1)
  probs = jnp.stack([jnp.exp(jnp.take_along_axis(z, c.astype(jnp.int32)[..., None], axis=-1))[..., 0]
                     for c in candidates], -1) / s[..., None]
  entropy = jnp.log(s) - jnp.sum(jnp.where(e > 0, e * z, 0.0), axis=-1) / s
  second = jnp.max(jnp.where(jnp.arange(z.shape[-1]) == top, -jnp.inf, z), axis=-1)
  return probs, entropy, (1.0 - jnp.exp(second)) / s


def assemble_features(parts, agree: Bool[Array, "*P"]) -> Float[Array, "*P F"]:
  """The feature vector (module docstring order) from each model's `model_features`."""
  probs = [p[..., m] for p, _, _ in parts for m in range(p.shape[-1])]
  return jnp.stack(probs + [e for _, e, _ in parts] + [m for _, _, m in parts]
                   + [jnp.asarray(agree).astype(jnp.float32)], axis=-1)


def argmax_features(logits: Sequence[Float[Array, "*P V"]]) -> Float[Array, "*P F"]:
  """Prefix-only features: each model's candidate is its own argmax."""
  return position_features(logits, [argmax(l) for l in logits])


def check_features(features, num_models: int = 2, what: str = "features") -> None:
  """Raises a ValueError naming the expected width when `features` has the wrong last axis."""
  want = num_features(num_models)
  shape = getattr(features, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] != want:
    raise ValueError(
        f"{what} must have shape [..., {want}] ({num_models} models: "
        f"{', '.join(feature_names(num_models))}); got shape {shape}. Compute them with "
        "jax_specens.fusion.position_features")
