"""Teacher-forced scoring of held-out text: fixed windows, batched jitted forward passes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jax_specens.models.model import Model
from jax_specens.step import forward


def windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Consecutive, non-overlapping `[N, seq_len + 1]` windows from the start of a token stream.

  Each window's first `seq_len` tokens are inputs, its last `seq_len` the targets. Deterministic.
  """
  n = (len(stream) - 1) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  if n < 1:
    raise ValueError(f"the token stream has {len(stream)} tokens, fewer than one window of "
                     f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more text")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return np.asarray(stream, np.int32)[idx]


@jax.jit
def teacher_forced_logits(model: Model, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
  """Float32 next-token logits at every position of every row (all rows start at position 0)."""
  b, t = tokens.shape
  cache = model.init_cache(b, t)
  logits, _ = forward(model, cache, tokens, jnp.zeros((b,), jnp.int32))
  return logits


def padded_chunks(wins: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(`[batch_size, ...]` windows, number of real rows): the last chunk is padded by repeating its
  last window, so every chunk has one compiled shape."""
  for i in range(0, len(wins), batch_size):
    chunk = wins[i:i + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
    yield chunk, real


def batches(wins: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(inputs, targets) of `padded_chunks`; the padding is cut from the targets (rows = real)."""
  for chunk, real in padded_chunks(wins, batch_size):
    yield chunk[:, :-1], chunk[:real, 1:]


def token_nll(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, "B T"]:
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], -1)[..., 0]


def mean_nll(models: Sequence[Model], wins: np.ndarray, batch_size: int = 16) -> list[float]:
  """Mean next-token negative log-likelihood (nats) of each model over the windows."""
  totals = np.zeros(len(models))
  count = 0
  for inputs, targets in batches(wins, batch_size):
    for k, model in enumerate(models):
      logits = teacher_forced_logits(model, jnp.asarray(inputs))[:len(targets)]
      totals[k] += float(token_nll(logits, jnp.asarray(targets)).sum())
    count += targets.size
  return list(totals / count)
