"""The opt-in CPU kernel for decode-pass products (`jax_specens/kernels/cpu.py`).

Specified against XLA's own product: the same values (float32 rounding) for both weight layouts,
float32 and bfloat16 weights, every row count it takes; products it does not take stay with XLA;
a model decodes the same tokens with it, and speculative decoding stays lossless (greedy sd ==
ar; se and cosd call the same passes); a model whose kernels are stored `[d_out, d_in]`
(`layout.rows_major`, what `load_model` does when the kernel is on) streams every weight as rows,
scanned or not. Skipped where it cannot run (no AVX-512 or no C++
compiler: it then warns and decoding keeps XLA's product, also tested)."""

from __future__ import annotations

import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_specens import ModelConfig, create_model
from jax_specens.decoding.api import decode
from jax_specens.kernels import cpu
from jax_specens.models import layers
from jax_specens.checkpoint import load_model, save_model
from jax_specens.models.layout import rows_major, scanned
from jax_specens.step import forward, step


@pytest.fixture
def kernel_on(monkeypatch):
  """The kernel requested; programs traced without it are dropped before and after."""
  if not cpu.available():
    pytest.skip("the CPU kernel cannot be built here (no AVX-512 or no C++ compiler)")
  monkeypatch.setenv(cpu.ENV, "1")
  jax.clear_caches()
  yield
  jax.clear_caches()


def _xla(x, w, dims):
  return jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims,
                             precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.float32, jnp.float32),
                                             (jnp.float32, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.bfloat16)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16])
def test_products_equal_xla_for_both_layouts_and_dtypes(kernel_on, x_dtype, w_dtype, transposed,
                                                        rows):
  rng = np.random.default_rng(rows)
  # n > 2048: the column-block path; n = 160 below: rows split over K; k % 32 = 16: the bfloat16
  # dot product's half-width tail
  k, n = 336, 2080
  if rows % 2:
    n = 160
  w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), w_dtype)
  x = jnp.asarray(rng.standard_normal((rows, k)), x_dtype)
  dims = (((1,), (1 if transposed else 0,)), ((), ()))
  f = jax.jit(cpu.small_matmul, static_argnums=2)
  if x_dtype == jnp.bfloat16 and "avx512_bf16" in cpu._cpu_flags():  # vdpbf16ps: x stays bf16
    assert "convert" not in f.lower(x, w, transposed).as_text()
  np.testing.assert_allclose(np.asarray(f(x, w, transposed)), np.asarray(_xla(x, w, dims)),
                             rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [70, 71, 1031])
@pytest.mark.parametrize("rows", [1, 4, 5])
def test_a_kernel_layout_product_takes_any_number_of_weight_rows(kernel_on, w_dtype, k, rows):
  # `[K, N]` weights are read 8 rows (bfloat16: 4 pairs) at a time, then the rest one (a pair) at
  # a time; an odd K leaves a last row without a partner, multiplied against a zero row
  rng = np.random.default_rng(k)
  w = jnp.asarray(rng.standard_normal((k, 64)), w_dtype)
  x = jnp.asarray(rng.standard_normal((rows, k)), w_dtype)
  out = jax.jit(cpu.small_matmul, static_argnums=2)(x, w, False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_xla(x, w, (((1,), (0,)), ((), ())))),
                             rtol=2e-5, atol=2e-4)


def test_weight_dot_routes_only_the_products_the_kernel_takes(kernel_on):
  w = jnp.ones((64, 32), jnp.float32)
  nn = (((2,), (0,)), ((), ()))
  assert cpu.fits(jnp.ones((2, 8, 64)), w, nn, None)  # 16 rows
  assert not cpu.fits(jnp.ones((2, 9, 64)), w, nn, None)  # 18 rows: XLA (a prompt, training)
  assert not cpu.fits(jnp.ones((1, 1, 64)), jnp.ones((64, 24)), nn, None)  # N % 16
  assert not cpu.fits(jnp.ones((1, 1, 64)), w, nn, jax.lax.Precision.HIGHEST)
  assert not cpu.fits(jnp.ones((1, 1, 64)), w.astype(jnp.float16), nn, None)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64)), jnp.float32)
  hlo = jax.jit(lambda x, w: layers.weight_dot(x, w, nn)).lower(x, w).as_text()
  assert cpu.TARGET in hlo
  out = jax.jit(lambda x, w: layers.weight_dot(x, w, nn))(x, w)
  assert out.shape == (2, 3, 32) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(_xla(x, w, nn)), rtol=1e-5, atol=1e-4)


CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_weight_of_a_stack_is_read_at_its_layer(kernel_on, w_dtype, transposed):
  rng = np.random.default_rng(5)
  stack = jnp.asarray(rng.standard_normal((3, 64, 96) if transposed else (3, 96, 64)), w_dtype)
  x = jnp.asarray(rng.standard_normal((2, 96)), w_dtype)
  dims = (((1,), (1 if transposed else 0,)), ((), ()))
  f = jax.jit(lambda x, s, layer: cpu.small_matmul(x, s, transposed, layer=layer))
  for layer in range(3):
    np.testing.assert_allclose(np.asarray(f(x, stack, jnp.int32(layer))),
                               np.asarray(_xla(x, stack[layer], dims)), rtol=2e-5, atol=2e-4)
  with pytest.raises(Exception, match="layer outside the stack"):
    np.asarray(f(x, stack, jnp.int32(3)))


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_several_weights_in_one_call_give_each_product_as_alone(kernel_on, x_dtype, transposed,
                                                                 stacked):
  """q, k and v in one call: the same numbers, bit for bit, as three calls (shapes that split
  along K and along N; with bfloat16 x, a float32 weight beside bfloat16 ones makes it call them
  one by one)."""
  rng = np.random.default_rng(7)
  shapes = [(96, 64), (96, 32), (96, 2080)]  # (K, N): N > 2048 goes in column blocks
  ws = [jnp.asarray(rng.standard_normal((2,) + ((n, k) if transposed else (k, n))), jnp.bfloat16)
        for k, n in shapes]
  if not stacked:
    ws = [w[1] for w in ws]
  layer = jnp.int32(1) if stacked else None
  x = jnp.asarray(rng.standard_normal((3, 96)), x_dtype)
  for weights in (ws, ws[:1] + [ws[1].astype(jnp.float32)] + ws[2:]):
    together = jax.jit(lambda x, ws: cpu.small_matmuls(x, ws, transposed, layer))(x, weights)
    alone = [cpu.small_matmul(x, w, transposed, layer) for w in weights]
    assert [y.shape for y in together] == [(3, n) for _, n in shapes]
    chex.assert_trees_all_equal(together, alone)


def test_calls_from_several_threads_at_once_give_the_products_made_one_at_a_time(kernel_on):
  """The threads that run a call's tasks are shared (a helper that has run one call's tasks stays
  a little for the next call's, whoever makes it): chains of products started from four threads
  at once give, bit for bit, what each gives alone."""
  import concurrent.futures
  rng = np.random.default_rng(3)
  ws = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in [(640, 96), (96, 640)] * 3]

  @jax.jit
  def chain(x):
    for w in ws:
      x = cpu.small_matmul(x, w, True).astype(jnp.bfloat16)  # [N, K] weights: x @ w.T
    return x

  xs = [jnp.asarray(rng.standard_normal((r, 96)), jnp.bfloat16) for r in (1, 2, 3, 5) * 2]
  alone = [chain(x) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(3):
      chex.assert_trees_all_equal(list(pool.map(lambda x: chain(x).block_until_ready(), xs)),
                                  alone)


def test_linears_equal_each_layer_called(kernel_on):
  """`layers.linears` (q, k, v of a layer) gives what calling each layer gives, bias included, in
  one kernel call where the kernel takes all three."""
  cfg = dataclasses.replace(CFG, qkv_bias=True)
  model = create_model(cfg, seed=0, dtype=jnp.bfloat16)
  attn = model.module().layers[0].attn
  x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 3, 64)), jnp.bfloat16)
  qkv = (attn.q, attn.k, attn.v)
  chex.assert_trees_all_equal(layers.linears(x, qkv), [layer(x) for layer in qkv])
  hlo = jax.jit(lambda x: layers.linears(x, qkv)).lower(x).as_text()
  assert hlo.count(f"@{cpu.TARGET}(") == 1
  wide = jnp.zeros((2, cpu.MAX_ROWS, 64), jnp.bfloat16)  # 32 rows: XLA's products
  chex.assert_trees_all_equal(layers.linears(wide, qkv), [layer(wide) for layer in qkv])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scanned_layers_read_their_weights_in_the_stack(kernel_on, dtype):
  """A scanned model's products read each layer's weights in place (XLA would copy a slice
  out of the stack before every call: ~7 MB a layer a step for SmolLM2 in bfloat16) and give
  the unrolled model's logits."""
  cfg = dataclasses.replace(CFG, num_layers=3)
  model = create_model(cfg, seed=0, dtype=dtype)
  stacked = scanned(model)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 3)), jnp.int32)
  start = jnp.asarray([0, 2], jnp.int32)
  fn = jax.jit(lambda m, c, t, p: step(m, c, t, p)[0])
  hlo = fn.lower(stacked, stacked.init_cache(2, 8), tokens, start).as_text()
  operands = [line.rsplit(" : (", 1)[1].split("->")[0] for line in hlo.splitlines()
              if f"@{cpu.TARGET}(" in line]  # the operands' types of each call
  counts = [ops.count("tensor<3x") for ops in operands]  # weights passed as their [3, ...] stack
  assert sorted(counts) == [0, 1, 1, 2, 3]  # the head; o; down; gate and up; q, k and v
  out = fn(stacked, stacked.init_cache(2, 8), tokens, start)
  ref = fn(model, model.init_cache(2, 8), tokens, start)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_row_major_kernels_are_read_as_rows(kernel_on, scan):
  """Every product of a `rows_major` model (scanned: in its stack) takes the kernel's `[N, K]`
  path, and the logits are the `[K, N]` model's (another summation order)."""
  model = create_model(dataclasses.replace(CFG, num_layers=3), seed=0, dtype=jnp.bfloat16)
  rows = rows_major(model)
  if scan:
    model, rows = scanned(model), scanned(rows)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 3)), jnp.int32)
  start = jnp.asarray([0, 2], jnp.int32)
  fn = jax.jit(lambda m, c, t, p: step(m, c, t, p)[0])
  hlo = fn.lower(rows, rows.init_cache(2, 8), tokens, start).as_text()
  calls = [line for line in hlo.splitlines() if "@jax_specens_small_matmul" in line]
  assert len(calls) == (4 if scan else 4 * 3) + 1  # the layers' qkv, o, gate-up, down; head
  assert all("transposed = true" in line for line in calls)
  out = fn(rows, rows.init_cache(2, 8), tokens, start)
  ref = fn(model, model.init_cache(2, 8), tokens, start)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_load_model_stores_kernels_as_rows_where_the_kernel_computes(kernel_on, monkeypatch,
                                                                      tmp_path, dtype):
  save_model(create_model(CFG, seed=0), tmp_path / "m")
  assert load_model(tmp_path / "m", dtype=dtype).rows
  assert not load_model(tmp_path / "m", dtype=dtype, rows_major=False).rows
  monkeypatch.setenv(cpu.ENV, "0")
  assert not load_model(tmp_path / "m", dtype=dtype).rows


