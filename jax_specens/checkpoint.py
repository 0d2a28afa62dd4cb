"""Our checkpoint format: one directory, written atomically.

    DIR/
      jax_specens.json      ModelConfig (see models/config.py) and format version
      params/               orbax StandardCheckpointer tree of the model parameters
      tokenizer.json, tokenizer_config.json, ...   (when a tokenizer was present)

Both converted Hugging Face models and models trained here use it. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jax_specens import shared_params
from jax_specens.models.config import ModelConfig
from jax_specens.models.model import Model, structure

CONFIG_FILE = "jax_specens.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
LOAD_DTYPE_KEY = "load_dtype"  # optional: the dtype load_model casts to by default
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
  """A converted checkpoint is corrupt, truncated or incomplete. The message names the file and
  says to convert again (`jax-specens convert HF_DIR OUT_DIR --overwrite`)."""

  def __init__(self, path, problem: str):
    self.path = Path(path)
    super().__init__(f"{self.path}: {problem}; the checkpoint is corrupt or incomplete: convert "
                     "again (jax-specens convert HF_DIR OUT_DIR --overwrite)")


def _fsync_tree(root: Path) -> None:
  """fsyncs every file under `root`, then every directory (children before parents)."""
  for dirpath, _, filenames in os.walk(root, topdown=False):
    for name in filenames:
      _fsync_path(Path(dirpath) / name)
    _fsync_path(Path(dirpath))


def _fsync_path(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), str(a))


def _swap(tmp: Path, out: Path) -> None:
  """Puts the complete `tmp` at `out`, replacing the complete old `out`: one atomic exchange where
  the file system has it, else two renames with the old output put back if the second fails."""
  if _exchange(tmp, out):
    _fsync_path(out.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
    return
  trash = out.parent / f".{out.name}.old-{os.getpid()}"
  os.rename(out, trash)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(trash, out)  # the old output, complete, back in place
    raise
  _fsync_path(out.parent)
  shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
  """Yields a temporary directory beside `out_dir`, moved onto it only once complete.

  Raises FileExistsError before any work when `out_dir` exists and `overwrite` is False. On
  success every file and directory written is fsync'd before the swap, so `out_dir` is always
  either the old complete output or the new complete output; on any error the temporary directory
  is removed and the old output (if any) is left as it was.
  """
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"output directory {out} already exists; pass overwrite=True "
                          "(--overwrite on the command line) to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    _fsync_tree(tmp)
    if out.exists():
      _swap(tmp, out)
    else:
      os.rename(tmp, out)
      _fsync_path(out.parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _string_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _string_keys(v) for k, v in tree.items()}
  return tree


def write_model_files(directory: Path, config: ModelConfig, params: dict, *,
                      share=None, load_dtype: str | None = None) -> None:
  """Writes config and params (a pure dict of arrays) into an existing, empty `directory`.

  The config records the size of every file under params/, so that `load_model` names a
  truncated or missing one before orbax reads anything.
  share: (groups, source_dir): top-level parameter groups (e.g. `("embed",)`) not written but
  taken from the model in source_dir at load time (`jax_specens.shared_params`).
  load_dtype: the dtype `load_model` casts to by default when it is not the stored one (a draft
  stored in bfloat16 to halve its files, computed in float32: bf16 products are slower on CPUs).
  """
  extra = {} if load_dtype is None else {LOAD_DTYPE_KEY: str(jnp.dtype(load_dtype))}
  if share is not None:
    params, extra[shared_params.KEY] = shared_params.record(params, *share)
  params_dir = (directory / PARAMS_DIR).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, _string_keys(params))
  files = {str(f.relative_to(params_dir)): f.stat().st_size
           for f in sorted(params_dir.rglob("*")) if f.is_file()}
  (directory / CONFIG_FILE).write_text(json.dumps(
      {"format_version": FORMAT_VERSION, "config": config.to_dict(), "params_files": files,
       **extra}, indent=2))


def save_model(model: Model, out_dir: str | os.PathLike, *, tokenizer_dir=None,
               overwrite: bool = False) -> Path:
  """Saves `model` (and the tokenizer files found in `tokenizer_dir`) atomically to `out_dir`."""
  from jax_specens.models.layout import unrolled
  with atomic_dir(out_dir, overwrite) as tmp:
    write_model_files(tmp, model.config, nnx.to_pure_dict(unrolled(model).params))
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, tmp)
  return Path(out_dir)


def copy_tokenizer_files(src, dst, borrow: bool = False) -> list[str]:
  """Copies the tokenizer files of model directory `src` into `dst` and records their
  fingerprint; borrow: copies none, `dst` records `src`'s tokenizer instead (`vocab.record`)."""
  from jax_specens import vocab
  if borrow:
    vocab.record(dst, borrowed_from=src)
    return []
  copied = []
  for name in TOKENIZER_FILES:
    if (Path(src) / name).is_file():
      shutil.copy2(Path(src) / name, Path(dst) / name)
      copied.append(name)
  vocab.record(dst)  # the tokenizer's fingerprint, for pairing models by tokenizer
  return copied


