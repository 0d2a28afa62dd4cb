"""Sharding specification: meshes, partition rules, placement, and forward parity on 8 CPU devices.

Decode parity for every method lives in test_parallel_decode.py; several processes in
test_parallel_multihost.py.
"""

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jax_specens import ModelConfig, checkpoint, create_model, forward, forward_prompt, init_cache
from jax_specens import parallel as par
from jax_specens.parallel import rules

MESHES = [(8, 1), (2, 4), (1, 8)]  # (data, model)
BATCH = 8

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, tie_embeddings=False,
                  qkv_bias=True)

# one config per family switch that adds or changes parameters
FAMILY_CFGS = {
    "llama": CFG,
    "gemma2": dataclasses.replace(CFG, family="gemma2", norm_plus_one=True, post_norms=True,
                                  tie_embeddings=True, qkv_bias=False),
    "qwen3": dataclasses.replace(CFG, family="qwen3", qk_norm=True, qkv_bias=False),
    "phi3": dataclasses.replace(CFG, family="phi3", num_kv_heads=8, qkv_bias=False),
    "gpt2": dataclasses.replace(CFG, family="gpt2", norm="layer", positions="learned",
                                gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                                activation="gelu_tanh", vocab_size=60, tie_embeddings=True,
                                num_kv_heads=8),
}


def leaf(model, path):
  """The array at slash-separated `path` of the model's params."""
  x = model.params
  for k in path.split("/"):
    x = x[int(k) if k.isdigit() else k]
  return x[...]


def shard_shape(x):
  return x.sharding.shard_shape(x.shape)


# ---- meshes -------------------------------------------------------------------------------------

def test_parse_mesh_reads_axis_sizes():
  assert par.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
  assert par.parse_mesh("model=8") == {"data": 1, "model": 8}
  assert par.parse_mesh(" model = -1 ") == {"data": 1, "model": -1}


@pytest.mark.parametrize("spec, words", [
    ("data=2,tensor=4", "AXIS=SIZE"), ("data=2,data=4", "twice"), ("model=x", "integer"),
    ("", "e.g."), ("data2", "AXIS=SIZE")])
def test_parse_mesh_rejects_bad_specs(spec, words):
  with pytest.raises(ValueError, match=words):
    par.parse_mesh(spec)


def test_make_mesh_has_auto_data_and_model_axes():
  mesh = par.make_mesh(data=2, model=4)
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert dict(par.mesh_from_spec("model=-1").shape) == {"data": 1, "model": 8}
  assert dict(par.make_mesh(data=-1, model=2).shape) == {"data": 4, "model": 2}
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    par.make_mesh(data=4, model=4)
  with pytest.raises(ValueError, match="not a multiple of 3"):
    par.make_mesh(data=-1, model=3)


def test_submeshes_are_disjoint():
  a, b = par.submeshes([dict(model=4), dict(data=2, model=2)])
  ids_a = {d.id for d in a.devices.flat}
  ids_b = {d.id for d in b.devices.flat}
  assert ids_a == {0, 1, 2, 3} and ids_b == {4, 5, 6, 7}
  with pytest.raises(ValueError, match="need 12 devices"):
    par.submeshes([dict(model=8), dict(model=4)])


# ---- partition rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_CFGS)
def test_every_parameter_of_every_family_has_a_rule(family):
  cfg = FAMILY_CFGS[family]
  abstract = checkpoint.abstract_model(cfg)
  plan = rules.make_plan(cfg, par.make_mesh(2, 4))
  specs = {rules.param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      rules.param_specs(abstract.params, plan), is_leaf=lambda x: isinstance(x, P))[0]}
  for path, spec in specs.items():
    if path.endswith(("attn/q/kernel", "attn/k/kernel", "attn/v/kernel", "mlp/up/kernel",
                      "mlp/gate/kernel")):
      assert spec == P(None, "model"), path
    elif path.endswith(("attn/o/kernel", "mlp/down/kernel")):
      assert spec == P("model", None), path
    elif path.endswith(("q/bias", "k/bias", "v/bias", "up/bias")):
      assert spec == P("model"), path
    elif "norm" in path or path.endswith(("o/bias", "down/bias")):
      assert spec == P(None), path
    elif path == "embed/embedding":  # vocab 60 does not divide 4: split the hidden dim instead
      assert spec == (P(None, "model") if cfg.vocab_size % 4 else P("model", None)), path
    elif path == "lm_head/kernel":
      assert spec == P(None, "model"), path
    elif path == "pos_embed/embedding":
      assert spec == P(None, None), path
    else:
      pytest.fail(f"parameter {path} not covered by this test")


