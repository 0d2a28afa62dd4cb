"""A feature draft that also reads its target's layers (EAGLE-3's low / middle / high features),
as a specification.

`ModelConfig.feature_taps`: beside the final-normed feature f, the target returns the
RMS-normalised residual stream after each tapped layer, and the draft's `feature_fc` maps the
`(1 + taps) D` vector to D before its `fuse`; along its chain it reads its own D-wide output as
before. Specified here:
- the taps are the normed outputs of those layers, the same with scanned layers, and come after
  the unchanged final feature;
- a draft given taps (`model.tapped`) starts exactly where it was (`feature_fc` = [I; 0]);
- greedy sd with a draft that reads its taps equals ar (unrolled and scanned target), and its
  proposals depend on the taps;
- `train-draft --feature-taps`: continuing an untapped draft starts at its held-out numbers,
  writes the taps beside the features, trains, and the directory serves sd losslessly; bad taps
  are refused before any work.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_specens.checkpoint import load_model
from jax_specens.decoding.api import decode
from jax_specens.draft import TrainConfig, train_draft
from jax_specens.draft.model import init_from_target, tapped
from jax_specens.models import create_model
from jax_specens.models.layout import scanned, unrolled
from jax_specens.step import forward_hidden
from tests.decode_models import LENGTHS, PROMPTS, config, scaled
from tests.test_train_draft import TARGET, TINY, assert_greedy_sd_equals_ar

TAPS = (0, 2)


@functools.cache
def target4():
  return scaled(create_model(config(layers=4), seed=5), 15.0)


@functools.cache
def tapped_draft(tap_weight: float = 0.5):
  """Layer 0 of `target4` and 33 of its head rows, reading f and the taps (weight `tap_weight`)."""
  target = target4()
  draft = tapped(init_from_target(target, [0], tuple(range(0, 64, 2)) + (63,), features=True),
                 target, TAPS)
  pure = nnx.to_pure_dict(draft.params)
  d = target.config.hidden_size
  pure["feature_fc"]["kernel"] = jnp.concatenate(
      [jnp.eye(d)] + [tap_weight * jnp.eye(d)] * len(TAPS))
  params = draft.params
  nnx.replace_by_pure_dict(params, pure)
  return draft.replace(params=params)


def _pass(model, tokens, taps=(), features=None):
  b, t = tokens.shape
  return forward_hidden(model, model.init_cache(b, t), tokens, jnp.zeros((b,), jnp.int32),
                        features=features, taps=taps)


def test_taps_are_the_normed_outputs_of_those_layers_in_both_layouts():
  target = target4()
  tokens = jnp.asarray(PROMPTS)
  logits, x, _ = _pass(target, tokens, TAPS)
  plain_logits, plain, _ = _pass(target, tokens)
  d = target.config.hidden_size
  assert x.shape == plain.shape[:-1] + ((1 + len(TAPS)) * d,)
  np.testing.assert_array_equal(x[..., :d], plain)
  np.testing.assert_array_equal(logits, plain_logits)
  # the residual stream after each layer, block by block
  module = target.module()
  cache = target.init_cache(*tokens.shape)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  h, outs = module.embed(tokens), []
  for i, block in enumerate(module.layers):
    h, _, _ = block(h, positions, cache.k[i], cache.v[i], cache.ring[i])
    outs.append(h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6))
  for j, layer in enumerate(TAPS):
    np.testing.assert_allclose(x[..., (1 + j) * d:(2 + j) * d], outs[layer], rtol=1e-5,
                               atol=1e-5)
  _, xs, _ = _pass(scanned(target), tokens, TAPS)
  np.testing.assert_allclose(xs, x, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not layers of this 4-layer model"):
    _pass(target, tokens, (4,))


def test_a_tapped_draft_starts_where_it_was():
  target = target4()
  parent = init_from_target(target, [0], tuple(range(64)), features=True)
  child = tapped(parent, target, TAPS)
  tokens = jnp.asarray(PROMPTS)
  _, feats, _ = _pass(target, tokens, TAPS)
  d = target.config.hidden_size
  a, _, _ = _pass(parent, tokens, features=feats[..., :d])
  b, _, _ = _pass(child, tokens, features=feats)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  c, _, _ = _pass(child, tokens, features=feats[..., :d])  # its own outputs: D wide, no map
  np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="without taps"):
    tapped(child, target, TAPS)


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_greedy_sd_with_taps_equals_ar(gamma, layout):
  target = target4() if layout == "unrolled" else scanned(target4())
  kw = dict(max_new_tokens=20, temperature=0.0)
  ar = decode(target, PROMPTS, LENGTHS, method="ar", **kw)
  sd = decode(target, PROMPTS, LENGTHS, method="sd", draft=tapped_draft(), gamma=gamma, **kw)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  np.testing.assert_array_equal(sd.lengths, ar.lengths)
  assert 0 < int(np.sum(sd.stats.accepted)) < int(np.sum(sd.stats.proposed))


def test_the_taps_change_the_proposals():
  kw = dict(max_new_tokens=20, temperature=0.0, method="sd", gamma=3)
  a = decode(target4(), PROMPTS, LENGTHS, draft=tapped_draft(0.5), **kw)
  b = decode(target4(), PROMPTS, LENGTHS, draft=tapped_draft(0.0), **kw)
  assert not np.array_equal(a.stats.row_accepted, b.stats.row_accepted)


def test_a_draft_reading_layers_its_target_lacks_is_refused():
  with pytest.raises(ValueError, match=r"layers \[0, 2\] .* target has 1"):
    decode(create_model(config(), seed=0), PROMPTS, LENGTHS, method="sd", draft=tapped_draft(),
           max_new_tokens=2, temperature=0.0)


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
  """An untapped feature draft (20 steps), then continued with taps on its labels."""
  root = tmp_path_factory.mktemp("taps")
  recipe = dataclasses.replace(TINY, features=True)
  cfg = TrainConfig(batch_size=8, max_steps=20, eval_every=10, learning_rate=3e-3, unroll=2)
  m1 = train_draft(TARGET, root / "first", recipe, cfg, progress=False)
  m2 = train_draft(TARGET, root / "tapped", dataclasses.replace(recipe, feature_taps=(1, 2)),
                   cfg, checkpoint_dir=root / "first.ckpt", init_from=root / "first",
                   progress=False)
  return root, m1, m2


def test_continuing_with_taps_starts_at_the_parent_and_trains(phases):
  root, m1, m2 = phases
  for key in ("loss", "loss_2", "agree", "alpha"):
    assert m2["initial_eval"][key] == pytest.approx(m1["final_eval"][key], rel=1e-4), key
  assert m2["final_eval"]["loss"] < m2["initial_eval"]["loss"] - 0.005
  taps = np.load(root / "first.ckpt" / "features_taps1-2_test.npy")
  feats = np.load(root / "first.ckpt" / "features_test.npy")
  assert taps.shape == feats.shape[:-1] + (2 * feats.shape[-1],)
  assert m2["read_bytes_ratio"] > m1["read_bytes_ratio"]
  _, draft, _, _ = assert_greedy_sd_equals_ar(root / "tapped")
  assert draft.config.feature_taps == (1, 2)
  fc = nnx.to_pure_dict(unrolled(draft).params)["feature_fc"]["kernel"]  # [(1 + taps) D, D]
  assert np.abs(np.asarray(fc)[draft.config.hidden_size:]).max() > 1e-4  # the taps are read


def test_bad_taps_are_refused_before_any_work(phases, tmp_path):
  root, _, _ = phases
  recipe = dataclasses.replace(TINY, features=True)
  with pytest.raises(ValueError, match="--feature-taps"):
    train_draft(TARGET, tmp_path / "x", dataclasses.replace(recipe, feature_taps=(4,)),
                TrainConfig(max_steps=1), checkpoint_dir=tmp_path / "c", progress=False)
  with pytest.raises(ValueError, match="pass --feature-taps 1,2 to continue it"):
    train_draft(TARGET, tmp_path / "x", recipe, TrainConfig(max_steps=1),
                checkpoint_dir=root / "first.ckpt", init_from=root / "tapped", progress=False)
  with pytest.raises(ValueError, match="add --features"):
    dataclasses.replace(TINY, feature_taps=(1,))
  assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()
