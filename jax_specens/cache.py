"""Preallocated KV cache with one write position per batch row.

Slots `[0, pos[b])` of row b hold the keys/values of the tokens accepted so far. A step writes W
new tokens at slots `pos[b] .. pos[b] + W - 1` and attends with a causal mask on *slot index*, so
slots past a row's position are never read before being rewritten: rolling a row back is only
`cache.replace(pos=new_pos)` — no copy, no clearing.

Ring layers. A sliding-window layer (window w) only ever reads the last w positions, so with a
`ring_slack` it keeps `R = w + ring_slack` slots instead of the full length, and position p lives
at slot `p mod R`. A pass attends over the ring as it was before the pass plus its own new keys
(`models/attend.ring`), then writes the new keys. Rollback stays a move of `pos`: a decode writes
at most `lookahead` positions past its committed length c, and never rolls back before c - 1, so a
write at p overwrites position p - R <= c + lookahead - R < c - w: a position no query at or
after c - 1 can see, as long as `ring_slack > lookahead` (`decode` uses lookahead + 2). Wide
passes (a prompt longer than the ring) write only their last R valid positions.

Storage. On CPU a bfloat16 cache is stored as its bits (uint16; `stored_dtype`): XLA's CPU
backend has no bfloat16 dynamic-update-slice or dynamic-slice, so it converted the whole cache
array to float32 and back around every write, at every layer and step (a scanned model's stacked
cache: all its layers at each layer), and before slicing a block of it. Writes go through the
bits; `values` gives the bfloat16 view (a bitcast), which attention takes after slicing.
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
  """k, v: one array per layer, each `[B, S, H_kv, D]` (a ring layer: `[B, R, H_kv, D]`);
  pos: `[B]` next write position per row; ring: per entry, whether it is a ring (static);
  length: the positions a row can hold (S; static: a ring layer holds fewer slots).

  stacked: for a model whose layers are scanned (`models/layout.py`, period P, n repeats), the
  first P entries are stacked `[n, B, S, H_kv, D]`: entry j holds layers j, j + P, ...; the
  others are the tail layers `n * P ..` one array each. 0: one entry per layer.
  """

  k: tuple[Float[Array, "..."], ...]  # [B, _S, K, D], or [n, B, _S, K, D] when stacked
  # (a bfloat16 cache on CPU: uint16 bits, see the module notes and `values`)
  v: tuple[Float[Array, "..."], ...]
  pos: Int[Array, "B"]
  ring: tuple[bool, ...] = flax.struct.field(pytree_node=False)
  length: int = flax.struct.field(pytree_node=False)
  stacked: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def batch_size(self) -> int:
    return self.pos.shape[0]

  @property
  def max_len(self) -> int:
    return self.length

  def rollback(self, pos: Int[Array, "B"]) -> "KVCache":
    """Moves every row's write position; the stale slots beyond are masked until rewritten."""
    return self.replace(pos=pos.astype(jnp.int32))


def ring_slack(lookahead: int) -> int:
  """The ring slack a decode that writes up to `lookahead` positions past its committed length
  gives its sliding layers (module notes: it must exceed lookahead)."""
  return lookahead + 2


def layer_slots(config: ModelConfig, max_len: int, ring_slack: int | None = None
                ) -> tuple[tuple[int, bool], ...]:
  """(slots, is_ring) per layer: sliding layers get a ring of `window + ring_slack` slots when
  that is shorter than `max_len`; every other layer (and every layer when ring_slack is None)
  `max_len` slots."""
  out = []
  for i in range(config.num_layers):
    w = config.window(i)
    ring = ring_slack is not None and w is not None and w + ring_slack < max_len
    out.append((w + ring_slack, True) if ring else (max_len, False))
  return tuple(out)


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32,
    ring_slack: int | None = None, stack: tuple[int, int] | None = None, grad: bool = False,
) -> KVCache:
  """Zero cache of `max_len` positions per row for `batch_size` rows, every position 0.

  ring_slack: give sliding-window layers a ring of `window + ring_slack` slots (module notes:
  it must exceed the most positions a decode writes past its committed length); None: every
  layer keeps `max_len` slots.
  stack: (period P, repeats n) of a model with scanned layers (`models/layout.py`): its first
  n * P layers are kept as P stacked entries; None: one entry per layer.
  grad: the cache is differentiated through (training): stored in `dtype` itself, since the
  bits a bfloat16 cache is otherwise stored in on CPU (`stored_dtype`) carry no gradient.
  """
  layers = layer_slots(config, max_len, ring_slack)
  period, repeats = stack or (0, 0)
  entries = [(repeats, n, r) for n, r in layers[:period]]  # layer j stands for j + i * P
  entries += [(None, n, r) for n, r in layers[period * repeats:]]

  def zeros(lead, n):
    shape = (batch_size, n, config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape if lead is None else (lead,) + shape,
                     jnp.dtype(dtype) if grad else stored_dtype(dtype))

  return KVCache(k=tuple(zeros(lead, n) for lead, n, _ in entries),
                 v=tuple(zeros(lead, n) for lead, n, _ in entries),
                 pos=jnp.zeros((batch_size,), jnp.int32),
                 ring=tuple(r for _, _, r in entries), length=max_len, stacked=period)


