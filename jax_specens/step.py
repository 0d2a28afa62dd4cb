"""Pure step functions: the building blocks of every decoder.

A `Model` is split once (`nnx.split`): its `graphdef` and `config` are static, its `params` a pytree
of arrays. `forward` is pure and jittable; `prefill`/`step` are its jitted forms with the cache
donated. Inside a decoding loop call `forward` directly (the loop is jitted as a whole).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_specens.cache import KVCache, init_cache
from jax_specens.models.config import ModelConfig
from jax_specens.models.transformer import Transformer


@flax.struct.dataclass
class Model:
  """A ready-to-decode model: static structure plus a pytree of parameters.

  A pytree itself (params are its only leaves), so it can be passed through `jax.jit`.
  vocab: the tokenizer it speaks (`jax_specens.vocab.Vocab`, set by `load_model`); None for a
  model built in memory (its whole table is its vocabulary).
  """

  config: ModelConfig = flax.struct.field(pytree_node=False)
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  params: nnx.State
  vocab: Any = flax.struct.field(pytree_node=False, default=None)

  @property
  def dtype(self):
    return jax.tree_util.tree_leaves(self.params)[0].dtype

  def init_cache(self, batch_size: int, max_len: int, dtype=None,
                 ring_slack: int | None = None) -> KVCache:
    """See `jax_specens.cache.init_cache` (ring_slack: ring caches for sliding layers)."""
    return init_cache(self.config, batch_size, max_len, dtype or self.dtype, ring_slack)

  def module(self) -> Transformer:
    return nnx.merge(self.graphdef, self.params)


def from_module(module: Transformer) -> Model:
  graphdef, params = nnx.split(module)
  return Model(config=module.config, graphdef=graphdef, params=params)


def with_attention_block(model: Model, block: int | None) -> Model:
  """The same parameters under `config.attention_block = block` (`models/attend.py`; None:
  always dense): only the static structure changes, so a new program is compiled for it."""
  config = dataclasses.replace(model.config, attention_block=block)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=model.dtype))
  return model.replace(config=config, graphdef=nnx.split(abstract)[0])


def create_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Model:
  """A randomly initialised model (normal(0.02) weights)."""
  return from_module(Transformer(config, rngs=nnx.Rngs(seed), dtype=dtype))


def forward(
    model: Model,
    cache: KVCache,
    tokens: Int[Array, "B W"],
    start: Int[Array, "B"],
    valid: Int[Array, "B"] | None = None,
) -> tuple[Float[Array, "B W V"], KVCache]:
  """Scores W tokens per row placed at positions `start[b] .. start[b] + W - 1`.

  Writes their keys/values into those cache slots and returns float32 logits `[B, W, V]` and the
  cache with `pos = start + W`. Rows may use fewer than W of the tokens: moving `pos` back
  (`cache.rollback`) discards the rest. valid: how many of the W tokens are real per row (a
  right-padded prompt); a cache with ring layers needs it for a pass wider than its slack.
  """
  start = start.astype(jnp.int32)
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  logits, cache = nnx.merge(model.graphdef, model.params)(tokens, positions, cache, valid)
  return logits, cache.replace(pos=start + tokens.shape[1])


def forward_rows(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    rows: Int[Array, "B R"], valid: Int[Array, "B"] | None = None,
) -> tuple[Float[Array, "B R V"], KVCache]:
  """`forward`, but the logits only after the fed tokens `rows` (indices into the W): the
  vocabulary head, most of a small model's work per token (and `[B, W, V]` floats of memory for a
  long prompt over a 262k vocabulary), runs on R rows instead of W."""
  start = start.astype(jnp.int32)
  module = nnx.merge(model.graphdef, model.params)
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
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
def step(model, cache, tokens, start):
  """Jitted `forward` with the cache donated."""
  return forward(model, cache, tokens, start)


@functools.partial(jax.jit, donate_argnums=1)
def prefill(model, cache, tokens, lengths):
  """Jitted `forward_prompt` with the cache donated."""
  return forward_prompt(model, cache, tokens, lengths)
