"""The decode loop pins its whole state on a mesh (`parallel.place.pin_state`), through the
`lax.while_loop`: every layer's K and V cache with batch on `data` and kv heads as that model's K
projection (a draft kept whole: kv heads whole), integer per-row arrays on `data`, counters
replicated (se's float logits ring is left to the partitioner).

8 simulated CPU devices (tests/conftest.py), a 2-layer target and member and a 2-layer draft.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_specens import ModelConfig, create_model
from jax_specens import parallel as par
from jax_specens.decoding.api import prepare
from jax_specens.decoding import METHODS
from jax_specens.decoding.loop import run
from jax_specens.parallel.place import kv_axes_of

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
BATCH, NEW = 4, 6
FAST = {"xla_backend_optimization_level": 0}


def final_state(ordered, req, cfg):
  return jax.jit(run, static_argnums=(0, 3), compiler_options=FAST)(
      METHODS[cfg.method], ordered, req, cfg)


@pytest.mark.parametrize("method", ["se", "sd"])
def test_loop_state_is_pinned_through_the_while_loop(method):
  mesh = par.make_mesh(2, 4)
  target, other, draft = (create_model(CFG, seed=s) for s in (1, 2, 3))
  draft = par.shard_model(draft, mesh, tensor_parallel=False)  # kept whole on every device
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, 64, (BATCH, 5)).astype(np.int32)
  lengths = np.array([5, 2, 3, 1], np.int32)
  members = [target, other] if method == "se" else target
  members, prompts, lengths, d = par.place_for_decode(
      members, prompts, lengths, mesh, draft=draft if method == "sd" else None)
  kw = dict(gamma=(2, 1)) if method == "se" else dict(draft=d, gamma=2)
  ordered, req, cfg, _ = prepare(members, prompts, lengths, method=method, max_new_tokens=NEW,
                                 temperature=0.0, **kw)
  with jax.set_mesh(mesh), kv_axes_of(ordered):
    state = final_state(ordered, req, cfg)
  assert int(np.min(state.length)) >= 1  # the loop ran
  whole = method == "sd"  # model 0 of sd is the draft kept whole
  for i, cache in enumerate(state.caches):
    kv = None if (whole and i == 0) else "model"
    want = NamedSharding(mesh, P("data", None, kv, None))
    assert len(cache.k) == len(cache.v) == CFG.num_layers
    for x in cache.k + cache.v:
      assert x.sharding.is_equivalent_to(want, 4), (i, x.sharding)
      assert x.sharding.shard_shape(x.shape) == (BATCH // 2, x.shape[1],
                                                 CFG.num_kv_heads // (1 if kv is None else 4),
                                                 CFG.head_dim)
    assert cache.pos.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
  for x in (state.tokens, state.seq, state.length, state.finish, state.extra.src,
            state.extra.pending):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data", *[None] * (x.ndim - 1))),
                                       x.ndim), x.shape
  for x in (state.stats.model_calls, state.stats.steps):
    assert x.sharding.is_fully_replicated


def test_without_a_mesh_the_state_is_untouched():
  from jax_specens.parallel.place import pin_state
  model = create_model(CFG, seed=0)
  ordered, req, cfg, m = prepare(model, np.ones((2, 3), np.int32), [3, 2], method="ar",
                                 max_new_tokens=2)
  state = m.init(ordered, req, cfg)
  assert pin_state(state, ordered) is state
