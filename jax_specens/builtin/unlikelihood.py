"""Unlikelihood training against repetition (Welleck et al. 2019, "Neural text generation with
unlikelihood training"), for the built-in models.

Small models trained on cross-entropy alone loop under greedy decoding ("the number of the number
of ..."). Two terms push probability away from repeats:

- **token level**, during training (`token_term`): at every position t, each distinct token of the
  context x_0..x_t other than the true next one is a negative candidate,
  `-sum_c log(1 - p_t(c))`;
- **sequence level**, in a short fine-tune after it (`sequence_term`): the model continues
  training prefixes greedily, and every token of its own continuation that completes an n-gram
  already in that continuation (`repeated_ngrams`) is a negative, `-log(1 - p_t(x_t))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


def _log_not_p(log_p: jax.Array) -> jax.Array:
  """log(1 - p) from log p, clipped so that p = 1 gives a finite value (and no gradient)."""
  return jnp.log(jnp.clip(-jnp.expm1(log_p), 1e-5))


def token_term(logits: Float[Array, "B T V"], inputs: Int[Array, "B T"],
               targets: Int[Array, "B T"]) -> jax.Array:
  """Mean over positions t of -sum over c in C_t of log(1 - p_t(c)), C_t the distinct tokens of
  `inputs[:, :t+1]` other than `targets[:, t]`.

  Computed on the `[B, T, T]` pairs (t, s) rather than a `[B, T, V]` mask: context token s counts
  at t when s <= t < the next occurrence of the same token (so each distinct token once).
  """
  steps = inputs.shape[1]
  idx = jnp.arange(steps)
  same = inputs[:, :, None] == inputs[:, None, :]                            # B s s'
  next_same = jnp.where(same & (idx[None, None, :] > idx[None, :, None]), idx, steps).min(-1)
  live = ((idx[None, None, :] <= idx[None, :, None])                        # B t s: s <= t
          & (idx[None, :, None] < next_same[:, None, :])                    # last copy of it
          & (inputs[:, None, :] != targets[:, :, None]))                    # not the true token
  log_p = (jnp.take_along_axis(logits, jnp.broadcast_to(inputs[:, None, :], live.shape), axis=-1)
           - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  return -jnp.where(live, _log_not_p(log_p), 0.0).sum(-1).mean()


def repeated_ngrams(tokens: Int[np.ndarray, "B T"], start: int, n: int) -> Bool[np.ndarray, "B T"]:
  """True at position t >= start + n - 1 when the n-gram `tokens[t-n+1 : t+1]` already ended at
  an earlier position of `tokens[start:]` (all n of its tokens inside the continuation)."""
  mask = np.zeros(tokens.shape, bool)
  for b, row in enumerate(np.asarray(tokens).tolist()):
    seen = set()
    for t in range(start + n - 1, len(row)):
      gram = tuple(row[t - n + 1:t + 1])
      mask[b, t] = gram in seen
      seen.add(gram)
  return mask


def sequence_term(logits: Float[Array, "B T V"], targets: Int[Array, "B T"],
                  negative: Bool[Array, "B T"]) -> jax.Array:
  """Sum over the `negative` positions of -log(1 - p_t(targets_t)), over the positions counted."""
  log_p = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
           - jax.nn.logsumexp(logits, axis=-1))
  return -jnp.where(negative, _log_not_p(log_p), 0.0).sum() / negative.size
