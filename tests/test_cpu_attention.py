"""The CPU kernel's attention (`kernels/attention.cc`, `cpu.attend`) computes what `attend.dense`
computes, for each query alone, and decoding with it stays lossless.

Shapes cover grouped queries (H = K x G), a sliding window, soft-capping, bfloat16 caches stored as
bits, per-row positions, a scanned model's stacked caches read at a layer, head sizes 16 to 256 (80:
not a power of two), caches whose length is not a multiple of 16 slots.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.kernels import cpu
from jax_specens.models import attend as A


@pytest.fixture
def kernel_on(monkeypatch):
  if not cpu.available():
    pytest.skip("the CPU kernel cannot be built here (no AVX-512 or no C++ compiler)")
  monkeypatch.setenv(cpu.ENV, "1")


CASES = {  # B, W, H, K, Dh, S, window, softcap, dtype
    "gqa": (2, 3, 9, 3, 64, 700, None, None, jnp.float32),
    "window, head 256": (1, 1, 4, 1, 256, 1000, 512, None, jnp.float32),
    "softcap, bf16 bits": (3, 5, 8, 2, 32, 300, None, 50.0, jnp.bfloat16),
    "small window, mha": (2, 4, 4, 4, 16, 40, 7, None, jnp.float32),
    "16 queries": (1, 16, 6, 2, 64, 600, None, None, jnp.bfloat16),
    "head 80, odd cache": (2, 2, 4, 2, 80, 333, 100, None, jnp.bfloat16),
}


def _inputs(case, seed=0):
  b, w, h, k, d, s, window, softcap, dtype = case
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, w, h, d), dtype)
  keys = jax.random.normal(ks[1], (b, s, k, d), dtype)
  vals = jax.random.normal(ks[2], (b, s, k, d), dtype)
  positions = jax.random.randint(ks[3], (b,), 0, s - w)[:, None] + jnp.arange(w)
  return q, keys, vals, positions, dict(scale=d ** -0.5, window=window, softcap=softcap)


def _stored(x):
  """A cache as `cache.py` stores it on CPU: bfloat16 as its uint16 bits."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_equals_dense_and_each_query_alone(kernel_on, case):
  q, keys, vals, positions, kw = _inputs(case)
  f32 = lambda x: x.astype(jnp.float32)
  want = A.dense(f32(q), f32(keys), f32(vals), positions, **kw)
  got = jax.jit(lambda q, k, v, p: cpu.attend(q, k, v, p, None, **kw))(
      q, _stored(keys), _stored(vals), positions)
  chex.assert_trees_all_close(got, want, atol=2e-6, rtol=1e-5)
  alone = [cpu.attend(q[:, i:i + 1], _stored(keys), _stored(vals), positions[:, i:i + 1], None,
                      **kw) for i in range(q.shape[1])]
  chex.assert_trees_all_equal(jnp.concatenate(alone, axis=1), got)  # bit for bit


def test_a_stack_is_read_at_its_layer(kernel_on):
  q, keys, vals, positions, kw = _inputs(CASES["gqa"])
  other = jax.random.normal(jax.random.key(9), keys.shape, keys.dtype)
  ks, vs = jnp.stack([other, keys, other]), jnp.stack([other, vals, other])
  chex.assert_trees_all_equal(cpu.attend(q, ks, vs, positions, jnp.int32(1), **kw),
                              cpu.attend(q, keys, vals, positions, None, **kw))


def test_attend_routes_decode_passes_to_the_kernel_and_prompts_and_large_heads_to_xla(kernel_on):
  q, keys, vals, positions, kw = _inputs(CASES["gqa"])
  decode = jax.jit(lambda q: A.attend(q, keys, vals, positions, **kw)).lower(q).as_text()
  assert cpu.ATTEND_TARGET in decode
  wide = jnp.zeros((2, cpu.MAX_ROWS + 1) + q.shape[2:], q.dtype)
  wide_pos = jnp.broadcast_to(jnp.arange(cpu.MAX_ROWS + 1), (2, cpu.MAX_ROWS + 1))
  prompt = jax.jit(lambda q: A.attend(q, keys, vals, wide_pos, **kw)).lower(wide).as_text()
  assert cpu.ATTEND_TARGET not in prompt
  big = cpu.MAX_HEAD_DIM + 16  # a head the kernel does not hold in registers
  qb, kb = jnp.zeros(q.shape[:-1] + (big,)), jnp.zeros(keys.shape[:-1] + (big,))
  large = jax.jit(lambda q: A.attend(q, kb, kb, positions, **kw)).lower(qb).as_text()
  assert cpu.ATTEND_TARGET not in large


def test_the_attention_env_keeps_xla_attention_with_the_kernel_products(kernel_on, monkeypatch):
  q, keys, vals, positions, kw = _inputs(CASES["gqa"])
  monkeypatch.setenv(cpu.ATTENTION_ENV, "0")
  assert cpu.computes() and not cpu.attention()
  hlo = jax.jit(lambda q: A.attend(q, keys, vals, positions, **kw)).lower(q).as_text()
  assert cpu.ATTEND_TARGET not in hlo


def test_a_bfloat16_model_decodes_losslessly_with_the_kernel(kernel_on):
  """Greedy sd, whose verification passes attend W tokens at once, gives ar's tokens (a draft that
  disagrees, and the target as its own draft)."""
  from jax_specens import ModelConfig, create_model, decode
  cfg = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, attention_block=16)
  target, draft = create_model(cfg, seed=1, dtype=jnp.bfloat16), create_model(cfg, seed=2,
                                                                                dtype=jnp.bfloat16)
  prompt = jnp.array([[3, 17, 5, 9, 0, 0], [4, 8, 15, 16, 23, 42]], jnp.int32)
  lengths = jnp.array([4, 6], jnp.int32)
  run = lambda **kw: decode(target, prompt, lengths, max_new_tokens=40, temperature=0.0,
                            **kw).to_lists()
  ar = run(method="ar")
  assert run(method="sd", draft=draft, gamma=3) == ar
  assert run(method="sd", draft=target, gamma=4) == ar
