"""The embedding lookup (`models/embed.take_rows`) is `jnp.take`, values and gradient, and a decode
loop on CPU no longer copies a 16-bit embedding whole on every call.

XLA's CPU backend gathers bfloat16 rows from a float32 copy of the whole table and hoists that copy
out of the loop: SmolLM2 in bfloat16 made 113 MB of it (~28 ms) per `decode`. The rows are now
gathered as bits; with the CPU kernel by a custom call (`kernels/take_rows.cc`), which leaves no
table-sized value in the compiled loop at all.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.kernels import cpu
from jax_specens.models.embed import take_rows

V, D = 512, 64
IDS = jnp.array([[0, 3, -1, V - 1, V, -V - 1, 7, 3]])  # ends, repeats, outside on both sides


@pytest.fixture(params=[False, True], ids=["bits", "kernel"])
def kernel(request, monkeypatch):
  """Without the CPU kernel, and with it (skipped where it cannot be built)."""
  if request.param and not cpu.available():
    pytest.skip("the CPU kernel cannot be built here (no AVX-512 or no C++ compiler)")
  monkeypatch.setenv(cpu.ENV, "1" if request.param else "0")
  return request.param


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_rows_are_jnp_take(kernel, dtype):
  table = jax.random.normal(jax.random.key(0), (V, D), dtype)
  want = np.asarray(jnp.take(table, IDS, axis=0), np.float32)
  for f in (take_rows, jax.jit(take_rows)):
    got = f(table, IDS)
    assert got.dtype == dtype and got.shape == IDS.shape + (D,)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)  # NaN rows outside
  assert np.isnan(want[0, 4]).all() and np.isnan(want[0, 5]).all()


def test_gradient_is_jnp_take(kernel):
  table = jax.random.normal(jax.random.key(1), (V, D), jnp.bfloat16)
  loss = lambda take: lambda t: (take(t).astype(jnp.float32) ** 2).sum()
  want = jax.grad(loss(lambda t: jnp.take(t, IDS, axis=0)))(table)
  got = jax.grad(loss(lambda t: take_rows(t, IDS)))(table)
  chex.assert_trees_all_equal(got, want)


NOT_COPIES = {"parameter", "get-tuple-element", "bitcast", "tuple"}  # names of a buffer, no copy


def _table_sized_values(hlo: str) -> list[str]:
  """Instructions of an optimised HLO module that make a new value of the table's shape."""
  found = []
  for line in hlo.splitlines():
    m = re.search(rf"= \w+\[{V},{D}\]\S* ([\w-]+)\(", line)
    if m and m.group(1) not in NOT_COPIES:
      found.append(line.strip()[:160])
  return found


def test_a_decode_loop_makes_no_float32_copy_of_the_table(kernel):
  table = jax.random.normal(jax.random.key(2), (V, D), jnp.bfloat16)

  @jax.jit
  def loop(table, tok):
    def body(c):
      i, tok, acc = c
      x = take_rows(table, tok).astype(jnp.float32)  # a decode step's first op upcasts
      return i + 1, (tok * 7 + 3) % V, acc + x.sum()
    return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, tok, jnp.float32(0)))[2]

  hlo = loop.lower(table, jnp.array([5])).compile().as_text()
  sized = _table_sized_values(hlo)
  assert not [s for s in sized if re.search(rf"f32\[{V},{D}\]", s)], sized
  if kernel:
    assert sized == []  # rows copied by the custom call: nothing of the table's size at all
  toks = [5]
  for _ in range(3):
    toks.append((toks[-1] * 7 + 3) % V)
  ref = sum(float(table[t].astype(jnp.float32).sum()) for t in toks)
  np.testing.assert_allclose(float(loop(table, jnp.array([5]))), ref, rtol=1e-5)


def test_jnp_take_in_a_loop_does_copy_the_table():
  """The reason for `take_rows`: if XLA stops making this copy, the workaround can go."""
  table = jnp.ones((V, D), jnp.bfloat16)

  @jax.jit
  def loop(table, tok):
    def body(c):
      i, tok, acc = c
      x = jnp.take(table, tok, axis=0).astype(jnp.float32)
      return i + 1, (tok * 7 + 3) % V, acc + x.sum()
    return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, tok, jnp.float32(0)))[2]

  if jax.default_backend() != "cpu":
    pytest.skip("XLA's CPU backend only")
  assert _table_sized_values(loop.lower(table, jnp.array([5])).compile().as_text())