def test_a_parameter_without_a_rule_is_an_error():
  with pytest.raises(ValueError, match="no partition rule for parameter 'layers/0/adapter'"):
    rules.logical_axes("layers/0/adapter", 2)


def test_kv_heads_that_do_not_divide_the_model_axis_are_replicated_or_rejected():
  mesh = par.make_mesh(1, 8)
  plan = rules.make_plan(CFG, mesh)  # 4 kv heads, model=8
  assert plan.rules["kv_heads"] is None and plan.rules["heads"] == "model"
  assert any("num_kv_heads=4" in n for n in plan.notes)
  with pytest.raises(ValueError, match=r"'model' has size 8, which does not divide "
                                       r"num_kv_heads=4"):
    rules.make_plan(CFG, mesh, replicate_kv=False)


def test_mesh_that_does_not_divide_heads_names_the_axis():
  mesh = par.make_mesh(1, 3)
  six_heads = checkpoint.abstract_model(dataclasses.replace(CFG, num_heads=6, num_kv_heads=3))
  with pytest.raises(ValueError, match=r"mesh axis 'model' has size 3, which does not divide "
                                       r"num_heads=8 of model 1 \(llama\).*\[1, 2, 4, 8\]"):
    par.check_models([six_heads, checkpoint.abstract_model(CFG)], mesh, 8)
  with pytest.raises(ValueError, match="'model' has size 3.*num_heads=8"):
    par.shard_model(checkpoint.abstract_model(CFG), mesh)


def test_mesh_that_does_not_divide_the_batch_names_the_axis():
  mesh = par.make_mesh(4, 2)
  msg = r"mesh axis 'data' has size 4, which does not divide the batch size 6.*multiple of 4"
  with pytest.raises(ValueError, match=msg):
    par.shard_batch(jnp.zeros((6, 5), jnp.int32), mesh)
  with pytest.raises(ValueError, match=msg):
    par.shard_cache(init_cache(CFG, 6, 16), CFG, mesh)
  with pytest.raises(ValueError, match=msg):
    with jax.set_mesh(mesh):
      jax.jit(lambda: par.constrain_cache(init_cache(CFG, 6, 16), CFG)).lower()


# ---- placement and parity -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
  return create_model(CFG, seed=1)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (BATCH, 7)).astype(np.int32)
  lengths = rng.integers(1, 8, (BATCH,)).astype(np.int32)
  nxt = rng.integers(0, CFG.vocab_size, (BATCH, 3)).astype(np.int32)
  return tokens, lengths, nxt


def _prefill_then_step(model, cache, tokens, lengths, nxt):
  last, cache = forward_prompt(model, cache, tokens, lengths)
  logits, cache = forward(model, cache, nxt, cache.pos)
  return last, logits, cache


run = jax.jit(_prefill_then_step, donate_argnums=1,
              compiler_options={"xla_backend_optimization_level": 0})  # compiles fast


@pytest.fixture(scope="module")
def reference(model, batch):
  last, logits, _ = run(model, model.init_cache(BATCH, 16), *map(jnp.asarray, batch))
  return np.asarray(last), np.asarray(logits)


