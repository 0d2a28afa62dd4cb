"""Preallocated KV cache with one write position per batch row.

Slots `[0, pos[b])` of row b hold the keys/values of the tokens accepted so far. A step writes W
new tokens at slots `pos[b] .. pos[b] + W - 1` and attends with a causal mask on *slot index*, so
slots past a row's position are never read before being rewritten: rolling a row back is only
`cache.replace(pos=new_pos)` — no copy, no clearing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from jax_specens.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """k, v: one array per layer, each `[B, S, H_kv, D]`; pos: `[B]` next write slot per row."""

  k: tuple[Float[Array, "B S K D"], ...]
  v: tuple[Float[Array, "B S K D"], ...]
  pos: Int[Array, "B"]

  @property
  def batch_size(self) -> int:
    return self.pos.shape[0]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def rollback(self, pos: Int[Array, "B"]) -> "KVCache":
    """Moves every row's write position; the stale slots beyond are masked until rewritten."""
    return self.replace(pos=pos.astype(jnp.int32))


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32
) -> KVCache:
  """Zero cache of `max_len` slots per row for `batch_size` rows, every position 0."""
  shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                 pos=jnp.zeros((batch_size,), jnp.int32))


def write(
    cache_k: Float[Array, "B S K D"],
    new: Float[Array, "B W K D"],
    start: Int[Array, "B"],
) -> Float[Array, "B S K D"]:
  """Writes `new` at slots `start[b] + i`; writes past the end of the cache are dropped."""
  b, w = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  cols = start[:, None] + jnp.arange(w)[None, :]
  return cache_k.at[rows, cols].set(new.astype(cache_k.dtype), mode="drop")


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((cache.k, cache.v)))


def check_fits(prompt_len, max_new_tokens: int, cache_len: int, slack: int = 0) -> None:
  """Raises a clear ValueError (before anything is traced) when generation cannot fit the cache.

  prompt_len: the longest prompt (an int, or per-row lengths of which the maximum counts);
  slack: extra slots a method writes past the last kept token (e.g. gamma + 1 for speculation).
  """
  longest = int(np.max(np.asarray(prompt_len)))
  need = longest + int(max_new_tokens) + int(slack)
  if need > cache_len:
    extra = f" + {slack} slots of speculation slack" if slack else ""
    raise ValueError(
        f"prompt of {longest} tokens + max_new_tokens={max_new_tokens}{extra} = {need} tokens do "
        f"not fit a cache of {cache_len} slots; pass cache_len >= {need}, or shorten the prompt "
        "or max_new_tokens")