def test_a_model_decodes_the_same_tokens_and_sd_stays_lossless(kernel_on, monkeypatch):
  """ar with and without the kernel; sd with it (every pass width of the loop: the draft's 1- and
  2-token passes, the target's 4-token verification), its models' kernels stored `[d_in, d_out]`
  or as rows, gives ar's tokens."""
  target = create_model(CFG, seed=0)
  draft = create_model(CFG, seed=1)
  prompts = jnp.asarray(np.random.default_rng(3).integers(0, 128, (3, 6)), jnp.int32)
  lengths = jnp.asarray([6, 2, 4], jnp.int32)
  kw = dict(max_new_tokens=12, temperature=0.0)
  with_kernel = decode(target, prompts, lengths, **kw).to_lists()
  sd = decode(target, prompts, lengths, method="sd", draft=draft, gamma=3, **kw).to_lists()
  rows = decode(rows_major(target), prompts, lengths, method="sd", draft=rows_major(draft),
                gamma=3, **kw).to_lists()
  monkeypatch.setenv(cpu.ENV, "0")
  jax.clear_caches()
  without = decode(target, prompts, lengths, **kw).to_lists()
  assert with_kernel == without
  assert sd == with_kernel  # lossless with the kernel in every pass
  assert rows == with_kernel  # and with kernels stored as rows
  assert len({tuple(r) for r in with_kernel}) == 3


def test_where_the_kernel_cannot_be_built_xla_computes_and_says_why(monkeypatch, tmp_path):
  monkeypatch.setenv(cpu.ENV, "1")
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("JAX_SPECENS_CACHE", str(tmp_path / "cache"))  # nothing built there yet
  cpu.available.cache_clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      ok = cpu.available()
    if "avx512f" in cpu._cpu_flags():
      assert not ok and any("no-such-compiler" in str(w.message) or "failed" in str(w.message)
                            for w in caught)
    x, w = jnp.ones((1, 64)), jnp.ones((64, 32))
    jax.clear_caches()
    out = jax.jit(lambda x, w: layers.weight_dot(x, w, (((1,), (0,)), ((), ()))))(x, w)
    np.testing.assert_allclose(np.asarray(out), 64.0)
  finally:
    cpu.available.cache_clear()
    jax.clear_caches()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_pass_through_the_kernel_has_xla_s_gradient(kernel_on, scan):
  """A trainer's pass small enough for the kernel (products and attention) differentiates: the
  forward runs the kernel, the gradient is XLA's program's (`cpu.with_xla_gradient`)."""
  config = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  model = create_model(config, seed=0)
  model = scanned(model) if scan else model
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 6)), jnp.int32)

  def loss(m):
    logits, _ = forward(m, m.init_cache(2, 8, grad=True), tokens, jnp.zeros((2,), jnp.int32))
    return jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0].mean()

  assert "jax_specens_attend" in str(jax.make_jaxpr(loss)(model))  # the kernel computes
  grads = jax.grad(loss)(model).params
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv(cpu.ENV)
    jax.clear_caches()
    expected = jax.grad(loss)(model).params
  chex.assert_trees_all_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(expected),
                              rtol=1e-4, atol=1e-5)
