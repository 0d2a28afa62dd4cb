"""Tiny models and a naive reference decoder shared by the decoding tests.

Models are built once per process (`functools.cache`). Weights are scaled up so that next-token
distributions are spread out: greedy decoding then has no near-ties (a different but equally valid
float summation order must not flip an argmax), and sampling tests see non-uniform distributions.

`reference_greedy` is the specification written as plainly as possible: at every step run each
model over the whole prefix (no cache reuse), combine the next-token distributions in numpy exactly
as docs/algorithms.md §1-2 says, take the argmax, append.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens import ModelConfig, create_model
from jax_specens.step import forward_prompt

VOCAB = 64
# ragged batch: lengths 5, 2, 1 (right-padded with 0)
PROMPTS = np.array([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [10, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 1], np.int32)


def config(vocab=VOCAB, hidden=32, layers=1, max_pos=128) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden,
                     intermediate_size=2 * hidden, num_layers=layers, num_heads=4,
                     num_kv_heads=2, head_dim=hidden // 4, max_position_embeddings=max_pos)


def scaled(model, scale: float):
  """Multiplies every matrix of `model` by `scale` (vectors such as norm scales unchanged)."""
  return model.replace(params=jax.tree_util.tree_map(
      lambda x: x * scale if x.ndim >= 2 else x, model.params))


@functools.cache
def models(vocab: int = VOCAB, scale: float = 15.0):
  """Three models over one vocabulary; the third has a different width (shared-vocab variant)."""
  return (scaled(create_model(config(vocab), seed=0), scale),
          scaled(create_model(config(vocab), seed=1), scale),
          scaled(create_model(config(vocab, hidden=48), seed=2), scale))


@functools.partial(jax.jit, static_argnames="width")
def _last_logits(model, tokens, lengths, width):
  cache = model.init_cache(tokens.shape[0], width)
  return forward_prompt(model, cache, tokens, lengths)[0]


def _combine(logits: list[np.ndarray], kind: str, weights, mu: float) -> np.ndarray:
  """docs/algorithms.md §1 at temperature 1, in float64: log r (up to a constant)."""
  ls = [np.asarray(x, np.float64) for x in logits]
  ls = [x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True))
        - x.max(-1, keepdims=True) for x in ls]  # log_softmax
  if kind == "select":
    return ls[-1]
  if kind == "wprob":
    return np.log(sum(w * np.exp(x) for w, x in zip(weights, ls)))
  if kind == "wlogit":
    return sum(w * x for w, x in zip(weights, ls))
  if kind == "contrastive":
    return ls[0] - mu * np.mean(ls[1:], axis=0)
  raise ValueError(kind)


def reference_greedy(ms, prompts, lengths, n: int, kind: str, weights=None, mu=0.1):
  """Greedy decoding of the ensemble target `kind`, recomputing every prefix from scratch."""
  weights = [1.0 / len(ms)] * len(ms) if weights is None else weights
  b, t = prompts.shape
  width = t + n
  seq = np.zeros((b, width), np.int32)
  seq[:, :t] = prompts
  lens = np.asarray(lengths).copy()
  out = np.zeros((b, n), np.int32)
  for i in range(n):
    logits = [np.asarray(_last_logits(m, jnp.asarray(seq), jnp.asarray(lens), width)) for m in ms]
    tok = np.argmax(_combine(logits, kind, weights, mu), axis=-1)
    out[:, i] = tok
    seq[np.arange(b), lens] = tok
    lens = lens + 1
  return out
