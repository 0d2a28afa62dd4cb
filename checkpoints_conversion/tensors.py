"""Reading the safetensors files of a Hugging Face directory, lazily and without unpickling.

A directory holds either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Headers are read first (names, shapes, dtypes), so a whole
conversion can be validated before a single tensor is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads any)
import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.pth")


def safetensors_files(hf_dir: str | os.PathLike) -> list[Path]:
  """The safetensors files of `hf_dir` (the shards of the index, or the single file)."""
  hf_dir = Path(hf_dir)
  index = hf_dir / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index (no 'weight_map': {e})") from e
    files = [_inside(hf_dir, name, index) for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) {', '.join(missing)} that are missing "
                              f"from {hf_dir}; download or save the model again")
    return files
  if (hf_dir / SINGLE).is_file():
    return [_inside(hf_dir, SINGLE, hf_dir / SINGLE)]
  pickled = [p for p in PICKLED if (hf_dir / p).exists()]
  hint = (f" It has {', '.join(pickled)}, which are pickled and are never loaded here; re-save "
          "the model with model.save_pretrained(dir) (safetensors is the default)."
          if pickled else "")
  raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {hf_dir}.{hint}")


def _inside(hf_dir: Path, name, where: Path) -> Path:
  """`hf_dir / name`, refused (ValueError) unless it resolves inside `hf_dir`: no absolute paths,
  no `..`, no symlink (of the file or of a folder on its way) that leads out of the directory."""
  if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
    raise ValueError(f"{where} names shard {name!r}, which is not a file name inside {hf_dir}; "
                     "shards must sit in the model directory: fix the index or save the model "
                     "again")
  path = hf_dir / name
  if path.exists() and not path.resolve().is_relative_to(hf_dir.resolve()):
    raise ValueError(f"{path} is a symlink to {path.resolve()}, outside the model directory "
                     f"{hf_dir}; refused: copy the file into the directory")
  return path


class TensorFiles(contextlib.AbstractContextManager):
  """Name -> tensor view over all safetensors files of a Hugging Face directory.

  Use as a context manager; the files stay memory-mapped while it is open.
  """

  def __init__(self, hf_dir: str | os.PathLike):
    self.hf_dir = Path(hf_dir)
    self._stack = contextlib.ExitStack()
    self._where: dict[str, object] = {}
    self.file_of: dict[str, str] = {}
    self.where = f"the safetensors files of {self.hf_dir}"
    self.config_source = "config.json"
    try:
      for path in safetensors_files(hf_dir):
        handle = self._open(path)
        for name in handle.keys():
          if name in self._where:
            raise ValueError(f"tensor {name!r} appears in both {self.file_of[name]} and "
                             f"{path.name}; the shards are inconsistent")
          self._where[name] = handle
          self.file_of[name] = path.name
    except BaseException:
      self._stack.close()
      raise

  def _open(self, path: Path):
    try:
      return self._stack.enter_context(safe_open(str(path), framework="numpy"))
    except SafetensorError as e:
      raise ValueError(f"{path} is not a valid safetensors file ({e}); it is truncated or "
                       "corrupt: download or save it again") from e

  def __exit__(self, *exc):
    self._stack.close()
    return None

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """safetensors dtype code: "F32", "BF16", "F16", ..."""
    return self._where[name].get_slice(name).get_dtype()

  def read(self, name: str) -> np.ndarray:
    try:
      return self._where[name].get_tensor(name)
    except SafetensorError as e:
      raise ValueError(f"cannot read tensor {name!r} from {self.file_of[name]} ({e}); the file "
                       "is corrupt: download or save it again") from e
