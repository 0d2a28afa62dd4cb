"""Our checkpoint format: one directory, written atomically.

    DIR/
      jax_specens.json      ModelConfig (see models/config.py) and format version
      params/               orbax StandardCheckpointer tree of the model parameters
      tokenizer.json, tokenizer_config.json, ...   (when a tokenizer was present)

Both converted Hugging Face models and models trained here use it. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jax_specens.models.config import ModelConfig
from jax_specens.models.transformer import Transformer
from jax_specens.step import Model, from_module

CONFIG_FILE = "jax_specens.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
  """Yields a temporary directory beside `out_dir`, renamed onto it only on success.

  Raises FileExistsError before any work when `out_dir` exists and `overwrite` is False. On any
  error the temporary directory is removed, so nothing half-written is ever left.
  """
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"output directory {out} already exists; pass overwrite=True "
                          "(--overwrite on the command line) to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    if out.exists():
      trash = out.parent / f".{out.name}.old-{os.getpid()}"
      out.rename(trash)
      tmp.rename(out)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _string_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _string_keys(v) for k, v in tree.items()}
  return tree


def write_model_files(directory: Path, config: ModelConfig, params: dict) -> None:
  """Writes config and params (a pure dict of arrays) into an existing, empty `directory`."""
  (directory / CONFIG_FILE).write_text(json.dumps(
      {"format_version": FORMAT_VERSION, "config": config.to_dict()}, indent=2))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((directory / PARAMS_DIR).absolute(), _string_keys(params))


def save_model(model: Model, out_dir: str | os.PathLike, *, tokenizer_dir=None,
               overwrite: bool = False) -> Path:
  """Saves `model` (and the tokenizer files found in `tokenizer_dir`) atomically to `out_dir`."""
  with atomic_dir(out_dir, overwrite) as tmp:
    write_model_files(tmp, model.config, nnx.to_pure_dict(model.params))
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, tmp)
  return Path(out_dir)


def copy_tokenizer_files(src, dst) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if (Path(src) / name).is_file():
      shutil.copy2(Path(src) / name, Path(dst) / name)
      copied.append(name)
  return copied


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
  path = Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{model_dir} is not a jax_specens model directory (no {CONFIG_FILE}); convert a Hugging "
        f"Face checkpoint first: jax-specens convert HF_DIR {model_dir}")
  meta = json.loads(path.read_text())
  return ModelConfig.from_dict(meta["config"])


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> Model:
  """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
  return from_module(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype)))


def load_model(model_dir: str | os.PathLike, dtype=jnp.float32, shardings=None,
               mesh=None) -> Model:
  """Restores a model saved by `save_model` or `jax-specens convert`, cast to `dtype`.

  shardings: optional function `Model -> pytree of jax.sharding.Sharding` matching the params;
  orbax then restores every array directly into its shards.
  mesh: a `jax.sharding.Mesh` with axes `data`/`model` (`jax_specens.parallel.make_mesh`): the
  same, with the partition rules of `jax_specens.parallel`.
  """
  if mesh is not None:
    if shardings is not None:
      raise ValueError("load_model: pass either shardings= or mesh=, not both")
    from jax_specens.parallel.place import model_shardings
    shardings = lambda abstract: model_shardings(abstract, mesh)  # noqa: E731
  config = read_config(model_dir)
  abstract = abstract_model(config, dtype)
  target = nnx.to_pure_dict(abstract.params)
  sh = nnx.to_pure_dict(shardings(abstract)) if shardings is not None else None

  # without shardings: whole arrays on this process's first device (jax.devices()[0] belongs to
  # process 0 only when several processes share a program)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x, s=local):
    return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=s)

  target = (jax.tree_util.tree_map(leaf, target, sh) if sh is not None
            else jax.tree_util.tree_map(leaf, target))
  params_path = (Path(model_dir) / PARAMS_DIR).absolute()
  if not params_path.exists():
    raise FileNotFoundError(f"{params_path} is missing: the checkpoint is incomplete; convert again")
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(params_path, _string_keys(target))
  params = abstract.params
  nnx.replace_by_pure_dict(params, _int_keys(restored, nnx.to_pure_dict(params)))
  return Model(config=config, graphdef=abstract.graphdef, params=params)


def _int_keys(tree, like):
  """Restores the integer keys (layer indices) that orbax stored as strings."""
  if isinstance(like, dict):
    return {k: _int_keys(tree[str(k)], v) for k, v in like.items()}
  return tree


def load_tokenizer(model_dir: str | os.PathLike):
  """The Hugging Face tokenizer saved beside the model, or None when there is none."""
  if not (Path(model_dir) / "tokenizer.json").is_file() and not (
      Path(model_dir) / "tokenizer_config.json").is_file():
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                       trust_remote_code=False)
