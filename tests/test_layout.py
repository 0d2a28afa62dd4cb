"""Scanned layers and row-major kernels (`jax_specens/models/layout.py`) compute what unrolled
layers with `[d_in, d_out]` kernels compute.

A model's layers regrouped by their period (Llama-style: every layer alike; Gemma 3: five sliding
layers and one global) and run by `lax.scan`, with the KV cache stacked the same way, gives the
unrolled model's logits and caches pass for pass (prompt, ring caches, blocked attention,
rollback), every method's greedy tokens, the same tokens on a mesh, and a per-layer checkpoint.
So do kernels stored `[d_out, d_in]` (`rows_major`, the CPU kernel's layout), scanned or not;
they are saved as `[d_in, d_out]`, and the partition rules refuse them.
A bfloat16 cache on CPU is stored as bits, written and read without converting it whole; a cache
made for training passes the gradient to K and V.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_specens import ModelConfig, create_model, load_model
from jax_specens.checkpoint import save_model
from jax_specens import parallel as par
from jax_specens.decoding.api import decode
from jax_specens.kernels import cpu
from jax_specens.models.layout import rows_major, scanned, unrolled
from jax_specens.step import forward, forward_prompt
from tests.decode_models import scaled

LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8,
                    attention_block=4)  # caches of > 4 slots attend block by block
# Gemma 3's pattern cut short: 8 layers = one period of 6 (5 sliding, 1 global) + 2 tail layers
GEMMA = ModelConfig(family="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=8, num_heads=4, num_kv_heads=2, head_dim=8,
                    layer_types=("sliding",) * 5 + ("full",) + ("sliding",) * 2,
                    sliding_window=4, norm_plus_one=True, post_norms=True, qk_norm=True,
                    embed_scale=True, activation="gelu_tanh", attention_block=None)


def spread(config: ModelConfig, seed: int):
  return scaled(create_model(config, seed=seed), 6.0)


def test_the_stack_is_the_shortest_period_of_the_layer_types():
  assert LLAMA.layer_stack() == (1, 3)
  assert GEMMA.layer_stack() == (6, 1)
  gemma3_1b = dataclasses.replace(GEMMA, num_layers=26,
                                  layer_types=(("sliding",) * 5 + ("full",)) * 4 + ("sliding",) * 2)
  assert gemma3_1b.layer_stack() == (6, 4)  # 24 scanned layers + 2 unrolled
  odd = dataclasses.replace(GEMMA, num_layers=3, layer_types=("sliding", "full", "full"))
  assert odd.layer_stack() == (3, 1)  # no period: one step of all three


@pytest.mark.parametrize("config", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_scanned_parameters_are_the_layers_stacked_and_unroll_back(config):
  model = create_model(config, seed=0)
  s = scanned(model)
  period, repeats = config.layer_stack()
  assert s.stack == (period, repeats)
  pure, layers = nnx.to_pure_dict(s.params), nnx.to_pure_dict(model.params)["layers"]
  assert len(pure["stack"]) == period and len(pure.get("layers", {})) == (
      config.num_layers - period * repeats)
  q = pure["stack"][0]["attn"]["q"]["kernel"]
  assert q.shape == (repeats,) + layers[0]["attn"]["q"]["kernel"].shape
  np.testing.assert_array_equal(q[repeats - 1], layers[(repeats - 1) * period]["attn"]["q"]["kernel"])
  chex.assert_trees_all_equal(nnx.to_pure_dict(unrolled(s).params),
                              nnx.to_pure_dict(model.params))


LAYOUTS = {"scanned": scanned, "rows": rows_major, "scanned rows": lambda m: scanned(rows_major(m))}


@pytest.mark.parametrize("config", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_row_major_kernels_are_the_kernels_transposed_and_come_back(config):
  model = create_model(config, seed=0)
  r = rows_major(model)
  assert r.rows and not model.rows
  flat, rflat = nnx.to_flat_state(model.params), nnx.to_flat_state(r.params)
  kernels = 0
  for (path, v), (rpath, rv) in zip(flat, rflat):
    assert path == rpath
    if path[-1] == "kernel":
      np.testing.assert_array_equal(rv[...], v[...].T)
      kernels += 1
    else:
      np.testing.assert_array_equal(rv[...], v[...])
  assert kernels == 7 * config.num_layers  # q, k, v, o, gate, up, down; the head is tied
  both = scanned(r)
  period, repeats = config.layer_stack()
  q = nnx.to_pure_dict(both.params)["stack"][0]["attn"]["q"]["kernel"]
  assert q.shape == (repeats, config.num_heads * config.head_dim, config.hidden_size)
  for back in (rows_major(r, False), unrolled(r), unrolled(both)):
    assert not back.rows and back.stack is None
    chex.assert_trees_all_equal(nnx.to_pure_dict(back.params), nnx.to_pure_dict(model.params))


def _layers_of(cache, stack):
  """The per-layer K arrays of `cache` (stacked entries unstacked, in layer order)."""
  if stack is None:
    return list(cache.k)
  period, repeats = stack
  out = {j + r * period: cache.k[j][r] for j in range(period) for r in range(repeats)}
  out.update({period * repeats + i: k for i, k in enumerate(cache.k[period:])})
  return [out[i] for i in range(len(out))]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_every_pass_gives_the_unrolled_logits_and_cache(config, layout):
  """A ragged prompt, then passes of 3 tokens with rollbacks, over ring caches for the sliding
  layers (window 4 + slack 4) and blocked attention (Llama: blocks of 4 of 24 slots)."""
  model = spread(config, 0)
  prompts = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
  lengths = jnp.asarray([9, 4], jnp.int32)

  @jax.jit
  def run(m):
    cache = m.init_cache(2, 24, ring_slack=4)
    first, cache = forward_prompt(m, cache, prompts, lengths)
    outs = [first]
    for i in range(4):
      logits, cache = forward(m, cache, prompts[:, i:i + 3], cache.pos)
      outs.append(logits)
      cache = cache.rollback(cache.pos - jnp.asarray([1, 2]))  # rows accept different counts
    return outs, cache

  ref, ref_cache = run(model)
  s = LAYOUTS[layout](model)
  got, cache = run(s)
  if s.stack is not None:
    assert len(cache.k) == len(ref_cache.k) - s.stack[0] * (s.stack[1] - 1)
  chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(_layers_of(cache, s.stack), _layers_of(ref_cache, None), atol=1e-5)
  np.testing.assert_array_equal(cache.pos, ref_cache.pos)


CASES = {
    "ar": lambda t, o, d: dict(models=t),
    "sd": lambda t, o, d: dict(models=t, draft=d, gamma=3),
    "se": lambda t, o, d: dict(models=[t, o], gamma=(3, 1)),
}


@functools.partial(jax.jit, static_argnames="methods")
def _every_method(target, other, draft, prompts, lengths, methods=tuple(CASES)):
  out = {}
  for name in methods:
    case = CASES[name]
    kw = case(target, other, draft)
    o = decode(kw.pop("models"), prompts, lengths, method=name, max_new_tokens=10,
               temperature=0.0, **kw)
    out[name] = (o.tokens, o.lengths)
  return out


@pytest.mark.parametrize("layout", ["scanned", "scanned rows"])
def test_every_method_decodes_the_unrolled_tokens(layout):
  """Gemma-like target (scanned: one period + tail), Llama-like second member and draft of 3
  layers; scanned and unrolled members mixed (and row-major kernels: the target's and the
  draft's). Greedy tokens identical, and varied. (ensemble is se's target distribution and CoSD
  calls its models as sd does: se and sd cover them.)"""
  target, other, draft = spread(GEMMA, 1), spread(dataclasses.replace(
      LLAMA, num_layers=2, attention_block=None), 2), spread(LLAMA, 3)
  prompts = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 7)), jnp.int32)
  lengths = jnp.asarray([7, 3, 1, 5], jnp.int32)
  ref = jax.device_get(_every_method(target, other, draft, prompts, lengths))
  to = LAYOUTS[layout]
  got = jax.device_get(_every_method(to(target), other, to(draft), prompts, lengths))
  for name in CASES:
    assert len({tuple(r) for r in ref[name][0]}) > 2, name  # not one repeated sequence
    np.testing.assert_array_equal(got[name][0], ref[name][0], err_msg=name)
    np.testing.assert_array_equal(got[name][1], ref[name][1], err_msg=name)
  np.testing.assert_array_equal(ref["sd"][0], ref["ar"][0])  # lossless, scanned or not


@pytest.fixture
def kernel_off(monkeypatch):
  """`load_model`'s defaults without the CPU kernel (with it, kernels load as rows:
  tests/test_cpu_kernel.py)."""
  monkeypatch.delenv(cpu.ENV, raising=False)


def test_a_scanned_model_saves_per_layer_and_loads_either_way(tmp_path, kernel_off):
  model = create_model(GEMMA, seed=4)
  save_model(scanned(model), tmp_path / "m")
  back = load_model(tmp_path / "m")
  assert back.stack is None
  chex.assert_trees_all_equal(nnx.to_pure_dict(back.params), nnx.to_pure_dict(model.params))
  again = load_model(tmp_path / "m", scan_layers=True)
  assert again.stack == GEMMA.layer_stack()
  chex.assert_trees_all_equal(nnx.to_pure_dict(again.params),
                              nnx.to_pure_dict(scanned(model).params))


def test_row_major_kernels_save_as_checkpoints_do_and_load_either_way(tmp_path, kernel_off):
  model = create_model(LLAMA, seed=4)
  save_model(scanned(rows_major(model)), tmp_path / "m")
  back = load_model(tmp_path / "m")
  assert not back.rows
  chex.assert_trees_all_equal(nnx.to_pure_dict(back.params), nnx.to_pure_dict(model.params))
  again = load_model(tmp_path / "m", rows_major=True)
  assert again.rows
  chex.assert_trees_all_equal(nnx.to_pure_dict(again.params),
                              nnx.to_pure_dict(rows_major(model).params))
  with pytest.raises(ValueError, match=r"partition rules .*rows_major\(model, False\)"):
    par.shard_model(again, par.make_mesh(2, 4))


def test_a_cache_of_the_other_layout_is_refused():
  model = create_model(LLAMA, seed=0)
  with pytest.raises(ValueError, match=r"cache with 0 stacked entries .* model with 1 .* "
                                       r"`init_cache`"):
    forward(scanned(model), model.init_cache(1, 8), jnp.zeros((1, 1), jnp.int32),
            jnp.zeros(1, jnp.int32))


def test_scanned_models_decode_the_same_tokens_on_a_mesh():
  """On 2 x 4 devices: stacked weights split like their layers behind an unsplit layer axis,
  stacked caches likewise; se's greedy tokens (sd runs the same passes) equal one device's."""
  mesh = par.make_mesh(2, 4)
  target, draft = scanned(spread(LLAMA, 5)), scanned(spread(LLAMA, 7))
  other = scanned(spread(dataclasses.replace(LLAMA, num_layers=2), 6))
  prompts = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 6)), jnp.int32)
  lengths = jnp.asarray([6, 2, 4, 1], jnp.int32)
  methods = ("se",)
  ref = jax.device_get(_every_method(target, other, draft, prompts, lengths, methods))
  (t, o), p, ln, d = par.place_for_decode([target, other], prompts, lengths, mesh, draft=draft)
  q = t.params["stack"][0]["attn"]["q"]["kernel"][...]
  assert q.sharding.spec == P(None, None, "model") and q.sharding.shard_shape(q.shape) == (
      3, 32, 64 // 4)
  specs = par.place._cache_shardings(t.init_cache(4, 16), t.config, mesh)
  assert specs.k[0] == P(None, "data", None, "model", None)
  with jax.set_mesh(mesh):
    got = jax.device_get(_every_method(t, o, d, p, ln, methods))
  for name in methods:
    np.testing.assert_array_equal(got[name][0], ref[name][0], err_msg=name)


def test_a_bfloat16_cache_on_cpu_is_stored_as_bits_and_written_in_place():
  """XLA's CPU backend has no bfloat16 dynamic-update-slice: it converted a bfloat16 cache array
  to float32 and back around every write (a stacked cache: every layer's, at every layer). On
  CPU the cache holds the bits (uint16); writes land where they did, and nothing converts the
  stack."""
  from jax_specens import cache as kv
  stored = kv.stored_dtype(jnp.bfloat16)
  assert stored == (jnp.uint16 if jax.default_backend() == "cpu" else jnp.bfloat16)
  assert kv.stored_dtype(jnp.float32) == jnp.float32
  new = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 2, 4)), jnp.bfloat16)
  start = jnp.asarray([1, 6], jnp.int32)  # row 1 writes slots 6, 7; its third token is dropped
  out = kv.values(kv.write(jnp.zeros((2, 8, 2, 4), stored), new, start))
  want = np.zeros((2, 8, 2, 4), np.float32)
  want[0, 1:4], want[1, 6:8] = np.asarray(new[0], np.float32), np.asarray(new[1, :2], np.float32)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)

  write_each_layer = jax.jit(lambda s, n: jax.lax.fori_loop(
      0, 3, lambda i, s: kv.write(s, n, start, layer=i), s), donate_argnums=0)
  stack = jnp.zeros((3, 2, 8, 2, 4), stored)
  hlo = write_each_layer.lower(stack, new).compile().as_text()
  assert "f32[3,2,8,2,4]" not in hlo  # no float32 copy of the stack
  out = kv.values(write_each_layer(stack, new))
  for layer in range(3):
    np.testing.assert_array_equal(np.asarray(out[layer], np.float32), want)

  # blocked attention reads a block's values after slicing it: no float32 copy of the cache
  from jax_specens.models import attend as A
  keys = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 2, 4)), jnp.bfloat16)
  q = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, 4, 4)), jnp.bfloat16)
  bits = kv.write(jnp.zeros((1, 64, 2, 4), stored), keys, jnp.zeros((1,), jnp.int32))
  pos = jnp.asarray([[40]], jnp.int32)
  attend = jax.jit(functools.partial(A.blocked, scale=0.5, block=16))
  assert "f32[1,64,2,4]" not in attend.lower(q, bits, bits, pos).compile().as_text()
  np.testing.assert_allclose(np.asarray(attend(q, bits, bits, pos), np.float32),
                             np.asarray(A.dense(q, keys, keys, pos, scale=0.5), np.float32),
                             rtol=2e-2, atol=2e-2)


def test_a_cache_made_for_training_passes_the_gradient_to_k_and_v():
  """Bits carry no gradient: a cache differentiated through is made with `grad=True` (the
  draft and built-in trainers do), which keeps it in bfloat16, and the K / V projections get
  their gradient; the bits cache of a decode would give them none on CPU."""
  model = create_model(LLAMA, seed=0, dtype=jnp.bfloat16)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 6)), jnp.int32)

  def k_grad(grad: bool) -> np.ndarray:
    def loss(m):
      cache = m.init_cache(2, 6, grad=grad)
      logits, _ = forward(m, cache, tokens, jnp.zeros((2,), jnp.int32))
      return jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0].mean()
    g = nnx.to_pure_dict(jax.grad(loss)(model).params)
    return np.abs(np.asarray(g["layers"][0]["attn"]["k"]["kernel"], np.float32)).sum()

  assert k_grad(True) > 0
  if jax.default_backend() == "cpu":
    assert k_grad(False) == 0  # why the trainers ask for grad=True
