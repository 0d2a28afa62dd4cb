"""Built-in models shipped inside the package, trained here on real text (see `train.py`).

- "code":  a code specialist (Llama architecture, 4 layers, hidden 128), Python standard-library code;
- "prose": a prose specialist of the same size, English text shipped with Python;
- "draft": a small general model (2 layers, hidden 96) trained on both.

All three share one byte-level BPE tokenizer (4096 tokens) and are stored in our checkpoint format
(bf16), so everything that takes a converted Hugging Face model takes them too:

    model = builtin_model("code")                # a jax_specens.Model
    tok = builtin_tokenizer()                    # a transformers tokenizer
    jax-specens generate --model "$(python -c 'import jax_specens.builtin as b; print(b.builtin_dir("code"))')" ...
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax.numpy as jnp

BUILTIN_MODELS = ("code", "prose", "draft")
MODELS_DIR = Path(__file__).parent / "models"


def builtin_dir(name: str, models_dir: str | os.PathLike | None = None) -> Path:
  """The checkpoint directory of built-in model `name` ("code", "prose" or "draft").

  models_dir: where to look instead of the package (the --out of `jax-specens train-builtin`).
  """
  if name not in BUILTIN_MODELS:
    raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
  root = MODELS_DIR if models_dir is None else Path(models_dir)
  path = root / name
  if not (path / "jax_specens.json").is_file():
    raise FileNotFoundError(
        f"the built-in model {name!r} is missing from {root}; "
        + ("this installation was built without its package data: reinstall jax_specens, or "
           if models_dir is None else "") + "train the models with `jax-specens train-builtin`")
  return path


@functools.lru_cache(maxsize=8)
def builtin_model(name: str, dtype=jnp.float32, models_dir: str | os.PathLike | None = None):
  """Loads built-in model `name` as a `jax_specens.Model` cast to `dtype` (stored in bf16).

  Loaded once per process (a Model is an immutable pytree, so sharing it is safe).
  """
  from jax_specens.checkpoint import load_model
  return load_model(builtin_dir(name, models_dir), dtype)


TOKENIZER_DIR = MODELS_DIR / "tokenizer"


def builtin_tokenizer(models_dir: str | os.PathLike | None = None):
  """The tokenizer shared by the built-in models (a `transformers` fast tokenizer).

  Loaded from the package's `models/tokenizer/` (every model directory holds a copy too), or from
  `models_dir/tokenizer/`.
  """
  path = TOKENIZER_DIR if models_dir is None else Path(models_dir) / "tokenizer"
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(
        f"the built-in tokenizer is missing from {path}; reinstall jax_specens with its "
        "package data, or train it again with `jax-specens train-builtin`")
  from jax_specens.checkpoint import load_tokenizer
  return load_tokenizer(path)
