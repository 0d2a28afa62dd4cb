"""A fast GGUF parser: metadata as Python values, tensors as memory-mapped numpy views.

`gguf.GGUFReader` builds a numpy memmap per metadata item, which takes tens of seconds for the
hundreds of thousands of vocabulary strings of a real model; this reads the same layout
(gguf.md: header, key/values, tensor infos, aligned data) with `struct` in well under a second.
Types, block sizes and dequantization still come from the `gguf` package.

    Reader(path).fields   {"general.architecture": "llama", "tokenizer.ggml.tokens": [...], ...}
    Reader(path).tensors  [Tensor(name, tensor_type, shape (innermost first), data, ...), ...]

Errors are ValueError: bad magic or version, truncated header or data, unknown ggml type ids.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class Tensor(NamedTuple):
  """One tensor: `shape` lists dimensions innermost first (ggml's `ne`), as gguf-py does."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]
  data_offset: int
  n_bytes: int
  data: np.ndarray  # F32/F16: typed [outer..., inner]; others: uint8 [outer..., bytes per row]


class Reader:
  """Parses `path` (see the module docstring); raises ValueError for a malformed file."""

  def __init__(self, path):
    import gguf
    self.path = Path(path)
    self._mm = np.memmap(self.path, np.uint8, mode="r")
    self._buf = memoryview(self._mm)  # slicing a memmap is slow, a memoryview is not
    self._off = 0
    try:
      if bytes(self._mm[:4]) != b"GGUF":
        raise ValueError("bad magic (not b'GGUF')")
      self._off = 4
      version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
      if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader handles 2 and 3; a big-endian "
                         "file shows as a huge version)")
      self.fields = {}
      for _ in range(n_kv):
        key = self._string()
        self.fields[key] = self._value(self._unpack("<I"))
      infos = []
      for _ in range(n_tensors):
        name = self._string()
        ne = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
        infos.append((name, ne, self._unpack("<I"), self._unpack("<Q")))
    except (struct.error, UnicodeDecodeError, MemoryError, OverflowError) as e:
      raise ValueError(f"the header ends early or is corrupt ({type(e).__name__}: {e})") from e
    align = int(self.fields.get("general.alignment", 32))
    start = -(-self._off // align) * align
    self.tensors = [self._tensor(gguf, start, *info) for info in infos]

  def _unpack(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self._buf, self._off)
    self._off += struct.calcsize(fmt)
    return value

  def _string(self) -> str:
    n = self._unpack("<Q")
    if self._off + n > self._mm.size:
      raise struct.error(f"string of {n} bytes past the end of the file")
    s = bytes(self._buf[self._off:self._off + n]).decode("utf-8")
    self._off += n
    return s

  def _value(self, vtype: int):
    if vtype in _SCALARS:
      return self._unpack(_SCALARS[vtype])
    if vtype == STRING:
      return self._string()
    if vtype != ARRAY:
      raise ValueError(f"unknown metadata value type {vtype}")
    item, n = self._unpack("<I"), self._unpack("<Q")
    if item in _NUMPY:  # one read for the whole array
      values = np.frombuffer(self._mm, _NUMPY[item], count=n, offset=self._off)
      self._off += values.nbytes
      return values.tolist()
    return [self._value(item) for _ in range(n)]

  def _tensor(self, gguf, start: int, name: str, ne: tuple, type_id: int, offset: int) -> Tensor:
    try:
      qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError as e:
      raise ValueError(f"tensor {name!r} has ggml type {type_id}, unknown to the installed "
                       "gguf package") from e
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(ne)) // block * size
    begin = start + offset
    if begin + n_bytes > self._mm.size:
      raise ValueError(f"tensor {name!r} needs bytes up to {begin + n_bytes}, the file has "
                       f"{self._mm.size}: it is truncated")
    raw = self._mm[begin:begin + n_bytes]
    outer = tuple(reversed(ne[1:]))
    if qtype.name in ("F32", "F16"):
      data = raw.view(np.float32 if qtype.name == "F32" else np.float16).reshape(*outer, ne[0])
    else:
      data = raw.reshape(*outer, ne[0] // block * size)
    return Tensor(name, qtype, ne, begin, n_bytes, data)
