"""Hugging Face directory or GGUF file -> our parameters -> our checkpoint directory.

    hf_config.load_hf_config   config.json (+ generation_config.json EOS ids) -> ModelConfig
    gguf_config                the same from GGUF metadata; `gguf_file.GGUFTensors` presents the
                               GGUF tensors under Hugging Face names, so all below serves both
    names.rules_for            which tensor becomes which parameter(s)
    plan                       every name and shape checked against the config, nothing read yet
    read_params                tensors read one by one, transposed / split, cast to the dtype
    validated                  the three above, for `load_hf_model` (in memory) and `convert`
    convert                    the above, written atomically with the tokenizer files

Dtype policy ("auto"): bfloat16 when the checkpoint stores its floats in bfloat16 (and float32),
float32 otherwise: float16 and quantized GGUF types become float32 (float16 -> bfloat16 loses
mantissa bits), unless bfloat16 is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from checkpoints_conversion.gguf_config import load_gguf_config
from checkpoints_conversion.gguf_file import GGUFTensors
from checkpoints_conversion.hf_config import load_hf_config
from checkpoints_conversion.names import IGNORED, Rule, model_prefix, rules_for
from checkpoints_conversion.tensors import TensorFiles
from jax_specens.checkpoint import abstract_model, atomic_dir, copy_tokenizer_files, write_model_files
from jax_specens.models.config import ModelConfig
from jax_specens.models.model import Model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KEEPS_BFLOAT16 = {"BF16", "F32"}  # stored types "auto" keeps as bfloat16 (with at least one BF16)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _config_summary(config: ModelConfig) -> str:
  return (f"family={config.family}, num_layers={config.num_layers}, hidden_size="
          f"{config.hidden_size}, num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads}, "
          f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}, "
          f"vocab_size={config.vocab_size}, tie_embeddings={config.tie_embeddings}")


def expected_shape(rule: Rule, shapes) -> tuple[int, ...]:
  """Shape the HF tensor of `rule` must have, from our parameter shapes (`shapes`: pure dict)."""
  parts = [tuple(_get(shapes, t).shape) for t in rule.targets]
  shape = parts[0][:-1] + (sum(p[-1] for p in parts),)
  return shape[::-1] if rule.transpose else shape


def plan(files: TensorFiles, config: ModelConfig, shapes) -> list[tuple[Rule, str]]:
  """Pairs every rule with its tensor name in `files`; checks names and shapes, reads nothing.

  Raises ValueError naming the tensor for a missing tensor, an unexpected one, or a shape that
  disagrees with the config.
  """
  prefix = model_prefix(config)
  strip = not any(n.startswith(prefix) for n in files.names)  # a bare base-model checkpoint

  def name_in_file(hf: str) -> str:
    return hf[len(prefix):] if strip and hf.startswith(prefix) else hf

  pairs = [(rule, name_in_file(rule.hf)) for rule in rules_for(config)]
  missing = [name for _, name in pairs if name not in files]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise ValueError(
        f"tensor {missing[0]!r}{''.join(', ' + repr(m) for m in missing[1:3])}{more} missing from "
        f"{files.where}, but {files.config_source} ({_config_summary(config)}) "
        "needs it: the config and the weights disagree")
  used = {name for _, name in pairs}
  if config.tie_embeddings:
    used.add("lm_head.weight")  # some checkpoints store the tied copy too
  extra = [n for n in files.names if n not in used and not IGNORED.search(n)]
  if extra:
    raise ValueError(
        f"tensor {extra[0]!r} in {files.file_of[extra[0]]} is not part of a model with this "
        f"{files.config_source} ({_config_summary(config)}); {len(extra)} such tensor(s): the "
        "config and the weights disagree")
  for rule, name in pairs:
    want, got = expected_shape(rule, shapes), files.shape(name)
    if got != want:
      raise ValueError(f"tensor {name!r} in {files.file_of[name]} has shape {got}, but "
                       f"{files.config_source} implies {want} ({_config_summary(config)}): the "
                       "config and the weights disagree")
  return pairs


def resolve_dtype(dtype, files, names=None):
  """"auto": bfloat16 when the tensors `names` (default: all) are stored in bfloat16 (and
  float32), else float32 (float16 and quantized types included); or the dtype asked for."""
  if dtype == "auto":
    stored = {files.dtype(n) for n in (files.names if names is None else names)}
    return jnp.bfloat16 if "BF16" in stored and stored <= KEEPS_BFLOAT16 else jnp.float32
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
  return dtype


def read_params(files: TensorFiles, pairs, shapes, dtype, progress: bool = True) -> dict:
  """Reads, transposes, splits and casts every planned tensor into a copy of `shapes`."""
  params = jax.tree_util.tree_map(lambda x: None, shapes)
  dtype = jnp.dtype(dtype)
  for rule, name in tqdm(pairs, desc="converting", unit="tensor", disable=not progress):
    x = files.read(name)
    if rule.transpose:
      x = x.T
    sizes = [_get(shapes, t).shape[-1] for t in rule.targets]
    for target, part in zip(rule.targets, np.split(x, np.cumsum(sizes)[:-1], axis=-1)):
      _set(params, target, jnp.asarray(part, dtype=dtype))
  unset = [p for p, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: v is None)
           if v is None]
  if unset:  # a gap in names.py, not the user's fault
    raise RuntimeError(f"conversion left parameters unset: {unset[:3]}")
  return params


def _abstract_shapes(config: ModelConfig) -> dict:
  return nnx.to_pure_dict(abstract_model(config).params)


def is_gguf_source(source: str | os.PathLike) -> bool:
  """True for a file (GGUF, or rejected as not GGUF when opened), False for a directory."""
  source = Path(source)
  if not source.exists():
    raise FileNotFoundError(f"{source} does not exist; pass a Hugging Face model directory or a "
                            ".gguf file")
  return source.is_file()


@contextlib.contextmanager
def opened(source: str | os.PathLike):
  """Yields `(config, files, write_tokenizer)` for a Hugging Face directory or a GGUF file.

  `write_tokenizer(dir)` copies the tokenizer files, or rebuilds them from the GGUF metadata.
  """
  if is_gguf_source(source):
    from checkpoints_conversion.gguf_tokenizer import write_tokenizer
    with GGUFTensors(source) as files:
      config = load_gguf_config(files)
      yield config, files, lambda dst: write_tokenizer(files.reader, dst,
                                                       list(config.eos_token_ids))
  else:
    config = load_hf_config(source)
    with TensorFiles(source) as files:
      yield config, files, lambda dst: copy_tokenizer_files(source, dst)


@contextlib.contextmanager
def validated(source: str | os.PathLike, dtype="auto"):
  """Opens and validates `source` (HF directory or GGUF file), reading no tensor: yields
  `(config, dtype, read, write_tokenizer)`.

  `read(progress)` then reads the parameters (pure dict) while the files are open. Every error
  about the input (config, files, tensor names and shapes) is raised on entry.
  """
  with opened(source) as (config, files, write_tokenizer):
    shapes = _abstract_shapes(config)
    pairs = plan(files, config, shapes)
    dtype = resolve_dtype(dtype, files, [name for _, name in pairs])
    yield (config, dtype, functools.partial(read_params, files, pairs, shapes, dtype),
           write_tokenizer)


def load_hf_model(hf_dir: str | os.PathLike, dtype="auto", progress: bool = False) -> Model:
  """Converts the Hugging Face model in `hf_dir` (or a GGUF file) in memory (nothing written)."""
  with validated(hf_dir, dtype) as (config, dtype, read, _):
    params = read(progress=progress)
  abstract = abstract_model(config, dtype)
  state = abstract.params
  nnx.replace_by_pure_dict(state, params)
  return Model(config=config, graphdef=abstract.graphdef, params=state)


def _check_paths(hf_dir: Path, out_dir: Path) -> None:
  hf, out = hf_dir.resolve(), out_dir.resolve()
  if out == hf or hf.is_relative_to(out):
    raise ValueError(f"output directory {out_dir} would replace the input {hf_dir}; choose "
                     "another output directory")


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype="auto",
            overwrite: bool = False, progress: bool = True) -> Path:
  """Converts a Hugging Face checkpoint directory or a GGUF file into our format at `out_dir`.

  dtype: "auto" (bfloat16 for bfloat16 checkpoints, else float32: float16 and quantized GGUF
  types become float32), "float32" or "bfloat16". Everything is validated before writing; the
  output appears only when complete (a failed conversion leaves neither `out_dir` nor a temporary
  directory behind). A GGUF's tokenizer is rebuilt from its metadata (`gguf_tokenizer`).
  """
  hf_dir, out_dir = Path(hf_dir), Path(out_dir)
  _check_paths(hf_dir, out_dir)
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite "
                          "(overwrite=True) to replace it")
  with validated(hf_dir, dtype) as (config, _, read, write_tokenizer), \
       atomic_dir(out_dir, overwrite) as tmp:
    write_model_files(tmp, config, read(progress=progress))
    write_tokenizer(tmp)
  return out_dir
