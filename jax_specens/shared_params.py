"""Parameters a model directory does not carry but takes from another model at load time.

A distilled draft (`jax-specens train-draft`) keeps its target's embedding frozen: shipping a copy
would cost SmolLM2-135M's 113 MB `[49152, 576]` table, more than the draft's own layers. Its
directory records instead, in `jax_specens.json`:

    "shared_params": {"from": "/abs/path/of/the/target", "groups": {"embed": "<fingerprint>"}}

and `load_model(draft_dir, share_from=target)` (or the target found at the recorded path) fills
those parameter groups in, after checking that the fingerprints match: a draft is never silently
given another model's embedding. The arrays are the target's own (no copy in memory).
"from" is `$JAX_SPECENS_CACHE/models/NAME` for a target in the user cache, where the demo
converts real models (`user_cache.portable_path`), so a shipped draft finds its target on any
machine.

The fingerprint is a sha256 of the group's shapes and of its values rounded to bfloat16, so a
target loaded in float32 or bfloat16 matches the same draft.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
from flax import nnx

from jax_specens.user_cache import portable_path, recorded_path

KEY = "shared_params"


def fingerprint(group) -> str:
  """sha256 of a parameter group (a pytree of arrays): shapes and bfloat16-rounded values."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(group),
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}{x.shape}".encode())
    h.update(np.ascontiguousarray(x.astype(np.float32).astype(ml_dtypes.bfloat16)).tobytes())
  return h.hexdigest()


def record(pure: dict, groups: Sequence[str], source_dir: str | os.PathLike) -> tuple[dict, dict]:
  """(the params to write: `pure` without `groups`, the metadata to record under KEY)."""
  missing = [g for g in groups if g not in pure]
  if missing:
    raise ValueError(f"cannot share {missing}: the model has no such parameter groups "
                     f"(it has {sorted(pure)})")
  meta = {"from": portable_path(source_dir),
          "groups": {g: fingerprint(pure[g]) for g in groups}}
  return {k: v for k, v in pure.items() if k not in groups}, meta


def _matches(model, groups: dict) -> bool:
  pure = nnx.to_pure_dict(model.params)
  return all(g in pure and fingerprint(pure[g]) == fp for g, fp in groups.items())


def resolve(model_dir, meta: dict, share_from, dtype, load) -> dict:
  """The shared groups `{name: pure dict}` for the model in `model_dir`, cast to `dtype`.

  share_from: a model or a list of models to take them from (the first whose fingerprints match);
  else the model at the recorded path is loaded with `load(path, dtype)`. A clear error names the
  fix when neither has them.
  """
  groups = meta["groups"]
  candidates = [] if share_from is None else (
      list(share_from) if isinstance(share_from, (list, tuple)) else [share_from])
  source = next((m for m in candidates if _matches(m, groups)), None)
  recorded = recorded_path(meta["from"])
  if source is None:
    if not (recorded / "jax_specens.json").is_file():
      raise FileNotFoundError(
          f"{model_dir} shares its {'/'.join(groups)} parameters with the model it was distilled "
          f"from, recorded at {recorded}, which is not there"
          + (", and the model(s) given to share from have other ones" if candidates else "")
          + ": load it with share_from=load_model(TARGET_DIR) (on the command line, give that "
          "target as --model), or move the target back")
    source = load(recorded, dtype)
    if not _matches(source, groups):
      raise ValueError(f"{recorded} is no longer the model {model_dir} was distilled from (its "
                       f"{'/'.join(groups)} parameters changed); distil the draft again "
                       "(jax-specens train-draft)")
  pure = nnx.to_pure_dict(source.params)
  return {g: jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.dtype != jnp.dtype(dtype)
                                    else x, pure[g]) for g in groups}
