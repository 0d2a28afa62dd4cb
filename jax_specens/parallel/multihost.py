"""Several hosts, one program: every process runs the same script on its own devices.

    jax_specens.parallel.initialize("10.0.0.1:1234", num_processes=2, process_id=RANK)
    mesh = make_mesh(data=2, model=8)                  # spans the devices of every process
    model = load_model(DIR, mesh=mesh)                 # each process restores only its shards
    out = jax_specens.parallel.decode([model], prompts, lengths, mesh=mesh, ...)
    tokens = to_host(out.tokens)                       # the whole batch on every process

On TPU pods and SLURM/MPI clusters `initialize()` needs no arguments (JAX detects the cluster).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jax_specens.parallel.rules import batch_spec, check_batch


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
  """`jax.distributed.initialize`, called once per process before any other JAX call.

  Must come before anything touches a device. On CPU the cross-process collectives use gloo.
  Arguments may be omitted where JAX detects the cluster (TPU pods, SLURM, Open MPI); kwargs are
  passed on (e.g. `local_device_ids`).
  """
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)


def global_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
  """One global `[B, ...]` array, batch on `data`, from the rows this process holds.

  Processes pass consecutive blocks of rows (process 0 the first `B / num_processes`, ...).
  """
  local_rows = np.asarray(local_rows)
  check_batch(local_rows.shape[0] * jax.process_count(), mesh)
  return jax.make_array_from_process_local_data(
      NamedSharding(mesh, batch_spec(local_rows.ndim)), local_rows)


def to_host(tree):
  """Every array of `tree` gathered whole onto every process, as numpy."""
  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(gather, tree)
