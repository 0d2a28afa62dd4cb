"""A draft that reads its target's hidden states (EAGLE style), as a specification.

`ModelConfig.feature_input`: the draft's input at position i is `fuse([embed(x_i); f_{i-1}])`,
f the final-normed hidden state the head scores (the target's for committed tokens, the draft's
own along its chain of proposals); `sd` runs `decoding/sd_features.py` for it. Specified here:
- the proposals the loop makes are those of the draft fed the target's features, checked against
  a reference written plainly (every round recomputed from scratch, no caches): the accepted
  tokens of every row and the number of loop steps are equal;
- greedy sd equals ar (ragged batch, gamma 1 and 3); sampled sd with a reduced-vocabulary
  feature draft follows the target (chi-square, V = 8), and a wrong rule fails the same test;
- such a draft is refused everywhere but as sd's draft, and without features;
- `train-draft --features`: distillation lowers the held-out loss (unrolled along the chain),
  writes the target's features beside the labels, and the directory serves sd losslessly; a
  second phase (`init_from`) continues it on the same labels, and may grow it by target layers
  that start as the identity (`grow_layers`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_specens import pricing
from jax_specens.checkpoint import load_model
from jax_specens.decoding.api import decode
from jax_specens.draft import TrainConfig, train_draft
from jax_specens.draft import data as D
from jax_specens.draft.model import init_from_target
from jax_specens.step import forward_hidden
from tests.decode_models import LENGTHS, PROMPTS, models
from tests.test_decode_sampling import DRAWS, PREFIX, V, chi2_pvalue, exact_joint
from tests.test_reduced_vocab import SUBSET, resample_inside_support, target8
from tests.test_train_draft import TARGET, TINY, assert_greedy_sd_equals_ar


def feature_draft(target, ids, feature_weight: float):
  """The target's layer 0 and head rows `ids`, reading `embed(x_i) + w * f_{i-1}` (w = 0: the
  target itself on `ids`; the larger w, the more its proposals depend on the features)."""
  draft = init_from_target(target, [0], ids, features=True)
  pure = nnx.to_pure_dict(draft.params)
  d = target.config.hidden_size
  pure["fuse"]["kernel"] = jnp.concatenate([jnp.eye(d), feature_weight * jnp.eye(d)])
  params = draft.params
  nnx.replace_by_pure_dict(params, pure)
  return draft.replace(params=params)


@functools.cache
def pair():
  target = models()[1]
  return feature_draft(target, tuple(range(0, 64, 2)) + (63,), 0.4), target


WIDTH = 32  # every uncached pass is padded to this width: one compiled program (causal)


@jax.jit
def _padded_pass(model, tokens, features):
  logits, x, _ = forward_hidden(model, model.init_cache(1, WIDTH), tokens,
                                jnp.zeros((1,), jnp.int32), features=features)
  return logits[0], x[0]


def _hidden(model, tokens, features=None):
  """One uncached pass over `tokens` `[T]`: (logits `[T, V]`, hidden `[T, D]`)."""
  t = len(tokens)
  toks = jnp.asarray([list(tokens) + [0] * (WIDTH - t)], jnp.int32)
  feats = None
  if features is not None:
    feats = np.zeros((1, WIDTH, model.config.hidden_size), np.float32)
    feats[0, :t] = np.stack(features)
  logits, x = _padded_pass(model, toks, feats)
  return np.asarray(logits[:t]), np.asarray(x[:t])


def reference_feature_sd(draft, target, prompt, n: int, gamma: int):
  """Greedy sd with a feature draft, plainly: every round recomputes the target's features over
  the committed text, runs the draft over it on them (shifted by one), then `gamma` proposals
  along its own outputs. Returns (tokens, accepted per round, as emitted)."""
  seq, out, accepted = list(prompt), [], []
  while len(out) < n:
    _, f = _hidden(target, seq)
    fin = [np.zeros_like(f[0])] + list(f[:-1])
    _, x = _hidden(draft, seq, fin)
    toks, feat, props = list(seq), x[-1], []
    for _ in range(gamma):
      logits = np.asarray(draft.module().head(jnp.asarray(feat)[None]))[0]
      props.append(int(np.argmax(logits)))
      toks.append(props[-1])
      fin.append(feat)
      feat = _hidden(draft, toks, fin)[1][-1]
    logits, _ = _hidden(target, seq + props)
    greedy = np.argmax(logits[len(seq) - 1:], axis=-1)
    a = 0
    while a < gamma and props[a] == greedy[a]:
      a += 1
    new = (props[:a] + [int(greedy[a])])[:n - len(out)]
    accepted.append(min(a, len(new)))
    out += new
    seq += new
  return out, accepted


@pytest.mark.parametrize("gamma", [1, 3])
def test_loop_proposes_what_the_draft_computes_on_the_target_features(gamma):
  draft, target = pair()
  n = 14
  out = decode(target, PROMPTS, LENGTHS, method="sd", draft=draft, gamma=gamma,
               max_new_tokens=n, temperature=0.0)
  rounds = []
  for b, length in enumerate(LENGTHS):
    toks, acc = reference_feature_sd(draft, target, PROMPTS[b, :length].tolist(), n, gamma)
    np.testing.assert_array_equal(np.asarray(out.tokens[b]), toks)
    assert int(out.stats.row_accepted[b]) == sum(acc), b
    rounds.append(len(acc))
  assert int(out.stats.steps) == max(rounds)
  assert 0 < int(np.sum(out.stats.accepted)) < int(np.sum(out.stats.proposed))
  np.testing.assert_array_equal(out.stats.model_calls, [gamma * max(rounds), max(rounds)])


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_sd_equals_ar(gamma):
  draft, target = pair()
  ar = decode(target, PROMPTS, LENGTHS, method="ar", max_new_tokens=20, temperature=0.0)
  sd = decode(target, PROMPTS, LENGTHS, method="sd", draft=draft, gamma=gamma,
              max_new_tokens=20, temperature=0.0)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  np.testing.assert_array_equal(sd.lengths, ar.lengths)


def test_features_matter():
  """The same draft without the features (w = 0) proposes otherwise: the loop reads them."""
  draft, target = pair()
  blind = feature_draft(target, draft.config.vocab_subset, 0.0)
  kw = dict(method="sd", gamma=3, max_new_tokens=14, temperature=0.0)
  a = decode(target, PROMPTS, LENGTHS, draft=draft, **kw).stats
  b = decode(target, PROMPTS, LENGTHS, draft=blind, **kw).stats
  assert not np.array_equal(a.row_accepted, b.row_accepted)


def _draw(**kw):
  draft = feature_draft(target8(), SUBSET, 0.5)
  prompts = np.tile(PREFIX, (DRAWS, 1))
  out = decode(target8(), prompts, np.full((DRAWS,), 2, np.int32), method="sd", draft=draft,
               gamma=2, max_new_tokens=2, temperature=1.0, key=jax.random.key(3), **kw)
  np.testing.assert_array_equal(out.lengths, 2)
  assert 0 < int(np.sum(out.stats.accepted)) < int(np.sum(out.stats.proposed))
  return np.asarray(out.tokens)


def test_sampled_sd_with_a_reduced_feature_draft_follows_the_target():
  samples = _draw()
  assert chi2_pvalue(samples, exact_joint([target8()], "select")) > 1e-3
  assert (~np.isin(samples, SUBSET)).mean() > 0.2  # ids the draft cannot propose are emitted


def test_a_rule_ignoring_tokens_outside_the_draft_support_fails():
  samples = _draw(acceptance_rule=resample_inside_support)
  assert chi2_pvalue(samples, exact_joint([target8()], "select")) < 1e-6


def test_a_feature_draft_is_only_sds_draft():
  draft, target = pair()
  kw = dict(max_new_tokens=2, temperature=0.0)
  for call in (lambda: decode([draft, target], PROMPTS, LENGTHS, method="se", **kw),
               lambda: decode([draft, target], PROMPTS, LENGTHS, method="ensemble", **kw),
               lambda: decode(draft, PROMPTS, LENGTHS, method="ar", **kw),
               lambda: decode(draft, PROMPTS, LENGTHS, method="sd", draft=target, **kw)):
    with pytest.raises(ValueError, match="only be the draft of method='sd'"):
      call()
  with pytest.raises(ValueError, match="needs features="):
    _hidden(draft, [1, 2, 3])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  out = tmp_path_factory.mktemp("feature_draft") / "d"
  recipe = dataclasses.replace(TINY, features=True)
  metrics = train_draft(TARGET, out, recipe,
                        TrainConfig(batch_size=8, max_steps=30, eval_every=10,
                                    learning_rate=3e-3, unroll=2), progress=False)
  return out, metrics


def test_distillation_lowers_the_held_out_loss_along_the_chain(distilled):
  out, m = distilled
  for key in ("loss", "loss_2"):
    assert m["final_eval"][key] < m["initial_eval"][key] - 0.02, key
  assert m["final_eval"]["agree"] > m["initial_eval"]["agree"]
  ckpt = out.parent / f"{out.name}.ckpt"
  feats = np.load(ckpt / "features_test.npy")
  h = D.Harvest.load(ckpt / "harvest_test.npz")
  assert feats.shape == h.tokens.shape + (load_model(TARGET).config.hidden_size,)


def test_distilled_feature_draft_serves_sd_losslessly(distilled):
  _, draft, _, _ = assert_greedy_sd_equals_ar(distilled[0])
  assert draft.config.feature_input and draft.config.num_layers == 1


def test_a_second_phase_continues_the_draft_on_the_first_phases_labels(distilled, tmp_path):
  """`init_from`: the first phase's weights, layers and K ids go on training (here along three
  proposals); its labels are read, not harvested again; distill.json keeps the first record."""
  first, m1 = distilled
  ckpt = first.parent / f"{first.name}.ckpt"
  stamps = {f.name: f.stat().st_mtime_ns for f in ckpt.glob("*.np*")}
  out = tmp_path / "second"
  m2 = train_draft(TARGET, out, dataclasses.replace(TINY, features=True, layers=(0, 1)),
                   TrainConfig(batch_size=8, max_steps=20, eval_every=10, learning_rate=3e-3,
                               unroll=3), checkpoint_dir=ckpt, init_from=first, progress=False)
  assert {f.name: f.stat().st_mtime_ns for f in ckpt.glob("*.np*")} == stamps
  assert (ckpt / f"continue-{out.name}").is_dir()
  for key in ("loss_2", "agree", "alpha"):  # it starts where the first phase ended
    assert m2["initial_eval"][key] == pytest.approx(m1["final_eval"][key], rel=1e-4), key
  assert m2["final_eval"]["loss_3"] < m2["initial_eval"]["loss_3"] - 0.02
  a, b = load_model(first), load_model(out)
  assert b.config.num_layers == 1 and b.config.vocab_subset == a.config.vocab_subset
  # the record names the draft's own layers and K, not the recipe's unused ones
  assert m2["recipe"]["layers"] == list(m1["recipe"]["layers"]) == [0]
  assert m2["recipe"]["vocab_k"] == len(a.config.vocab_subset)
  assert m2["continued_from"]["steps"] == m1["steps"] and m2["train_config"]["unroll"] == 3
  with pytest.raises(ValueError, match="add --features"):
    train_draft(TARGET, tmp_path / "x", TINY, TrainConfig(max_steps=1), checkpoint_dir=ckpt,
                init_from=first, progress=False)
  assert not (tmp_path / "x").exists()


def test_a_grown_draft_starts_where_its_parent_ended_and_trains_its_new_layer(distilled,
                                                                               tmp_path):
  """`grow_layers`: a target layer inserted before the draft's own starts as the identity (the
  held-out numbers start at the parent's), then trains; the result is a two-layer draft that
  serves sd losslessly and records both layers."""
  first, m1 = distilled
  ckpt = first.parent / f"{first.name}.ckpt"
  out = tmp_path / "grown"
  m2 = train_draft(TARGET, out, dataclasses.replace(TINY, features=True),
                   TrainConfig(batch_size=8, max_steps=20, eval_every=10, learning_rate=3e-3,
                               unroll=2), checkpoint_dir=ckpt, init_from=first, grow_layers=(1,),
                   progress=False)
  for key in ("loss", "loss_2", "agree", "alpha"):
    assert m2["initial_eval"][key] == pytest.approx(m1["final_eval"][key], rel=1e-4), key
  assert m2["final_eval"]["loss"] < m2["initial_eval"]["loss"] - 0.005
  assert m2["recipe"]["layers"] == [1, 0]
  assert m2["read_bytes_ratio"] > m1["read_bytes_ratio"]
  _, draft, _, _ = assert_greedy_sd_equals_ar(out)
  assert draft.config.num_layers == 2 and draft.config.feature_input
  new = nnx.to_pure_dict(draft.params)["layers"][0]
  assert np.abs(np.asarray(new["attn"]["o"]["kernel"])).max() > 1e-4  # no longer the identity
  with pytest.raises(ValueError, match="--init-from"):
    train_draft(TARGET, tmp_path / "x", TINY, TrainConfig(max_steps=1), checkpoint_dir=ckpt,
                grow_layers=(1,), progress=False)
  assert not (tmp_path / "x").exists()


def test_pricing_counts_the_catch_up_pass():
  """A feature draft's first pass feeds up to gamma + 1 tokens (`pricing.step_passes`)."""
  draft, target = pair()
  widths = pricing.needed_widths("sd", 4, feature_draft=True)
  costs = pricing.measure_pass_costs([draft, target], widths, batch=2, cache_len=32, repeats=1)
  assert costs.feature_draft and not pricing.measure_pass_costs(
      [target, target], [[1, 2], [1, 2]], batch=2, cache_len=32, repeats=1).feature_draft
  assert pricing.step_passes((3, 1), feature_draft=True) == [(0, 4), (0, 1), (0, 1), (1, 4)]
  assert pricing.step_passes((3, 1)) == [(0, 2), (0, 1), (0, 1), (1, 4)]
  assert pricing.step_seconds((3, 1), costs) == pytest.approx(
      costs.of(0, 4) + 2 * costs.of(0, 1) + costs.of(1, 4))


def test_gamma_auto_calibrates_a_feature_draft():
  draft, target = pair()
  ar = decode(target, PROMPTS, LENGTHS, method="ar", max_new_tokens=12, temperature=0.0)
  sd = decode(target, PROMPTS, LENGTHS, method="sd", draft=draft, gamma="auto",
              max_new_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  assert sd.gamma_choice.costs.feature_draft and 1 <= sd.gamma_choice.gamma <= 8
