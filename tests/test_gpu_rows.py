"""One-row products padded on GPU (`weight_dot`, `JAX_SPECENS_GPU_MIN_ROWS`).

Specified on the CPU by making `weight_dot` believe it runs on a GPU: a one-row product (a batch-1
decode step) is computed as a product of `JAX_SPECENS_GPU_MIN_ROWS` rows, whose zero rows sit
behind an optimisation barrier, and returns exactly the plain product's values for both weight
layouts (`[K, N]` kernels and the tied `[V, K]` head) and any leading shape of ones; products of
more rows, batched products and setting 1 keep the plain product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.models import layers

K, N = 48, 40


def _on_gpu(monkeypatch, rows: str | None = None):
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  if rows is not None:
    monkeypatch.setenv("JAX_SPECENS_GPU_MIN_ROWS", rows)


def _primitives(fn, *args) -> set[str]:
  return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize("lead", [(1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", ["2", "4"])
def test_one_row_is_padded_and_exact(monkeypatch, lead, transposed, rows):
  _on_gpu(monkeypatch, rows)
  x = jax.random.normal(jax.random.key(0), lead + (K,), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (N, K) if transposed else (K, N), jnp.float32)
  dims = (((x.ndim - 1,), (1 if transposed else 0,)), ((), ()))
  fn = lambda x, w: layers.weight_dot(x, w, dims)
  assert "optimization_barrier" in _primitives(fn, x, w)
  got = jax.jit(fn)(x, w)
  want = jax.lax.dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST)
  assert got.shape == lead + (N,)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,rows", [((2, K), "2"), ((1, 3, K), "2"), ((1, K), "1")])
def test_several_rows_or_setting_one_keep_the_plain_product(monkeypatch, shape, rows):
  _on_gpu(monkeypatch, rows)
  x = jnp.ones(shape, jnp.float32)
  w = jnp.ones((K, N), jnp.float32)
  dims = (((len(shape) - 1,), (0,)), ((), ()))
  assert "optimization_barrier" not in _primitives(
      lambda x, w: layers.weight_dot(x, w, dims), x, w)


def test_a_batched_product_keeps_the_plain_product(monkeypatch):
  _on_gpu(monkeypatch, "2")
  x, w = jnp.ones((1, 1, K), jnp.float32), jnp.ones((1, K, N), jnp.float32)
  dims = (((2,), (1,)), ((0,), (0,)))
  assert "optimization_barrier" not in _primitives(
      lambda x, w: layers.weight_dot(x, w, dims), x, w)
  assert layers.weight_dot(x, w, dims).shape == (1, 1, N)


def test_cpu_never_pads():
  x, w = jnp.ones((1, K), jnp.float32), jnp.ones((K, N), jnp.float32)
  assert "optimization_barrier" not in _primitives(
      lambda x, w: layers.weight_dot(x, w, (((1,), (0,)), ((), ()))), x, w)


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_a_bad_setting_names_the_variable(monkeypatch, value):
  _on_gpu(monkeypatch, value)
  x, w = jnp.ones((1, K), jnp.float32), jnp.ones((K, N), jnp.float32)
  with pytest.raises(ValueError, match="JAX_SPECENS_GPU_MIN_ROWS.*whole number"):
    layers.weight_dot(x, w, (((1,), (0,)), ((), ())))
