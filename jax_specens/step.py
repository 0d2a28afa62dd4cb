"""Pure step functions: the building blocks of every decoder.

A `Model` (`models/model.py`) is split once: its `graphdef` and `config` are static, its `params`
a pytree of arrays. `forward` is pure and jittable; `prefill`/`step` are its jitted forms with the
cache donated. Inside a decoding loop call `forward` directly (the loop is jitted as a whole).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jax_specens.cache import KVCache
from jax_specens.models.model import Model


def forward(
    model: Model,
    cache: KVCache,
    tokens: Int[Array, "B W"],
    start: Int[Array, "B"],
    valid: Int[Array, "B"] | None = None,
    features: Float[Array, "B W D"] | None = None,
) -> tuple[Float[Array, "B W V"], KVCache]:
  """Scores W tokens per row placed at positions `start[b] .. start[b] + W - 1`.

  Writes their keys/values into those cache slots and returns float32 logits `[B, W, V]` and the
  cache with `pos = start + W`. Rows may use fewer than W of the tokens: moving `pos` back
  (`cache.rollback`) discards the rest. valid: how many of the W tokens are real per row (a
  right-padded prompt); a cache with ring layers needs it for a pass wider than its slack.
  features: a feature-input draft's second input (`ModelConfig.feature_input`).
  """
  logits, _, cache = forward_hidden(model, cache, tokens, start, valid, features)
  return logits, cache


def forward_hidden(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    valid: Int[Array, "B"] | None = None, features: Float[Array, "B W F"] | None = None,
    taps: tuple[int, ...] = (),
) -> tuple[Float[Array, "B W V"], Float[Array, "B W F"], KVCache]:
  """`forward`, also returning the final-normed hidden states `[B, W, D]` the head scored (the
  features a feature-input draft reads), followed by the layers `taps`' normed outputs (a draft
  with `ModelConfig.feature_taps` reads `[B, W, (1 + taps) D]`; `Transformer.hidden`)."""
  start, positions = _positions(start, tokens.shape[1])
  module = model.module()
  x, cache = module.hidden(tokens, positions, cache, valid, features, taps)
  return (module.head(x[..., :module.config.hidden_size]), x,
          cache.replace(pos=start + tokens.shape[1]))


def _positions(start: Int[Array, "B"], width: int) -> tuple[Int[Array, "B"], Int[Array, "B W"]]:
  """int32 `start` and the positions `start[b] + i` of a pass of `width` tokens."""
  start = start.astype(jnp.int32)
  return start, start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]


def forward_rows(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    rows: Int[Array, "B R"], valid: Int[Array, "B"] | None = None,
) -> tuple[Float[Array, "B R V"], KVCache]:
  """`forward`, but the logits only after the fed tokens `rows` (indices into the W): the
  vocabulary head, most of a small model's work per token (and `[B, W, V]` floats of memory for a
  long prompt over a 262k vocabulary), runs on R rows instead of W."""
  start, positions = _positions(start, tokens.shape[1])
  module = model.module()
  x, cache = module.hidden(tokens, positions, cache, valid)
  logits = module.head(jnp.take_along_axis(x, rows[:, :, None], axis=1))
  return logits, cache.replace(pos=start + tokens.shape[1])


def forward_prompt(
    model: Model, cache: KVCache, tokens: Int[Array, "B T"], lengths: Int[Array, "B"]
) -> tuple[Float[Array, "B V"], KVCache]:
  """Prefill right-padded prompts: returns each row's logits after its last prompt token (the
  head runs on that row only) and the cache with `pos = lengths` (the padding written past a
  row's length is never read)."""
  lengths = lengths.astype(jnp.int32)
  last, cache = forward_rows(model, cache, tokens, jnp.zeros_like(lengths), (lengths - 1)[:, None],
                             lengths)
  return last[:, 0], cache.rollback(lengths)


@functools.partial(jax.jit, donate_argnums=1)
def step(model, cache, tokens, start, features=None):
  """Jitted `forward` with the cache donated."""
  return forward(model, cache, tokens, start, features=features)


@functools.partial(jax.jit, donate_argnums=1)
def prefill(model, cache, tokens, lengths):
  """Jitted `forward_prompt` with the cache donated."""
  return forward_prompt(model, cache, tokens, lengths)
