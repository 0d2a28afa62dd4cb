"""Resumable training state, shared by every trainer (fusion heads, distilled drafts).

A trainer keeps its state as a flat dict: pytrees of arrays (params, optimizer state, ...) and
Python scalars (step, best loss, ...). `open_manager` opens an orbax `CheckpointManager` (or None
without a directory), `save` writes the state at a step, and `resume` returns the latest saved state
with the same structure and the same Python scalar types as the state it is given, so that an
interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def open_manager(checkpoint_dir: str | os.PathLike | None) -> ocp.CheckpointManager | None:
  if checkpoint_dir is None:
    return None
  return ocp.CheckpointManager(Path(checkpoint_dir).absolute(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _savable(state: dict) -> dict:
  """Python ints / floats become numpy scalars (orbax stores arrays only)."""
  def leaf(v):
    if isinstance(v, bool):
      return np.bool_(v)
    if isinstance(v, int):
      return np.int64(v)
    if isinstance(v, float):
      return np.float64(v)
    return v
  return {k: leaf(v) for k, v in state.items()}


def save(manager: ocp.CheckpointManager | None, step: int, state: dict) -> None:
  if manager is not None:
    manager.save(step, args=ocp.args.StandardSave(_savable(state)))
    manager.wait_until_finished()


def resume(manager: ocp.CheckpointManager | None, like: dict) -> tuple[dict, int | None]:
  """(the latest saved state shaped like `like`, its step) — or (`like`, None) when none exists."""
  if manager is None or manager.latest_step() is None:
    return like, None
  savable = _savable(like)
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype if isinstance(x, jax.Array)
                                     else np.asarray(x).dtype), savable)
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
  restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(savable),
                                          jax.tree_util.tree_leaves(restored))
  out = {k: (type(like[k])(restored[k]) if isinstance(like[k], (bool, int, float)) else restored[k])
         for k in like}
  return out, manager.latest_step()
