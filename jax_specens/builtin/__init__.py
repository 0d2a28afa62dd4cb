"""Built-in models shipped inside the package, trained here on real text (see `train.py`).

- "code":  a code specialist (Llama architecture, 4 layers, hidden 128), Python standard-library code;
- "prose": a prose specialist of the same size, English text shipped with Python;
- "draft": a small general model (2 layers, hidden 96) trained on both.

All three share one byte-level BPE tokenizer (4096 tokens) and are stored in our checkpoint format
(bf16), so everything that takes a converted Hugging Face model takes them too. Beside them, drafts
distilled for real targets (`DISTILLED_DRAFTS`, `jax-specens train-draft --store-dtype bfloat16`):
their own weights only, the target's embedding is shared at load time
(`load_model("builtin:smollm2-draft", share_from=smollm2)`; on the command line,
`--model SMOLLM2_DIR --draft builtin:smollm2-draft`). `smollm2-feature-draft` also reads SmolLM2's
hidden states (`train-draft --features`): it is sd's draft only, never an ensemble member; so is
`gemma3-feature-draft`, Gemma-3-270M's, which also borrows its target's tokenizer (no copy of its
33 MB tokenizer.json: `train-draft --borrow-tokenizer`).

    model = builtin_model("code")                # a jax_specens.Model
    tok = builtin_tokenizer()                    # a transformers tokenizer
    jax-specens generate --model builtin:code ...   # any model directory argument takes builtin:NAME
    load_model("builtin:code"), load_tokenizer("builtin:code")   # so does Python
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax.numpy as jnp

BUILTIN_MODELS = ("code", "prose", "draft")
# name -> the target it was distilled from (its README section: "Distilling a draft")
DISTILLED_DRAFTS = {"smollm2-draft": "SmolLM2-135M-Instruct",
                    # sd only: these read their target's hidden states
                    "smollm2-feature-draft": "SmolLM2-135M-Instruct",
                    "gemma3-feature-draft": "Gemma-3-270M"}
NAMES = BUILTIN_MODELS + tuple(DISTILLED_DRAFTS)
MODELS_DIR = Path(__file__).parent / "models"


def builtin_dir(name: str, models_dir: str | os.PathLike | None = None) -> Path:
  """The checkpoint directory of built-in model `name` (one of `NAMES`).

  models_dir: where to look instead of the package (the --out of `jax-specens train-builtin`).
  """
  if name not in NAMES:
    raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(NAMES)}")
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


PREFIX = "builtin:"


def resolve(model_dir: str | os.PathLike) -> str | os.PathLike:
  """`builtin:NAME` -> the directory of built-in model NAME; any other path is returned as is.

  Called wherever a model directory is read (`checkpoint.read_config`, `load_model`,
  `load_tokenizer`), so the CLI's `--model builtin:code` and Python's `load_model("builtin:code")`
  both work.
  """
  if isinstance(model_dir, str) and model_dir.startswith(PREFIX):
    name = model_dir[len(PREFIX):]
    if name not in NAMES:
      raise ValueError(f"unknown built-in model {model_dir!r}; use one of "
                       + ", ".join(PREFIX + n for n in NAMES))
    return builtin_dir(name)
  return model_dir


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
