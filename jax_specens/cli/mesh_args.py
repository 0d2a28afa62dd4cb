"""The `--mesh` option of `jax-specens generate` (kept here; generate.py only calls these).

    jax-specens generate --model DIR --prompt-ids 1,2 --prompt-ids 3,4 --mesh data=2,model=4 ...

Every model is restored straight into its shards and decoded with `jax_specens.parallel.decode`.
The mesh is checked against every model's heads and the batch before any weight is read.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
      "--mesh", metavar="data=D,model=M", default=None,
      help="split the work over D x M devices: batch rows (prompts) on `data`, attention heads "
      "and MLP columns on `model` (tensor parallel), e.g. data=2,model=4; one axis may be -1 "
      "(all remaining devices). The batch must be a multiple of D and every model's heads of M. "
      "Default: one device")


def mesh_from_args(args: argparse.Namespace, named_configs, batch_size: int):
  """The `jax.sharding.Mesh` of `--mesh`, or None; ValueError when it does not fit.

  named_configs: (directory, ModelConfig) of every model (draft included), checked before any
  weight is read.
  """
  if getattr(args, "mesh", None) is None:
    return None
  from jax_specens import parallel as par
  mesh = par.mesh_from_spec(args.mesh)
  try:
    for name, config in named_configs:
      par.make_plan(config, mesh, name=str(name))
    par.rules.check_batch(batch_size, mesh)
  except ValueError as e:
    raise ValueError(f"--mesh {args.mesh}: {e}") from None
  return mesh


def refuse(args: argparse.Namespace, what: str) -> None:
  """ValueError when `--mesh` was given to a mode that runs on one device only."""
  if getattr(args, "mesh", None) is not None:
    raise ValueError(f"--mesh is not supported for {what}; drop --mesh")


def decode_fn(mesh, decode):
  """`decode` (`jax_specens.decode`) without a mesh, else `jax_specens.parallel.decode`
  bound to `mesh`."""
  if mesh is None:
    return decode
  import functools

  from jax_specens import parallel as par
  return functools.partial(par.decode, mesh=mesh)
