"""Sharded decoding: every method gives the single-device greedy tokens on 2x4 and 1x8 meshes.

2x4 splits rows on `data` and heads on `model` at once; 1x8 has more model devices than KV heads
(those are replicated); a data-only mesh would be 2x4's split of rows alone.

One program per mesh runs every method (decode() inside a user's jit), compiled fast; the
parameters and the KV caches of the decode loop state are checked to be really split.
`jax_specens.parallel.decode` end to end: test_parallel_cli.py (generate --mesh) and the
multi-host test.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_specens import ModelConfig, create_model
from jax_specens import parallel as par
from jax_specens.decoding.api import decode, prepare
from jax_specens.decoding import METHODS

MESHES = [(2, 4), (1, 8)]  # (data, model)
BATCH, NEW = 8, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# 8 query heads split on every model axis; 4 KV heads are replicated on model=8 (see rules.py)
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8, tie_embeddings=False)

# method -> decode() arguments; models are (target, second member, draft)
CASES = {
    "ar": lambda t, o, d: dict(models=t),
    "sd": lambda t, o, d: dict(models=t, draft=d, gamma=3),
    "ensemble": lambda t, o, d: dict(models=[t, o], ensemble="wlogit"),
    "se": lambda t, o, d: dict(models=[t, o], gamma=(3, 1)),
    "cosd": lambda t, o, d: dict(models=t, draft=d, gamma=3, verifier="rule"),
}
METHOD_NAMES = [m for m in CASES if m in METHODS]
# the second member and the draft attend in blocks of 4 slots (jax_specens/models/attend.py): their
# caches (~18 slots) span several blocks, so the blocked loop runs sharded too; the target is dense
BLOCKED = dataclasses.replace(CFG, attention_block=4)


def spread(model, seed):
  """Weights redrawn with std 0.3 (norm scales 1 +- 0.2): spread-out logits, so greedy decoding
  has no near-ties and does not collapse to one repeated token."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(model.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.normal(k, x.shape, x.dtype) * (0.2 if "scale" in jax.tree_util.keystr(p)
                                                     else 0.3)
         + (1.0 if "scale" in jax.tree_util.keystr(p) else 0.0)
         for k, (p, x) in zip(keys, leaves)]
  return model.replace(params=jax.tree_util.tree_unflatten(tree, new))


def run_all(target, other, draft, feature_draft, prompts, lengths):
  out = {}
  for name in METHOD_NAMES:
    kw = CASES[name](target, other, draft)
    o = decode(kw.pop("models"), prompts, lengths, method=name, max_new_tokens=NEW,
               temperature=0.0, **kw)
    out[name] = (o.tokens, o.lengths)
  # sd with a draft that reads the target's hidden states (decoding/sd_features.py)
  o = decode(target, prompts, lengths, method="sd", draft=feature_draft, gamma=3,
             max_new_tokens=NEW, temperature=0.0)
  out["sd, feature draft"] = (o.tokens, o.lengths)
  # the loop state after the prefill and one SE step: its caches show how the loop keeps them
  ms, req, cfg, se = prepare([target, other], prompts, lengths, method="se", max_new_tokens=NEW,
                             temperature=0.0, gamma=2)
  state = se.step(ms, req, cfg, se.init(ms, req, cfg))
  return out, (state.caches, state.length)


run_all_jit = jax.jit(run_all, compiler_options=FAST_COMPILE)


def shard_shape(x):
  return x.sharding.shard_shape(x.shape)


@pytest.fixture(scope="module")
def models():
  return tuple(spread(create_model(c, seed=s), s)
               for c, s in ((CFG, 1), (BLOCKED, 2), (BLOCKED, 3),
                            (dataclasses.replace(BLOCKED, feature_input=True), 4)))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, CFG.vocab_size, (BATCH, 6)).astype(np.int32)
  lengths = np.array([6, 1, 3, 5, 2, 6, 4, 1], np.int32)
  return prompts, lengths


