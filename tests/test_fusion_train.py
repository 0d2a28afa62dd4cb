"""Harvesting, the tree verifier's array export and training of the fusion head (docs/algorithms.md §4-5).

The models are the two tiny grammar models of `fixtures_fusion`: the draft knows region A, the
assistant knows region B, and in region C the draft is right but unsure while the assistant is
confidently wrong, so the CoSD rule (docs/algorithms.md §4) makes mistakes a feature-based verifier can avoid.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.fusion import (HeadConfig, feature_names, fit_tree, harvest_texts, harvest_tokens,
                                init_head, load_verifier, save_head)
from jax_specens.fusion import features as F
from jax_specens.fusion.harvest import Harvest, windows
from jax_specens.fusion.train import TrainConfig, train_head, verifier_metrics, weights_metrics

SMALL = TrainConfig(max_steps=60, eval_every=20, batch_size=128, warmup_steps=5, patience=10)


def test_windows_score_every_next_token_pair_once():
  tokens, lengths = windows([[1, 2, 3, 4, 5, 6], [7], [8, 9]], seq_len=4)
  np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [4, 5, 6, 0], [8, 9, 0, 0]])
  np.testing.assert_array_equal(lengths, [4, 3, 2])
  pairs = {(int(r[i]), int(r[i + 1])) for r, n in zip(tokens, lengths) for i in range(n - 1)}
  assert pairs == {(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (8, 9)}


def test_harvest_labels_follow_the_reference(fusion_harvests):
  fit, held_out = fusion_harvests
  assert len(fit) == 240 * 32 and len(held_out) == 120 * 32  # every next-token pair, no padding
  f, y = fit.features, fit.labels
  agree = f[:, F.AGREE] == 1.0
  # a replace label needs the candidates to differ; where they agree the label is keep or neither
  assert not np.any(agree & (y == 1))
  # all three label kinds occur, and the draft's probability of its own token is its top-1 prob
  assert set(np.unique(y).tolist()) == {-1, 0, 1}
  assert np.all(f[:, F.P_D_XD] >= f[:, F.P_D_XA] - 1e-6)
  assert np.all(f[:, F.P_A_XA] >= f[:, F.P_A_XD] - 1e-6)
  np.testing.assert_array_less(fit.ref_logprobs, 1e-6)


def test_harvest_labels_equal_the_spec_labels_of_the_reference_tokens(
    fusion_harvests, grammar_models, reference_corpus):
  """docs/algorithms.md §4, recomputed per position of the first windows: label 0 (keep) where the draft's
  argmax is the reference's next token, 1 (replace) where only the assistant's is, -1 else."""
  from jax_specens import forward, init_cache
  tokens, lengths = windows(reference_corpus[0], seq_len=33)
  tokens, lengths = tokens[:6], lengths[:6]
  cands = [np.argmax(np.asarray(forward(m, init_cache(m.config, 6, 33), jnp.asarray(tokens),
                                        jnp.zeros((6,), jnp.int32))[0]), -1)
           for m in grammar_models]
  want = []
  for r in range(6):
    for i in range(lengths[r] - 1):
      nxt = tokens[r, i + 1]
      want.append(0 if cands[0][r, i] == nxt else 1 if cands[1][r, i] == nxt else -1)
  np.testing.assert_array_equal(fusion_harvests[0].labels[:len(want)], want)
  assert set(want) == {-1, 0, 1}


def test_tree_export_matches_sklearn_and_round_trips(fusion_harvests, tmp_path):
  from sklearn.tree import DecisionTreeClassifier
  data = fusion_harvests[0].labelled()
  tree = fit_tree(data.features, data.labels, max_depth=3, min_samples_leaf=20)
  ref = DecisionTreeClassifier(max_depth=3, min_samples_leaf=20, random_state=0).fit(
      data.features, data.labels)
  x = fusion_harvests[1].features
  want = ref.predict_proba(x)[:, list(ref.classes_).index(1)]
  got = jax.jit(lambda t, f: t.scores(f))(tree, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  path = tree.save(tmp_path)
  assert path.name == "tree.json"
  again = load_verifier("tree", tmp_path)
  chex.assert_trees_all_close(again, tree)
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(x))), want > 0.5)


def test_learned_and_tree_verifiers_at_least_as_accurate_as_the_rule(fusion_harvests, tmp_path):
  fit, held_out = fusion_harvests
  train, evals = fit.split(0.2, seed=0)
  head, history = train_head(train, evals, TrainConfig(max_steps=150, eval_every=25),
                             progress=False)
  assert history["best_eval_loss"] < 0.5 * history["initial_eval_loss"]
  assert [e["step"] for e in history["evals"]] == [25, 50, 75, 100, 125, 150]
  save_head(head, tmp_path / "head")
  loaded = load_verifier("learned", tmp_path)  # the train-fusion output dir holds head/
  labelled = train.labelled()
  tree = fit_tree(labelled.features, labelled.labels, max_depth=3)
  m = verifier_metrics({"rule": load_verifier("rule"), "tree": tree, "learned": loaded}, held_out)
  print({k: v for k, v in m.items()})
  assert m["learned"]["accuracy"] >= m["rule"]["accuracy"]
  assert m["tree"]["accuracy"] >= m["rule"]["accuracy"]
  assert m["learned"]["auc"] > m["rule"]["auc"]
  # this construction leaves the rule clearly wrong in region C
  assert m["rule"]["accuracy"] < 0.9 < m["learned"]["accuracy"]


def test_resumed_training_reaches_the_uninterrupted_result(fusion_harvests, tmp_path):
  train, evals = fusion_harvests[0].split(0.2, seed=1)
  full, full_hist = train_head(train, evals, SMALL, checkpoint_dir=tmp_path / "a",
                               progress=False)

  class Stop(Exception):
    pass

  def interrupt(step, record):
    if step == 40:
      raise Stop

  with pytest.raises(Stop):
    train_head(train, evals, SMALL, checkpoint_dir=tmp_path / "b", callback=interrupt,
               progress=False)
  resumed, hist = train_head(train, evals, SMALL, checkpoint_dir=tmp_path / "b", progress=False)
  assert hist["resumed_from"] == 40
  assert [e["step"] for e in hist["evals"]] == [60]
  assert hist["evals"][0] == full_hist["evals"][-1]
  chex.assert_trees_all_close(resumed.state, full.state, rtol=1e-6)


def test_weights_head_mixture_beats_uniform_and_sums_to_one(fusion_harvests):
  fit, held_out = fusion_harvests
  train, evals = fit.split(0.2, seed=2)
  head, history = train_head(train, evals, TrainConfig(kind="weights", max_steps=60,
                                                       eval_every=20), progress=False)
  assert history["best_eval_loss"] < history["initial_eval_loss"]
  lam = np.asarray(head.weights(jnp.asarray(held_out.features)))
  np.testing.assert_allclose(lam.sum(-1), 1.0, rtol=1e-5)
  m = weights_metrics(head, held_out)
  assert m["learned"] < m["uniform"] < min(m["model_0"], m["model_1"])


def test_bad_inputs_give_clear_errors(grammar_models, tmp_path):
  with pytest.raises(ValueError, match="corpus is empty"):
    harvest_tokens(grammar_models, [[3], []], progress=False)
  with pytest.raises(ValueError, match="corpus is empty"):
    harvest_texts(grammar_models, tokenizer=None, texts=["", "  \n"])
  with pytest.raises(ValueError, match=r"ids must be in \[0, 48\).*another tokenizer"):
    harvest_tokens(grammar_models, [[1, 2, 99]], progress=False)
  with pytest.raises(ValueError, match="at least 2 models"):
    harvest_tokens(grammar_models[:1], [[1, 2, 3]], progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no fusion head checkpoint.*train-fusion"):
    load_verifier("learned", tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no decision tree.*train-fusion"):
    load_verifier("tree", tmp_path / "empty")
  head = init_head(HeadConfig(kind="verifier"))
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 9\].*got shape \(5, 4\)"):
    head.scores(jnp.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 9\]"):
    fit_tree(np.zeros((5, 8)), np.zeros(5))
  with pytest.raises(ValueError, match="trained as kind 'verifier'.*--head weights"):
    head.weights(jnp.zeros((5, 9)))
  save_head(init_head(HeadConfig(kind="weights")), tmp_path / "w")
  with pytest.raises(ValueError, match="ensemble-weights head, not a verifier"):
    load_verifier("learned", tmp_path / "w")
  with pytest.raises(ValueError, match="no labelled"):
    train_head(Harvest(np.zeros((4, 9), np.float32), np.full(4, -1, np.int8),
                       np.zeros((4, 2), np.float32)),
               Harvest(np.zeros((4, 9), np.float32), np.zeros(4, np.int8),
                       np.zeros((4, 2), np.float32)), SMALL, progress=False)
  assert len(feature_names()) == 9
