"""`Model`: a transformer split once into static structure and a pytree of parameters.

`nnx.split` happens once, when a model is created or loaded; decoding then passes `params` through
`jax.jit` as an ordinary pytree and merges them back inside the compiled program (`step.py`), so no
`nnx.jit` Python work happens per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax_specens.cache import KVCache, init_cache
from jax_specens.models.config import ModelConfig
from jax_specens.models.layers import rows_layout
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
  def rows(self) -> bool:
    """Whether its linear layers' kernels are stored `[d_out, d_in]` (`models/layout.rows_major`,
    the CPU kernel's fastest layout) instead of `[d_in, d_out]`: read from its
    structure (a merge, ~4 ms for SmolLM2; not for decode paths), so it cannot disagree with it."""
    return self.module().rows

  @property
  def stack(self) -> tuple[int, int] | None:
    """(period, repeats) of `config.layer_stack()` when the layers are scanned (the params hold
    a `stack` group: `models/layout.py`); None: unrolled."""
    return self.config.layer_stack() if "stack" in self.params else None

  @property
  def dtype(self):
    return jax.tree_util.tree_leaves(self.params)[0].dtype

  def init_cache(self, batch_size: int, max_len: int, dtype=None,
                 ring_slack: int | None = None, grad: bool = False) -> KVCache:
    """See `jax_specens.cache.init_cache` (ring_slack: ring caches for sliding layers; grad: a
    cache that training differentiates through)."""
    return init_cache(self.config, batch_size, max_len, dtype or self.dtype, ring_slack,
                      self.stack, grad)

  def module(self) -> Transformer:
    return nnx.merge(self.graphdef, self.params)


def from_module(module: Transformer) -> Model:
  graphdef, params = nnx.split(module)
  return Model(config=module.config, graphdef=graphdef, params=params)


def with_attention_block(model: Model, block: int | None) -> Model:
  """The same parameters under `config.attention_block = block` (`models/attend.py`; None:
  always dense): only the static structure changes, so a new program is compiled for it."""
  config = dataclasses.replace(model.config, attention_block=block)
  return model.replace(
      config=config, graphdef=structure(config, model.dtype, model.stack is not None,
                                        model.rows)[0])


def structure(config: ModelConfig, dtype, scan: bool = False, rows: bool = False):
  """`(graphdef, abstract params)` of a transformer (`scan`: with scanned layers, whose
  abstract params are per layer: `models/layout.py` stacks them; `rows`: kernels stored
  `[d_out, d_in]`, `layers.rows_layout`); nothing is allocated."""
  with rows_layout(rows):
    return nnx.split(nnx.eval_shape(
        lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype, scan=scan)))


def create_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Model:
  """A randomly initialised model (normal(0.02) weights; `models.layout.scanned` scans it)."""
  return from_module(Transformer(config, rngs=nnx.Rngs(seed), dtype=dtype))