def _resolve(model_dir):
  """`builtin:NAME` names a built-in model (jax_specens.builtin.resolve); paths pass through."""
  from jax_specens.builtin import resolve
  return resolve(model_dir)


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
  path = Path(_resolve(model_dir)) / CONFIG_FILE
  try:
    return ModelConfig.from_dict(_read_meta(model_dir)["config"])
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(path, f"not a jax_specens model config ({type(e).__name__}: {e})"
                          ) from None


def _read_meta(model_dir) -> dict:
  model_dir = _resolve(model_dir)
  path = Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    if (Path(model_dir) / PARAMS_DIR).is_dir():
      raise CheckpointError(path, "missing (params/ is there)")
    raise FileNotFoundError(
        f"{model_dir} is not a jax_specens model directory (no {CONFIG_FILE}); convert a Hugging "
        f"Face checkpoint first: jax-specens convert HF_DIR {model_dir}")
  try:
    meta = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(path, f"not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise CheckpointError(path, "not a jax_specens model config (not a JSON object)")
  return meta


def _check_params_files(params_path: Path, files) -> None:
  """Every file recorded at save time is there with its size (checkpoints that predate the
  record are checked by orbax alone)."""
  if not isinstance(files, dict):
    return
  for rel, size in files.items():
    f = params_path / rel
    if not f.is_file():
      raise CheckpointError(f, "missing")
    if f.stat().st_size != size:
      raise CheckpointError(f, f"{f.stat().st_size} bytes where {size} were written (truncated)")


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> Model:
  """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
  graphdef, params = structure(config, dtype)
  return Model(config=config, graphdef=graphdef, params=params)


def load_model(model_dir: str | os.PathLike, dtype=None, shardings=None,
               share_from=None, scan_layers: bool = False, rows_major: bool | None = None,
               huge_pages: bool | None = None) -> Model:
  """Restores a model saved by `save_model` or `jax-specens convert`, cast to `dtype`.

  dtype: None (default) loads the dtype the directory asks for (`load_dtype`, see
    `write_model_files`), else the one the parameters are stored in (`precision.stored_dtype`).
  scan_layers: stack the layers for `lax.scan` (`models/layout.py`: compiles in a fraction of
  the time; on CPU each step is slower). The checkpoint is the same either way.
  rows_major: store the linear kernels `[d_out, d_in]` (`models/layout.rows_major`: the opt-in
  CPU kernel streams weights faster so: a batch-1 token by 16% in float32 and 20% in bfloat16 on
  SmolLM2, a float32 batch of 8 ~5% slower); None (default): where the kernel will compute this
  model's products (`JAX_SPECENS_CPU_KERNELS=1`, CPU, no shardings).
  huge_pages: move the parameters on the CPU into 2 MiB pages (`jax_specens.hugepages`: a SmolLM2
  token 0-21% faster); None (default): on Linux unless $JAX_SPECENS_HUGE_PAGES=0.

  shardings: optional function `Model -> pytree of jax.sharding.Sharding` matching the params;
  orbax then restores every array directly into its shards (`jax_specens.parallel.load_model`
  builds them from a mesh).
  share_from: for a directory that shares parameters with another model (a distilled draft
  shares its target's embedding, `jax_specens.shared_params`): the model, or a list of models,
  to take them from; by default the model at the recorded path is loaded for them.
  """
  model_dir = _resolve(model_dir)
  config = read_config(model_dir)
  meta = _read_meta(model_dir)  # read_config has checked that it is a JSON object
  if dtype is None:  # unreadable parameter metadata: the restore below raises the error
    from jax_specens.precision import stored_dtype
    dtype = meta.get(LOAD_DTYPE_KEY) or stored_dtype(model_dir) or jnp.float32
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
  if not params_path.is_dir():
    raise CheckpointError(params_path, "the parameter directory is missing")
  _check_params_files(params_path, meta.get("params_files"))
  _check_tokenizer_files(model_dir)
  share = meta.get(shared_params.KEY)
  own = {k: v for k, v in target.items() if not share or k not in share["groups"]}
  restored = _int_keys(_restore(params_path, _string_keys(own)),
                       {k: v for k, v in nnx.to_pure_dict(abstract.params).items() if k in own})
  if share:
    restored.update(_place(shared_params.resolve(
        model_dir, share, share_from, dtype, lambda d, dt: load_model(d, dt)), target))
  params = abstract.params
  nnx.replace_by_pure_dict(params, restored)
  from jax_specens import vocab
  model = Model(config=config, graphdef=abstract.graphdef, params=params,
                vocab=vocab.identify(model_dir, config.vocab_size))
  from jax_specens.kernels import cpu
  from jax_specens.models import layout
  if rows_major is None:
    rows_major = shardings is None and cpu.computes()
  if rows_major:
    model = layout.rows_major(model, donate=not share)  # shared arrays: not kernels, kept
  if scan_layers:
    model = layout.scanned(model, donate=not share)  # shared arrays belong to another model too
    if shardings is not None:
      model = model.replace(params=jax.device_put(model.params, shardings(model)))
  from jax_specens import hugepages
  if hugepages.enabled() if huge_pages is None else huge_pages:
    hugepages.collapse(model.params)
  return model


def _place(groups: dict, target: dict) -> dict:
  """Puts shared arrays where the restore target says (its sharding, when it has one)."""
  return {g: jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding), tree, target[g])
          for g, tree in groups.items()}


def _restore(params_path: Path, target):
  """orbax restore of `target`; any failure (a file of params/ truncated, corrupt or missing, a
  tree that does not match the config) becomes one CheckpointError naming the file."""
  previous = sys.unraisablehook
  sys.unraisablehook = functools.partial(_drop_closed_loop, previous)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(params_path, target)
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types; all mean "corrupt"
    text = " ".join(str(e).split())
    where = params_path
    for f in sorted(params_path.rglob("*"), key=lambda f: -len(str(f))):
      if f.is_file() and (str(f.relative_to(params_path)) in text or f.name in text):
        where = f
        break
    raise CheckpointError(where, f"cannot be read ({type(e).__name__}: {text[:200]})") from None
  sys.unraisablehook = previous
  return restored


def _drop_closed_loop(previous, unraisable) -> None:
  """After a failed restore, tensorstore reads still in flight complete into orbax's closed event
  loop, each printing a 'RuntimeError: Event loop is closed' traceback at any later time; those,
  and only those, are dropped."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and "Event loop is closed" in str(unraisable.exc_value)):
    previous(unraisable)


def _int_keys(tree, like):
  """Restores the integer keys (layer indices) that orbax stored as strings."""
  if isinstance(like, dict):
    return {k: _int_keys(tree[str(k)], v) for k, v in like.items()}
  return tree


def load_tokenizer(model_dir: str | os.PathLike):
  """The Hugging Face tokenizer saved beside the model (or the one it borrows from another
  directory, `copy_tokenizer_files(..., borrow=True)`), or None when there is none."""
  model_dir = _resolve(model_dir)
  if not (Path(model_dir) / "tokenizer.json").is_file() and not (
      Path(model_dir) / "tokenizer_config.json").is_file():
    from jax_specens import vocab
    source = vocab.borrowed(model_dir)  # ValueError when that directory lost its tokenizer
    return None if source is None else load_tokenizer(source)
  _check_tokenizer_files(model_dir)
  try:
    if _generic_fast_tokenizer(model_dir):
      # the class AutoTokenizer would pick anyway, without importing torch and transformers'
      # model registry (~6 s of every command's start on a CPU)
      from transformers import PreTrainedTokenizerFast
      return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                         trust_remote_code=False)
  except Exception as e:  # noqa: BLE001 - tokenizers raise many types; all mean "corrupt"
    raise CheckpointError(Path(model_dir) / "tokenizer.json",
                          f"the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


# tokenizer_config.json's tokenizer_class values that name the generic fast tokenizer (v5 calls it
# TokenizersBackend; our converter and the GGUF import save these): no model-specific subclass
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _generic_fast_tokenizer(model_dir) -> bool:
  """Whether the directory's tokenizer is tokenizer.json read by the generic fast class (what
  AutoTokenizer resolves `GENERIC_TOKENIZER_CLASSES` to), so no model-specific class is needed."""
  d = Path(model_dir)
  if not (d / "tokenizer.json").is_file() or not (d / "tokenizer_config.json").is_file():
    return False
  config = json.loads((d / "tokenizer_config.json").read_text())
  return config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES


def _check_tokenizer_files(model_dir) -> None:
  """CheckpointError when tokenizer.json / tokenizer_config.json is not valid JSON, or one of them
  is missing while the other is there (a directory without either has no tokenizer)."""
  d = Path(model_dir)
  if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
    return
  slow_vocab = any((d / f).is_file() for f in ("vocab.json", "tokenizer.model"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    path = d / name
    if not path.is_file():
      if name == "tokenizer.json" and slow_vocab:
        continue  # a slow tokenizer's files (vocab.json + merges.txt, or tokenizer.model)
      raise CheckpointError(path, "missing (the other tokenizer file is there)")
    try:
      json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(path, f"not valid JSON ({e})") from None
