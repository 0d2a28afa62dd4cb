"""Preallocated KV cache with one write position per batch row.

Slots `[0, pos[b])` of row b hold the keys/values of the tokens accepted so far. A step writes W
new tokens at slots `pos[b] .. pos[b] + W - 1` and attends with a causal mask on *slot index*, so
slots past a row's position are never read before being rewritten: rolling a row back is only
`cache.replace(pos=new_pos)` — no copy, no clearing.
"""

from __future__ import annotations

import os

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


def kv_bytes(config: ModelConfig, batch_size: int, cache_len: int, itemsize: int) -> int:
  """Bytes of the K and V caches of one model: 2 x layers x `[B, S, H_kv, D]`."""
  return (2 * config.num_layers * batch_size * cache_len * config.num_kv_heads * config.head_dim
          * itemsize)


def available_memory() -> tuple[int | None, str]:
  """(bytes free, where): on an accelerator its `memory_stats()` limit minus what is in use; on
  CPU the system's available memory (/proc/meminfo MemAvailable, else sysconf). None: unknown."""
  dev = jax.local_devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
      return free, f"{dev.platform} device {dev.id}"
    return None, dev.platform
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "system memory"
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system memory"
  except (ValueError, OSError, AttributeError):
    return None, "system memory"


def check_memory(configs, itemsizes, batch_size: int, prompt_width: int, max_new_tokens: int,
                 lookahead: int = 0, cache_len: int | None = None, devices: int = 1,
                 available: int | None = None, cli: bool = False) -> None:
  """Raises ValueError (one line: what it needs, what is free, what to change) when the KV caches
  and loop state of a decode cannot fit the memory of the device, before anything is allocated.

  configs / itemsizes: each model's config and parameter dtype size (its cache dtype);
  devices: devices the batch and heads are split over (an accelerator mesh: each holds 1/devices);
  available: bytes free (default: `available_memory()`; nothing is checked when unknown).
  cli: name the command-line flags in the message instead of the Python arguments.
  """
  where = "the device"
  if available is None:
    available, where = available_memory()
    if available is None:
      return
    if jax.local_devices()[0].platform == "cpu":
      devices = 1  # simulated CPU devices share the host's memory
  slots = prompt_width + max_new_tokens + lookahead if cache_len is None else cache_len
  per_slot = sum(kv_bytes(c, batch_size, 1, s) for c, s in zip(configs, itemsizes))
  # loop state: output tokens, the token sequence (and se's proposer ids), and per model the
  # float32 logits of the speculation window (se's ring buffer; a pass's logits)
  per_slot += 4 * batch_size * 3
  fixed = sum(4 * batch_size * (lookahead + 2) * c.vocab_size for c in configs)
  need = (per_slot * slots + fixed) // max(devices, 1)
  if need <= available:
    return
  fit = (available * max(devices, 1) - fixed) // per_slot - prompt_width - lookahead
  arg = "--max-new-tokens" if cli else "max_new_tokens"
  hint = (f"lower {arg} to at most {fit}" if fit >= 1 else
          "use fewer or smaller models, or a device with more memory")
  raise ValueError(
      f"this decode needs about {need / 2**30:.1f} GiB for its KV caches and loop state "
      f"({len(configs)} model(s), batch {batch_size}, {slots} slots per row) but {where} has "
      f"{available / 2**30:.1f} GiB free; {hint}, or a smaller batch")


def check_positions(configs, prompt_len: int, max_new_tokens: int, allow: bool = False,
                    cli: bool = False) -> None:
  """Raises ValueError when prompt + max_new_tokens goes past a model's `max_position_embeddings`
  (its trained context), unless `allow` (allow_past_max_positions=True, `--allow-long`).
  cli: name the command-line flags in the message instead of the Python arguments."""
  need = int(prompt_len) + int(max_new_tokens)
  arg, allow_arg = (("--max-new-tokens", "--allow-long") if cli else
                    ("max_new_tokens", "allow_past_max_positions=True"))
  for c in configs:
    if need > c.max_position_embeddings and not allow:
      raise ValueError(
          f"a prompt of {prompt_len} token(s) + {arg} {max_new_tokens} = {need} positions exceed "
          f"the {c.max_position_embeddings} positions the {c.family} model was trained for; "
          f"lower {arg} to at most {c.max_position_embeddings - int(prompt_len)}, or pass "
          f"{allow_arg} to decode past them anyway")