@pytest.mark.parametrize("data, mp", MESHES)
def test_forward_under_a_mesh_matches_one_device_and_is_really_sharded(model, batch, reference,
                                                                       data, mp):
  mesh = par.make_mesh(data, mp)
  sharded = par.shard_model(model, mesh)
  q = leaf(sharded, "layers/0/attn/q/kernel")
  assert q.sharding.spec == P(None, "model")
  assert shard_shape(q) == (32, 64 // mp)
  assert shard_shape(leaf(sharded, "layers/1/attn/o/kernel")) == (64 // mp, 32)
  assert shard_shape(leaf(sharded, "layers/1/mlp/down/kernel")) == (64 // mp, 32)
  assert shard_shape(leaf(sharded, "embed/embedding")) == (64 // mp, 32)
  kv_split = mp if CFG.num_kv_heads % mp == 0 else 1  # 4 kv heads on model=8: replicated
  assert shard_shape(leaf(sharded, "layers/0/attn/k/kernel")) == (32, 32 // kv_split)
  assert shard_shape(leaf(sharded, "layers/0/attn_norm/scale")) == (32,)

  cache = par.shard_cache(sharded.init_cache(BATCH, 16), CFG, mesh)
  tokens, lengths, nxt = par.shard_batch(tuple(map(jnp.asarray, batch)), mesh)
  assert shard_shape(tokens) == (BATCH // data, 7)
  last, logits, cache = run(sharded, cache, tokens, lengths, nxt)
  want_kv = (BATCH // data, 16, CFG.num_kv_heads // kv_split, CFG.head_dim)
  for k in cache.k + cache.v:  # the cache stays sharded through the jitted update
    assert shard_shape(k) == want_kv
    assert len(k.sharding.device_set) == 8
  assert shard_shape(cache.pos) == (BATCH // data,)
  np.testing.assert_allclose(np.asarray(last), reference[0], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), reference[1], atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(logits).argmax(-1), reference[1].argmax(-1))


def test_caches_made_inside_jit_follow_the_ambient_mesh():
  mesh = par.make_mesh(2, 4)
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: par.constrain_cache(init_cache(CFG, BATCH, 16), CFG))()
  assert shard_shape(cache.k[0]) == (BATCH // 2, 16, CFG.num_kv_heads // 4, CFG.head_dim)
  assert shard_shape(cache.pos) == (BATCH // 2,)
  outside = jax.jit(lambda: par.constrain_cache(init_cache(CFG, BATCH, 16), CFG))()
  assert len(outside.k[0].sharding.device_set) == 1  # no mesh set: a no-op


def test_load_model_restores_straight_into_shards(model, tmp_path):
  checkpoint.save_model(model, tmp_path / "m")
  mesh = par.make_mesh(2, 4)
  shardings = lambda abstract: par.model_shardings(abstract, mesh)  # noqa: E731
  for loaded in (checkpoint.load_model(tmp_path / "m", shardings=shardings),
                 par.load_model(tmp_path / "m", mesh=mesh)):
    q = leaf(loaded, "layers/0/attn/q/kernel")
    assert q.sharding.mesh == mesh and shard_shape(q) == (32, 16)
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, loaded.params),
                                jax.tree_util.tree_map(np.asarray, model.params))
  # the arrows run one way: parallel builds on checkpoint, never the reverse
  assert "from jax_specens.parallel" not in Path(checkpoint.__file__).read_text()


def test_tensor_parallel_off_keeps_a_small_model_whole_on_each_device(model):
  small = par.shard_model(model, par.make_mesh(2, 4), tensor_parallel=False)
  q = leaf(small, "layers/0/attn/q/kernel")
  assert shard_shape(q) == q.shape and len(q.sharding.device_set) == 8


def test_ensemble_on_disjoint_submeshes(model, batch, reference):
  other = jax.tree_util.tree_map(lambda x: x * 1.5, model)
  meshes = par.submeshes([dict(data=2, model=2), dict(model=4)])
  a, b = par.shard_models([model, other], meshes)
  assert par.device_ids(a.params) == frozenset({0, 1, 2, 3})
  assert par.device_ids(b.params) == frozenset({4, 5, 6, 7})
  assert shard_shape(leaf(b, "layers/0/attn/q/kernel")) == (32, 16)
  # each model runs its own program on its own devices
  tokens, lengths, nxt = par.shard_batch(tuple(map(jnp.asarray, batch)), meshes[0])
  cache = par.shard_cache(a.init_cache(BATCH, 16), CFG, meshes[0])
  last, _, _ = run(a, cache, tokens, lengths, nxt)
  np.testing.assert_allclose(np.asarray(last), reference[0], atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="model 0 is on devices .* but model 1 on"):
    par.place.same_devices([a, b])
  with pytest.raises(ValueError, match="sub-meshes 0 and 1 share device 0"):
    par.shard_models([model, other], [meshes[0], meshes[0]])
  shared = par.shard_models([model, other], par.make_mesh(2, 4))
  par.place.same_devices(shared)
