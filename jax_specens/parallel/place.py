"""Putting models, caches and batches onto a mesh: in memory, or straight from a checkpoint.

    mesh = make_mesh(data=2, model=4)
    target = load_model(target_dir, mesh=mesh)          # orbax restores each shard in place
    draft = shard_model(create_model(cfg), mesh)        # a model already in memory
    cache = shard_cache(target.init_cache(8, 256), target.config, mesh)
    prompts = shard_batch(prompts, mesh)

Inside a jitted decode nothing else is needed: with the mesh set (`jax.set_mesh(mesh)`, which
`jax_specens.parallel.decode` does) the decode loop pins its state at the start and after every
step (`pin_state`): each model's KV cache to the cache rule (batch on `data`, kv heads as that
model's K/V projections are placed), every other per-row array on `data`, the rest replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_specens import checkpoint
from jax_specens.cache import KVCache
from jax_specens.models.config import ModelConfig
from jax_specens.parallel.mesh import AXES, DATA, device_ids
from jax_specens.parallel.rules import (batch_spec, cache_spec, check_batch, make_plan,
                                        param_path, param_shardings)
from jax_specens.models.model import Model


def model_shardings(model: Model, mesh: Mesh, *, tensor_parallel: bool = True,
                    replicate_kv: bool = True, name: str = "model"):
  """`nnx.State` of `NamedSharding`s for `model.params` (what `checkpoint.load_model` takes)."""
  if model.rows:
    raise ValueError("the partition rules name kernels stored [d_in, d_out]; this model stores "
                     "them [d_out, d_in] (rows_major, for the CPU kernel, which runs on one "
                     "device): shard jax_specens.models.layout.rows_major(model, False)")
  plan = make_plan(model.config, mesh, tensor_parallel=tensor_parallel,
                   replicate_kv=replicate_kv, name=name)
  return param_shardings(model.params, plan)


def shard_model(model: Model, mesh: Mesh, **plan_kwargs) -> Model:
  """The same model with every parameter split over `mesh` by the partition rules.

  plan_kwargs: `tensor_parallel`, `replicate_kv`, `name` (see `rules.make_plan`).
  """
  shardings = model_shardings(model, mesh, **plan_kwargs)
  return model.replace(params=jax.device_put(model.params, shardings))


def shard_models(models: Sequence[Model], mesh: Mesh | Sequence[Mesh], **plan_kwargs
                 ) -> list[Model]:
  """Places an ensemble: every model on one shared mesh, or model i on `mesh[i]`.

  Sub-meshes (see `mesh.submeshes`) must be disjoint. Note that `decode()` compiles all models
  into one program, which needs one device set: disjoint sub-meshes suit host-driven loops that
  call each model's `step` separately (e.g. cross-tokenizer CoSD), not `decode()`.
  """
  if isinstance(mesh, Mesh):
    return [shard_model(m, mesh, name=f"model {i}", **plan_kwargs) for i, m in enumerate(models)]
  meshes = list(mesh)
  if len(meshes) != len(models):
    raise ValueError(f"got {len(models)} models but {len(meshes)} sub-meshes; give one mesh per "
                     "model, or a single mesh shared by all")
  seen: dict[int, int] = {}
  for i, sub in enumerate(meshes):
    for d in sub.devices.flat:
      if d.id in seen:
        raise ValueError(f"sub-meshes {seen[d.id]} and {i} share device {d.id}; sub-meshes must "
                         "be disjoint (build them with jax_specens.parallel.submeshes)")
      seen[d.id] = i
  return [shard_model(m, s, name=f"model {i}", **plan_kwargs)
          for i, (m, s) in enumerate(zip(models, meshes))]


def load_model(model_dir: str | os.PathLike, dtype=None, *, mesh: Mesh, share_from=None,
               scan_layers: bool = False, **plan_kwargs) -> Model:
  """Restores a checkpoint directly into its shards on `mesh` (no full copy on any device).

  `checkpoint.load_model` with the partition rules of this package as its `shardings`; dtype and
  share_from as there, plan_kwargs as in `model_shardings`.
  """
  return checkpoint.load_model(
      model_dir, dtype, share_from=share_from, scan_layers=scan_layers,
      shardings=lambda abstract: model_shardings(abstract, mesh, **plan_kwargs))


def _cache_shardings(cache: KVCache, config: ModelConfig, mesh, **plan_kwargs):
  check_batch(cache.batch_size, mesh)
  return _per_entry(cache, cache_spec(make_plan(config, mesh, **plan_kwargs)))


def _per_entry(cache: KVCache, kv: P) -> KVCache:
  """`cache` with the spec `kv` of a `[B, S, Hkv, Dh]` array for every K/V entry (stacked
  entries of scanned layers get an unsplit leading axis) and the batch spec for `pos`."""
  specs = tuple(P(None, *kv) if i < cache.stacked else kv for i in range(len(cache.k)))
  return cache.replace(k=specs, v=specs, pos=batch_spec(1))


def shard_cache(cache: KVCache, config: ModelConfig, mesh: Mesh, **plan_kwargs) -> KVCache:
  """The cache split by the cache rule: batch on `data`, kv heads on `model`."""
  specs = _cache_shardings(cache, config, mesh, **plan_kwargs)
  return jax.device_put(cache, jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)))


def ambient_mesh():
  """The mesh set with `jax.set_mesh` when it has a `data` or `model` axis, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) & set(mesh.axis_names):
    return None
  return mesh


