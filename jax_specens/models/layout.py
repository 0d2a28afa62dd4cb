"""Scanned layers: one compiled block per layer kind instead of one per layer.

An unrolled transformer compiles every layer into every program (each pass width of each model
of each method), so compile time grows with depth. `scanned(model)` regroups the parameters by
the layer period P of `ModelConfig.layer_stack` (Llama-style: 1; Gemma 3: 6, five sliding and one
global layer): `stack[j]` holds layers j, j + P, j + 2P, ... with each parameter stacked on a
leading axis of n = L // P, and a `lax.scan` of n steps runs P blocks per step (`Transformer
._scan`). The L - n * P layers left over stay unrolled. Its KV cache is stacked the same way
(`cache.init_cache(stack=...)`), and each layer writes its K/V in place at its index.

The arithmetic is the same, layer for layer, so scanned and unrolled models give the same logits
and caches (`tests/test_layout.py`); only the program differs. Measured (`benchmarks/
compile_bench.py --layers both`): compiles take a fraction of the unrolled time, but on XLA's CPU
backend each step runs slower, because every layer's weights are copied out of the stack before
its matrix products; models load unrolled unless asked (`load_model(scan_layers=True)`,
`--scan-layers`). On disk a checkpoint is always per layer: `unrolled` undoes the regrouping, and
`save_model` and draft initialisation use it.

`rows_major(model)` stores every linear kernel `[d_out, d_in]` instead of `[d_in, d_out]` (the
graph's `nnx.Linear`s contract the other axis, `layers.rows_layout`): the opt-in CPU kernel then
reads each weight as one sequential stream of rows. `load_model` does it when the kernel is on;
it combines with scanning (stacks `[n, d_out, d_in]`), and `unrolled` undoes it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_specens.models.model import Model, structure


def scanned(model: Model, donate: bool = False) -> Model:
  """`model` with its layers stacked for `lax.scan` (a new copy of the layer parameters).

  donate: delete each per-layer array once it is stacked (for a model nothing else holds: keeps
  the peak memory near one copy instead of two).
  """
  if model.stack is not None:
    return model
  period, repeats = model.config.layer_stack()
  pure = nnx.to_pure_dict(model.params)
  layers = pure.pop("layers")

  def stacked(*xs):
    out = jnp.stack(xs)
    if donate:
      for x in xs:
        x.delete()
    return out

  pure["stack"] = {j: jax.tree_util.tree_map(stacked, *[layers[j + r * period]
                                                        for r in range(repeats)])
                   for j in range(period)}
  tail = range(period * repeats, model.config.num_layers)
  pure["layers"] = {i: layers[layer] for i, layer in enumerate(tail)}
  return _rebuild(model, True, pure)


def unrolled(model: Model) -> Model:
  """`model` with one parameter entry per layer and kernels `[d_in, d_out]` (the layout of
  checkpoints and of training)."""
  model = rows_major(model, False)
  if model.stack is None:
    return model
  period, repeats = model.stack
  pure = nnx.to_pure_dict(model.params)
  stack, tail = pure.pop("stack"), pure.pop("layers", {})
  layers = {j + r * period: jax.tree_util.tree_map(lambda x, r=r: x[r], stack[j])
            for j in range(period) for r in range(repeats)}
  layers.update({period * repeats + i: t for i, t in tail.items()})
  pure["layers"] = {i: layers[i] for i in range(model.config.num_layers)}
  return _rebuild(model, False, pure)


def rows_major(model: Model, rows: bool = True, donate: bool = False) -> Model:
  """`model` with every linear kernel stored `[d_out, d_in]` (rows=True) or `[d_in, d_out]`.

  The CPU kernel (`jax_specens/kernels/cpu.py`) reads a bfloat16 weight stored a row per output
  feature as one sequential stream (a dot product per row), and a `[d_in, d_out]` one eight rows
  at a time: measured on SmolLM2's MLP weights from memory, 49.5 against 64.6 us a weight at
  one activation row, 69.9 against 109 at four (`benchmarks/bf16_bench.py --layouts`). The
  products are the same; XLA's product takes either layout. `load_model` stores models this way
  when the kernel is on; checkpoints and training use `[d_in, d_out]` (`unrolled`).
  donate: delete each array once transposed (as `scanned`).
  """
  if model.rows == rows:
    return model

  def swap(path, x):
    if getattr(path[-1], "key", None) != "kernel":
      return x
    out = jnp.swapaxes(x, -1, -2)
    if donate:
      x.delete()
    return out

  pure = jax.tree_util.tree_map_with_path(swap, nnx.to_pure_dict(model.params))
  return _rebuild(model, model.stack is not None, pure, rows)


def _rebuild(model: Model, scan: bool, pure: dict, rows: bool | None = None) -> Model:
  """`model` with the parameters `pure` in the structure of `scan` and `rows` (default: the
  model's own kernel layout)."""
  rows = model.rows if rows is None else rows
  graphdef, params = structure(model.config, model.dtype, scan, rows)
  nnx.replace_by_pure_dict(params, pure)
  return model.replace(graphdef=graphdef, params=params)
