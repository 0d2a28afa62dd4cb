"""The dtype policy: a checkpoint loads in the dtype it is stored in, unless the caller asks.

    stored_dtype(model_dir)   the dtype of the saved parameters (orbax metadata; every checkpoint
                              has it, so checkpoints written before this policy need nothing new)
    describe(model)           "float32, 538 MB": dtype and parameter memory, for CLI output

`jax-specens convert` stores float32 unless the source is bfloat16 (or bfloat16 is asked for):
float16 and quantized GGUF weights become float32, since float16 -> bfloat16 drops mantissa bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def stored_dtype(model_dir: str | os.PathLike) -> jnp.dtype | None:
  """The dtype the parameters of the checkpoint in `model_dir` were saved in.

  None when `model_dir/params` is missing or its metadata unreadable (`load_model` then reports
  the broken checkpoint); ValueError when the parameters do not share one dtype (never the case
  for checkpoints written by this library).
  """
  import orbax.checkpoint as ocp
  params = (Path(model_dir) / "params").absolute()
  if not params.is_dir():
    return None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(params)
  except Exception:  # noqa: BLE001  (orbax raises many kinds; load_model's restore explains)
    return None
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)
            if getattr(leaf, "dtype", None) is not None}
  if len(dtypes) > 1:
    raise ValueError(f"the parameters in {params} are stored in {sorted(map(str, dtypes))}; "
                     "pass dtype= to load_model to choose one")
  return dtypes.pop() if dtypes else None


def param_bytes(model) -> int:
  """Bytes of the parameters of `model` (a `Model`; arrays or `ShapeDtypeStruct` leaves)."""
  from flax import nnx
  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(model.params))
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def format_bytes(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def describe(model) -> str:
  """`"<dtype>, <parameter memory>"` of `model`, e.g. "float32, 538 MB"."""
  from flax import nnx
  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(model.params))
  names = sorted({str(jnp.dtype(x.dtype)) for x in leaves})
  return f"{'/'.join(names)}, {format_bytes(param_bytes(model))}"
