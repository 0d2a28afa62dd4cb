"""Device meshes with two named axes: `data` (batch rows) and `model` (heads, MLP columns).

Both axes are `AxisType.Auto`: the parameters, the cache and the prompts carry `NamedSharding`s and
XLA's partitioner inserts the collectives, so the decoding code itself has no device-specific code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


def parse_mesh(spec: str) -> dict[str, int]:
  """`"data=2,model=4"` -> `{"data": 2, "model": 4}`; a missing axis has size 1.

  One axis may be `-1`: it takes every device the other axis leaves (`model=-1` on 8 devices is
  `data=1, model=8`).
  """
  sizes = {DATA: 1, MODEL: 1}
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in AXES:
      raise ValueError(f"bad mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
                       f"{AXES}, e.g. 'data=2,model=4'")
    if name in seen:
      raise ValueError(f"bad mesh {spec!r}: axis {name!r} given twice")
    seen.add(name)
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"bad mesh {spec!r}: size of axis {name!r} must be an integer, got "
                       f"{value.strip()!r}") from None
  if not seen:
    raise ValueError(f"bad mesh {spec!r}: expected e.g. 'data=2,model=4'")
  return sizes


def make_mesh(data: int = 1, model: int = 1, *, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A `data x model` mesh (Auto axes) over `devices` (default: all devices of all processes).

  One of `data`, `model` may be -1 (all remaining devices). The mesh may use fewer devices than
  given (the first `data * model`); more is an error.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and model == -1:
    raise ValueError("at most one mesh axis may be -1")
  for name, size in ((DATA, data), (MODEL, model)):
    if size != -1 and size < 1:
      raise ValueError(f"mesh axis {name!r} must have size >= 1 (or -1 for 'the rest'), "
                       f"got {size}")
  if data == -1 or model == -1:
    other, name = (model, DATA) if data == -1 else (data, MODEL)
    if n % other:
      raise ValueError(f"cannot fill mesh axis {name!r}: {n} devices are not a multiple of "
                       f"{other}")
    data, model = (n // other, model) if data == -1 else (data, n // other)
  if data * model > n:
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices but only "
                     f"{n} are available ({devices[0].platform}); choose sizes whose product "
                     f"is at most {n}")
  return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:data * model])


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`make_mesh(**parse_mesh(spec))`: what `--mesh data=2,model=4` builds."""
  return make_mesh(**parse_mesh(spec), devices=devices)


def axis_size(mesh: Mesh | None, name: str) -> int:
  return 1 if mesh is None else dict(mesh.shape).get(name, 1)


def submeshes(sizes: Sequence[dict[str, int]], devices: Sequence[jax.Device] | None = None
              ) -> list[Mesh]:
  """Disjoint meshes over consecutive groups of devices, one per entry of `sizes`.

  `submeshes([dict(model=4), dict(model=2, data=2)])` on 8 devices puts the first mesh on devices
  0-3 and the second on 4-7. Used to place the models of an ensemble on separate devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  need = [s.get(DATA, 1) * s.get(MODEL, 1) for s in sizes]
  if sum(need) > len(devices):
    raise ValueError(f"sub-meshes {list(sizes)} need {sum(need)} devices in all but only "
                     f"{len(devices)} are available")
  meshes, start = [], 0
  for s, k in zip(sizes, need):
    meshes.append(make_mesh(s.get(DATA, 1), s.get(MODEL, 1), devices=devices[start:start + k]))
    start += k
  return meshes


def device_ids(tree) -> frozenset[int]:
  """Ids of every device holding part of any array in `tree`."""
  ids = set()
  for x in jax.tree_util.tree_leaves(tree):
    if isinstance(x, jax.Array):
      ids.update(d.id for d in x.sharding.device_set)
  return frozenset(ids)