@pytest.fixture(scope="module")
def reference(models, batch):
  out = jax.device_get(run_all_jit(*models, *batch)[0])
  for name, (tokens, lengths) in out.items():  # a meaningful comparison: varied tokens per row
    assert (lengths == NEW).all(), name
    assert len({tuple(r) for r in tokens}) > BATCH // 2, name
    assert np.mean([len(set(r)) for r in tokens]) > 2, name
  return out


def test_every_registered_method_has_a_sharded_case():
  assert set(METHODS) <= set(CASES), f"add a case for {set(METHODS) - set(CASES)} to CASES"
  assert {"ar", "sd", "ensemble", "se"} <= set(METHOD_NAMES)


@pytest.mark.parametrize("data, mp", MESHES)
def test_greedy_decode_on_a_mesh_equals_one_device(models, batch, reference, data, mp):
  mesh = par.make_mesh(data, mp)
  target, other, draft, feature_draft = models
  if mp > 1:  # a draft kept whole on every device (tensor_parallel=False) is left as placed
    draft = par.shard_model(draft, mesh, tensor_parallel=False)
  feature_draft = par.shard_model(feature_draft, mesh, tensor_parallel=False)
  (target, other), prompts, lengths, draft = par.place_for_decode(
      [target, other], *batch, mesh, draft=draft)

  for m in (target, other):
    q = m.params["layers"][0]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == P(None, "model") and shard_shape(q) == (32, 64 // mp)
    down = m.params["layers"][0]["mlp"]["down"]["kernel"][...]
    assert down.sharding.spec == P("model", None) and shard_shape(down) == (64 // mp, 32)
  dq = draft.params["layers"][0]["attn"]["q"]["kernel"][...]
  assert shard_shape(dq) == dq.shape and len(dq.sharding.device_set) == 8
  assert prompts.sharding.spec == P("data", None) and shard_shape(prompts) == (BATCH // data, 6)

  with jax.set_mesh(mesh):
    got, (caches, stepped) = run_all_jit(target, other, draft, feature_draft, prompts, lengths)
  # the decode loop's caches: rows on `data`, kv heads on `model` (4 kv heads on model=8: whole)
  kv = "model" if CFG.num_kv_heads % mp == 0 else None
  kv_split = mp if kv else 1
  assert int(np.min(stepped)) >= 1  # the step really decoded
  for cache in caches:
    for k in cache.k + cache.v:
      assert k.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, kv, None)), 4)
      assert shard_shape(k) == (BATCH // data, k.shape[1], CFG.num_kv_heads // kv_split,
                                CFG.head_dim)
    assert shard_shape(cache.pos) == (BATCH // data,)

  got = jax.device_get(got)
  assert len(got) == len(METHOD_NAMES) + 1
  for name in got:
    np.testing.assert_array_equal(got[name][0], reference[name][0], err_msg=name)
    np.testing.assert_array_equal(got[name][1], reference[name][1], err_msg=name)


def test_a_mesh_that_does_not_fit_is_rejected_before_tracing(models, batch):
  six_heads = create_model(dataclasses.replace(CFG, num_heads=6, num_kv_heads=6), seed=0)
  with pytest.raises(ValueError, match=r"mesh axis 'model' has size 4, which does not divide "
                                       r"num_heads=6 of draft \(llama\)"):
    par.decode(models[0], *batch, mesh=par.make_mesh(2, 4), draft=six_heads, method="sd",
               max_new_tokens=NEW)
  with pytest.raises(ValueError, match=r"mesh axis 'data' has size 4, which does not divide the "
                                       r"batch size 6"):
    par.decode([models[0], models[1]], batch[0][:6], batch[1][:6], mesh=par.make_mesh(4, 2),
               method="ensemble", max_new_tokens=NEW)
  with pytest.raises(ValueError, match=r"mesh axis 'model' has size 3, which does not divide "
                                       r"num_heads=8 of model 0"):
    par.place_for_decode([models[0]], *batch, par.make_mesh(1, 3))