def write(
    cache_k: Float[Array, "*L B S K D"],
    new: Float[Array, "B W K D"],
    start: Int[Array, "B"],
    layer: Int[Array, ""] | None = None,
) -> Float[Array, "*L B S K D"]:
  """Writes `new` at slots `start[b] + i`; writes past the end of the cache are dropped.

  layer: for a stacked cache `[n, B, S, K, D]`, the layer written (in place: only the W slots
  per row move)."""
  b, w = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  cols = start[:, None] + jnp.arange(w)[None, :]
  return _set(cache_k, (rows, cols) if layer is None else (layer, rows, cols), new)


def write_ring(
    ring_k: Float[Array, "*L B R K D"],
    new: Float[Array, "B W K D"],
    start: Int[Array, "B"],
    valid: Int[Array, "B"] | None = None,
    layer: Int[Array, ""] | None = None,
) -> Float[Array, "*L B R K D"]:
  """Writes `new[:, i]` (position `start + i`) at ring slot `(start + i) mod R`, for the last R
  of the row's `valid` (default: all W) tokens: the others are dropped, so no slot is written
  twice and a prompt's padding never overwrites its tokens. layer: as in `write`."""
  b, w = new.shape[:2]
  r = ring_k.shape[-3]
  i = jnp.arange(w)[None, :]
  n = jnp.full((b,), w, jnp.int32) if valid is None else valid.astype(jnp.int32)
  keep = (i < n[:, None]) & (i >= n[:, None] - r)
  cols = jnp.where(keep, (start[:, None] + i) % r, r)
  rows = jnp.arange(b)[:, None]
  return _set(ring_k, (rows, cols) if layer is None else (layer, rows, cols), new)


def stored_dtype(dtype) -> jnp.dtype:
  """The dtype a cache of `dtype` values is stored in: bfloat16 as uint16 bits on CPU (module
  notes; measured on SmolLM2 in bfloat16 with the CPU kernel, scanned layers, 256 slots: a step
  16.3 -> 13.7 ms; unrolled, blocked attention at 8192 slots: 47.8 -> 29.0 ms), else `dtype`."""
  if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
    return jnp.dtype(jnp.uint16)
  return jnp.dtype(dtype)


def values(stored: Array) -> Array:
  """A cache array's K or V values: bfloat16 for uint16 bits (a bitcast), else itself."""
  if stored.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(stored, jnp.bfloat16)
  return stored


def _set(cache: Array, index: tuple, new: Array) -> Array:
  """`cache.at[index].set(new)` (out-of-range slots dropped), in place; `new` is converted to
  the cache's values dtype, and to its bits where the cache stores bits."""
  new = new.astype(values(cache).dtype)
  if cache.dtype == jnp.uint16:
    new = jax.lax.bitcast_convert_type(new, jnp.uint16)
  return cache.at[index].set(new, mode="drop")


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


def kv_bytes(config: ModelConfig, batch_size: int, cache_len: int, itemsize: int,
             ring_slack: int | None = None) -> int:
  """Bytes of the K and V caches of one model: 2 x per layer `[B, slots, H_kv, D]` (slots: see
  `layer_slots`)."""
  slots = sum(n for n, _ in layer_slots(config, cache_len, ring_slack))
  return 2 * slots * batch_size * config.num_kv_heads * config.head_dim * itemsize


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
  slack = ring_slack(lookahead)
  kv = sum(kv_bytes(c, batch_size, slots, s, slack) for c, s in zip(configs, itemsizes))
  # bytes per slot of the layers that grow with the cache (ring layers are a fixed size), plus
  # the loop state: output tokens, the token sequence (and se's proposer ids)
  growing = lambda c: sum(not ring for _, ring in layer_slots(c, slots, slack))
  kv_per_slot = sum(2 * growing(c) * batch_size * c.num_kv_heads * c.head_dim * s
                    for c, s in zip(configs, itemsizes))
  per_slot = kv_per_slot + 4 * batch_size * 3
  # per model the float32 logits of the speculation window (se's ring buffer; a pass's logits),
  # and the ring layers (their bytes do not grow with the cache)
  fixed = sum(4 * batch_size * (lookahead + 2) * c.vocab_size for c in configs)
  fixed += kv - kv_per_slot * slots
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
