"""One compiled program per static configuration and shape: new prompts (same padded shape, any
lengths), new sampling parameters, weights, stop ids and keys reuse it. decode() also runs inside a
user's jax.jit (models are pytrees)."""

import jax
import numpy as np

from jax_specens.decoding.api import decode
from jax_specens.decoding import api as decoding_api
from tests.decode_models import LENGTHS, PROMPTS, models

N = 10


def compiled_programs() -> int:
  return decoding_api._generate._cache_size()


def test_new_prompts_and_sampling_params_do_not_recompile():
  ms = models()[:2]
  static = dict(method="se", gamma=1, max_new_tokens=N)  # as in test_decode_greedy
  decode(ms, PROMPTS, LENGTHS, temperature=0.0, **static)
  before = compiled_programs()
  rng = np.random.default_rng(0)
  outs = []
  for i in range(3):
    prompts = rng.integers(0, 64, PROMPTS.shape).astype(np.int32)
    lengths = rng.integers(1, PROMPTS.shape[1] + 1, (3,)).astype(np.int32)
    out = decode(ms, prompts, lengths, temperature=[0.0, 0.7, 1.3][i:] + [1.0] * i,
                 top_k=5 * i, top_p=1.0 - 0.1 * i, min_p=0.05 * i,
                 weights=(0.2 + 0.3 * i, 0.8 - 0.3 * i), key=jax.random.key(i), **static)
    outs.append(out.to_lists())
  assert compiled_programs() == before
  assert outs[0] != outs[1] != outs[2]  # the new values did take effect


def test_new_stop_ids_do_not_recompile_but_new_shapes_do():
  a = models()[0]
  kw = dict(method="ar", max_new_tokens=N, temperature=0.0)
  before = compiled_programs()
  # a [B, 3] stop-id shape no other test uses: this first call must compile
  free = decode(a, PROMPTS, LENGTHS, stop_ids=[[-1, -1, -1]] * 3, **kw)
  assert compiled_programs() == before + 1
  for i in range(3):
    stops = [[free.to_lists()[0][i], -1, -1], [-1, -1, -1], [i, -1, i + 1]]
    out = decode(a, PROMPTS, LENGTHS, stop_ids=stops, **kw)
    assert out.finish_reasons()[0] == "stop"
  assert compiled_programs() == before + 1


def test_decode_inside_user_jit():
  a = models()[0]

  @jax.jit
  def generate(model, prompts, lengths, temperature):
    return decode(model, prompts, lengths, method="ar", max_new_tokens=N,
                  temperature=temperature).tokens

  inside = generate(a, PROMPTS, LENGTHS, 0.0)
  outside = decode(a, PROMPTS, LENGTHS, method="ar", max_new_tokens=N, temperature=0.0)
  np.testing.assert_array_equal(inside, outside.tokens)
