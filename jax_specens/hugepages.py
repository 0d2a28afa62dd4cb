"""Parameters in 2 MiB pages on a Linux CPU: every decode step streams all of them from memory.

A CPU decode step reads each weight once, a few MiB at a time (SmolLM2's per-layer weights are
0.6-3.5 MiB). XLA's buffers sit in 4 KiB pages, and a stream that crosses a 4 KiB page every
~90 ns pays a page walk each time (in a virtual machine a nested, two-level one). Backed by
transparent huge pages (THP) the same reads go faster: on this 2-core host 90 weights of 1536 x 576
bfloat16 stream at 35-40 GB/s instead of 27-35, and a SmolLM2 token inside the decode loop takes
4-21% less time in float32 and 0-10% in bfloat16 with the CPU kernel (four runs of `bf16_bench
--huge-pages both`, which measures it side by side; `benchmarks/README.md`).

`collapse(tree)` asks Linux (>= 6.1) to move the memory of every CPU array of `tree` into huge
pages now (`madvise(MADV_COLLAPSE)`): the contents do not change, only how they are mapped; it
costs a copy (0.1-1.2 s for SmolLM2's 270-540 MB here, mostly finding free 2 MiB pages).
`load_model` does it for a model on the CPU; `JAX_SPECENS_HUGE_PAGES=0` turns it off. A 2 MiB
page around a buffer's ends also holds its neighbours' bytes, which is harmless: they are mapped
anew, not changed. Where the call is refused (another OS, an older kernel, THP set to `never`, no
free 2 MiB pages) the arrays stay as they are; nothing else depends on it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

import jax

ENV = "JAX_SPECENS_HUGE_PAGES"
PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
MIN_BYTES = 256 << 10  # smaller arrays (norm scales, biases) are not worth a call
ATTEMPTS = 3  # calls per range before a refusal counts (`_ask`)


@dataclasses.dataclass(frozen=True)
class Report:
  """What `collapse` did: buffers asked for, the bytes they hold, and those Linux refused (for a
  buffer holding whole 2 MiB pages, the call for those; else the calls for its ends' pages)."""
  arrays: int = 0  # buffers: an array's addressable shards
  bytes: int = 0
  refused: int = 0


def enabled() -> bool:
  """Whether `load_model` collapses CPU parameters: on Linux unless $JAX_SPECENS_HUGE_PAGES is 0."""
  return sys.platform.startswith("linux") and os.environ.get(ENV, "").strip().lower() not in (
      "0", "false", "no")


def collapse(tree) -> Report:
  """Moves the memory of the CPU arrays (every addressable shard) of `tree` into 2 MiB pages.

  Per buffer: one request for the huge pages wholly inside it, one for each end's page (which it
  shares with whatever lies next to it; refused where that is not mapped), each asked up to
  ATTEMPTS times (`_ask`). Returns a `Report`;
  never raises for a refusal. Arrays on other devices are left alone.
  """
  madvise = _madvise()
  if madvise is None:
    return Report()
  arrays = nbytes = refused = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    if not isinstance(leaf, jax.Array) or leaf.nbytes < MIN_BYTES or leaf.is_deleted():
      continue
    for shard in leaf.addressable_shards:
      if shard.device.platform != "cpu":
        continue
      start = shard.data.unsafe_buffer_pointer()
      end = start + shard.data.nbytes
      inner = (-(-start // PAGE) * PAGE, end // PAGE * PAGE)
      ends = [(start // PAGE * PAGE, inner[0]), (inner[1], -(-end // PAGE) * PAGE)]
      granted = [_ask(madvise, a, b - a)  # a small buffer's one page: one request, not two
                 for a, b in dict.fromkeys(r for r in ends if r[0] < r[1])]
      if inner[0] < inner[1]:  # judged by its own pages: an end's page may reach past the mapping
        granted = [_ask(madvise, inner[0], inner[1] - inner[0])]
      refused += not any(granted)
      arrays += 1
      nbytes += shard.data.nbytes
  return Report(arrays, nbytes, refused)


def _ask(madvise, start: int, length: int) -> bool:
  """MADV_COLLAPSE of [start, start + length), asked up to ATTEMPTS times: Linux refuses now and
  then what it grants on the next call (seen: EINVAL, then EAGAIN, then success, for a fresh jax
  array while XLA's allocator was mapping memory)."""
  return any(madvise(start, length, MADV_COLLAPSE) == 0 for _ in range(ATTEMPTS))


def huge_page_bytes(span: tuple[int, int] | None = None) -> int | None:
  """This process's anonymous memory in transparent huge pages (`/proc/self/smaps_rollup`), or
  that of the mappings overlapping the address range `span` = (start, end) (`/proc/self/smaps`;
  a collapse may split a mapping, e.g. the heap, in several); None where Linux does not say."""
  total, inside = None, span is None
  try:
    with open("/proc/self/smaps_rollup" if span is None else "/proc/self/smaps") as f:
      for line in f:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms .."
          lo, hi = (int(v, 16) for v in head.split("-"))
          inside = span is None or (lo < span[1] and span[0] < hi)
        elif inside and head == "AnonHugePages:":
          total = (total or 0) + (int(line.split()[1]) << 10)
  except (OSError, ValueError, IndexError):
    return None
  return 0 if total is None and span is not None else total


_LIBC: list = []


def _madvise():
  """libc's madvise(addr, length, advice) -> int, or None off Linux / without a libc."""
  if not sys.platform.startswith("linux"):
    return None
  if not _LIBC:
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      fn = libc.madvise
      fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
      fn.restype = ctypes.c_int
    except (OSError, AttributeError):
      fn = None
    _LIBC.append(fn)
  return _LIBC[0]