def constrain_cache(cache: KVCache, config: ModelConfig) -> KVCache:
  """Inside jit: pins a freshly made cache to the cache rule of the ambient mesh; else a no-op.

  Raises ValueError (at trace time, before anything runs) when the mesh does not divide the
  batch or the heads.
  """
  mesh = ambient_mesh()
  if mesh is None:
    return cache
  specs = _cache_shardings(cache, config, mesh)
  return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, cache, specs,
                                is_leaf=lambda x: isinstance(x, P))


# per model (method order): the mesh axis of its kv heads, or None; set by `parallel.decode` from
# the placed parameters (a draft kept whole has None). Unset: the cache rule of the default plan.
_KV_AXES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("kv_axes", default=None)


@contextlib.contextmanager
def kv_axes_of(models: Sequence[Model]):
  """While tracing a decode of `models` (method order, placed on a mesh): each loop cache is
  pinned with its kv heads on the axis that model's K projection uses."""
  axes = []
  for m in models:
    found = None
    for path, x in jax.tree_util.tree_leaves_with_path(m.params):
      if param_path(path).endswith("attn/k/kernel") and isinstance(
          getattr(x, "sharding", None), NamedSharding):
        spec = x.sharding.spec  # [D, Hkv * Dh], or [n, D, Hkv * Dh] for scanned layers
        found = spec[x.ndim - 1] if len(spec) >= x.ndim else None
        break
    axes.append(found)
  token = _KV_AXES.set(tuple(axes))
  try:
    yield
  finally:
    _KV_AXES.reset(token)


def pin_state(state, models: Sequence[Model]):
  """Inside jit with a mesh set: `state` (a decode LoopState) pinned by
  `with_sharding_constraint`: caches by the cache rule, integer `[B, ...]` arrays on `data`,
  counters replicated (float logits buffers and the key are left to the partitioner); without a
  mesh, `state` unchanged. Raises ValueError at trace time when the mesh
  does not divide the batch or the heads."""
  mesh = ambient_mesh()
  if mesh is None:
    return state
  b = state.length.shape[0]
  check_batch(b, mesh)
  axes = _KV_AXES.get()
  if axes is None or len(axes) != len(models):
    axes = [cache_spec(make_plan(m.config, mesh))[2] for m in models]
  caches = tuple(_per_entry(c, P(DATA, None, a, None)) for c, a in zip(state.caches, axes))

  def rest(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or jnp.issubdtype(x.dtype,
                                                                             jnp.floating):
      return None  # the key, and logits (se's ring: vocab as the LM head): the partitioner's
    return batch_spec(x.ndim) if x.ndim >= 1 and x.shape[0] == b else P()

  specs = jax.tree_util.tree_map(rest, state.replace(caches=()))
  specs = specs.replace(caches=caches)
  return jax.tree_util.tree_map(
      lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s), state, specs,
      is_leaf=lambda x: x is None or isinstance(x, P))


def shard_batch(tree, mesh: Mesh):
  """Every array in `tree` split on its leading (batch) dimension over `data`.

  On several hosts each process must pass the same global batch (see `multihost.global_batch`
  for host-local rows).
  """
  for x in jax.tree_util.tree_leaves(tree):
    check_batch(x.shape[0], mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(x.ndim))), tree)


def check_models(models: Sequence[Model], mesh: Mesh, batch_size: int | None = None,
                 **plan_kwargs) -> None:
  """Raises ValueError before tracing when `mesh` does not fit a model's heads or the batch."""
  for i, m in enumerate(models):
    make_plan(m.config, mesh, name=f"model {i}", **plan_kwargs)
  if batch_size is not None:
    check_batch(batch_size, mesh)


def same_devices(models: Sequence[Model]) -> None:
  """Raises ValueError when the models' parameters sit on different device sets."""
  sets = [device_ids(m.params) for m in models]
  for i, s in enumerate(sets[1:], 1):
    if s != sets[0]:
      raise ValueError(
          f"model 0 is on devices {sorted(sets[0])} but model {i} on {sorted(s)}: decode() "
          "compiles every model into one program, which needs one device set; put all models on "
          "one mesh (jax_specens.parallel.shard_models(models, mesh))")
