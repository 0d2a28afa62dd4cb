"""The embedding lookup: a table's rows for token (or position) ids, without copying the table.

XLA's CPU backend has no bfloat16 gather: its float normalization gathers bfloat16 rows from a
float32 copy of the whole table, and loop-invariant code motion hoists that copy out of a decode
loop, so every `decode` call of a bfloat16 model converted its whole embedding (SmolLM2: 113 MB,
~28 ms; Gemma-3-270M: 671 MB). `take_rows` gathers 16-bit rows as bits instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_specens.kernels import cpu


def embed(module: nnx.Embed, ids: Int[Array, "B W"]) -> Float[Array, "B W D"]:
  """`module(ids)` (the rows of its table, in its dtype), gathered by `take_rows`."""
  rows = take_rows(module.embedding[...], ids)
  return rows if module.dtype is None else rows.astype(module.dtype)


def take_rows(table: Float[Array, "V D"], ids: Int[Array, "..."]) -> Float[Array, "... D"]:
  """`table[ids]`, as `jnp.take(table, ids, axis=0)` (a negative id counts from the end; one
  outside the table gives NaN), with the same gradient.

  On CPU a 16-bit table is gathered as bits (see above): with the CPU kernel
  (`JAX_SPECENS_CPU_KERNELS=1`) by a custom call that copies only the rows (`kernels/take_rows.cc`);
  without it from a uint16 view of the table (XLA still copies that view once a call: half the
  bytes, no conversion).
  """
  if jnp.dtype(table.dtype).itemsize != 2 or jax.default_backend() != "cpu":
    return jnp.take(table, ids, axis=0)
  return _take_bits(table, ids)


@jax.custom_vjp
def _take_bits(table: Array, ids: Array) -> Array:
  if cpu.computes():
    return cpu.take_rows(table, ids)
  rows = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)  # missing: 0xFFFF
  return jax.lax.bitcast_convert_type(rows, table.dtype)  # 0xFFFF is a NaN in bf16 and f16


def _take_bits_fwd(table, ids):
  return _take_bits(table, ids), (table, ids)


def _take_bits_bwd(res, g):
  table, ids = res  # the table only for its shape: a parameter, no copy is kept
  n = table.shape[0]
  ids = jnp.where(ids < 0, ids + n, ids)
  ids = jnp.where(ids < 0, n, ids)  # still outside: dropped, as the forward filled it
  return jnp.zeros_like(table).at[ids].add(g.astype(table.dtype), mode="drop"), None


_take_bits.defvjp(_take_bits_fwd, _take_bits_bwd)
