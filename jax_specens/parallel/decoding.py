"""`decode()` on a mesh: every method (ar, sd, ensemble, se, cosd, ...) data- and tensor-parallel.

    mesh = make_mesh(data=2, model=4)
    out = jax_specens.parallel.decode([expert, amateur], prompts, lengths, mesh=mesh,
                                      method="se", max_new_tokens=64, temperature=0.0)

The decoding code has no device-specific code: the models' parameters and the prompts carry
`NamedSharding`s (the partition rules of `rules.py`) and the generation loop is traced with the mesh
set (`jax.set_mesh`), so XLA's partitioner splits every model call (heads and MLP columns on
`model`, batch rows on `data`); the loop pins its state (the KV caches split as each model's
heads, per-row arrays on `data`) at the start and after every step (`place.pin_state`). The
greedy tokens are the single-device tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jax_specens.parallel.multihost import to_host
from jax_specens.parallel.place import kv_axes_of, shard_batch, shard_model
from jax_specens.parallel.rules import check_batch, make_plan
from jax_specens.models.model import Model


def on_mesh(model: Model, mesh: Mesh) -> bool:
  """Whether every parameter of `model` already has a `NamedSharding` over `mesh`."""
  return all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
             for x in jax.tree_util.tree_leaves(model.params))


def place_for_decode(models: Model | Sequence[Model], prompts, prompt_lengths, mesh: Mesh, *,
                     draft: Model | None = None, **plan_kwargs):
  """Checks that `mesh` fits, then puts the inputs of `decode` onto it.

  Models already on `mesh` (`load_model(dir, mesh=mesh)`, `shard_model`, e.g. a small draft kept
  whole with `tensor_parallel=False`) are left as they are; the others are split by the partition
  rules (plan_kwargs: `tensor_parallel`, `replicate_kv`). Prompts and lengths are split on `data`.

  Raises ValueError, before anything is traced, when the `model` axis does not divide a model's
  heads or the `data` axis the batch (the message names the axis and the numbers).
  Returns (models, prompts, prompt_lengths, draft), placed.
  """
  single = isinstance(models, Model)
  members = [models] if single else list(models)
  everyone = members + ([draft] if draft is not None else [])
  names = [f"model {i}" for i in range(len(members))] + (["draft"] if draft is not None else [])
  for m, name in zip(everyone, names):  # every check before anything moves
    if not isinstance(m, Model):
      raise ValueError(f"{name}: expected a jax_specens Model (create_model / load_model), got "
                       f"{type(m).__name__}")
    if not on_mesh(m, mesh):
      make_plan(m.config, mesh, name=name, **plan_kwargs)
  if np.ndim(prompts) >= 1:
    check_batch(np.shape(prompts)[0], mesh)
  placed = [m if on_mesh(m, mesh) else shard_model(m, mesh, name=name, **plan_kwargs)
            for m, name in zip(everyone, names)]
  prompts, prompt_lengths = shard_batch(
      (jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32)), mesh)
  draft = placed.pop() if draft is not None else None
  return (placed[0] if single else placed), prompts, prompt_lengths, draft


def decode(models: Model | Sequence[Model], prompts, prompt_lengths, *, mesh: Mesh,
           draft: Model | None = None, tensor_parallel: bool = True, replicate_kv: bool = True,
           **kwargs):
  """`jax_specens.decode` with every input placed on `mesh` (see `place_for_decode`).

  kwargs: everything `jax_specens.decode` takes (method, max_new_tokens, gamma, sampling
  parameters, ...). Returns its `DecodeOutput`; on several processes (`initialize`) its arrays are
  gathered whole onto every process, as numpy.
  """
  from jax_specens.decoding.api import decode as decode_on_device
  models, prompts, prompt_lengths, draft = place_for_decode(
      models, prompts, prompt_lengths, mesh, draft=draft, tensor_parallel=tensor_parallel,
      replicate_kv=replicate_kv)
  ordered = ([draft] if draft is not None else []) + (
      [models] if isinstance(models, Model) else list(models))
  with jax.set_mesh(mesh), kv_axes_of(ordered):  # the loop's caches follow each model's heads
    out = decode_on_device(models, prompts, prompt_lengths, draft=draft, **kwargs)
  return to_host(out) if jax.process_count() > 1 else out
