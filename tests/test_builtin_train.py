"""Training the built-in models: the schedule, the time budget, and that a model really learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.builtin import train
from jax_specens.builtin import unlikelihood as ul

TINY = train.Recipe(("code",), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    steps=40, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=4)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
  lr = [train.learning_rate(TINY, i, i / TINY.steps) for i in range(TINY.steps)]
  assert lr[0] == pytest.approx(TINY.learning_rate / 4)
  assert lr[3] == pytest.approx(TINY.learning_rate)
  assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
  assert train.learning_rate(TINY, 100, 1.0) == pytest.approx(TINY.learning_rate * 0.1)
  # progress (elapsed time) drives the decay, whatever the step
  assert train.learning_rate(TINY, 5, 0.5) == pytest.approx(TINY.learning_rate * 0.55)


def test_a_tiny_model_learns_a_repeating_stream_and_the_time_budget_stops_it():
  rng = np.random.default_rng(0)
  pattern = rng.integers(1, 64, size=12)
  streams = {"code": np.tile(pattern, 200).astype(np.int32)}
  model, losses, steps = train.train_model(TINY, streams, vocab_size=64, eot=0, progress=False)
  assert steps == TINY.steps and model.config.vocab_size == 64
  # ln 64 = 4.16 at init; the repeating pattern is learned
  assert losses[0] > 3.5 and losses[-1] < 1.0, losses
  _, losses, steps = train.train_model(TINY, streams, vocab_size=64, eot=0, progress=False,
                                       seconds=1e-6)
  assert steps == 1 and len(losses) == 1


def test_unlikelihood_term_is_the_sum_over_distinct_earlier_tokens():
  rng = np.random.default_rng(0)
  inputs, targets = rng.integers(0, 7, (3, 12)), rng.integers(0, 7, (3, 12))
  logits = rng.normal(size=(3, 12, 7)).astype(np.float32)
  p = jax.nn.softmax(logits)
  # at position t: every distinct token of inputs[:t+1] except the true next token, once
  expected = np.mean([[-sum(np.log(1 - p[b, t, c]) for c in set(inputs[b, :t + 1]) - {targets[b, t]})
                       for t in range(12)] for b in range(3)])
  got = ul.token_term(jnp.asarray(logits), jnp.asarray(inputs), jnp.asarray(targets))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # a gradient step raises every other token's logit, and moves mass off the earlier tokens
  grad = jax.grad(ul.token_term)(jnp.asarray(logits), jnp.asarray(inputs),
                                           jnp.asarray(targets))
  for t in range(12):
    seen = sorted(set(inputs[0, :t + 1]) - {targets[0, t]})
    others = [c for c in range(7) if c not in seen]
    assert np.all(grad[0, t, others] < 0) and grad[0, t, seen].sum() > 0, (t, seen)


def test_repeated_ngrams_marks_what_the_continuation_already_said():
  #                 prefix | continuation: 1 2 3 1 2 3 1
  tokens = np.array([[9, 9, 1, 2, 3, 1, 2, 3, 1],
                     [1, 2, 3, 1, 2, 3, 7, 7, 7]])
  mask = ul.repeated_ngrams(tokens, start=2, n=3)
  # row 0: (1,2,3) ends at 4 and again at 7, (2,3,1) at 5 and 8
  assert mask[0].tolist() == [False] * 7 + [True, True]
  # row 1: (1,2,3) ending at 5 was said before only partly inside the continuation
  # (positions 0-2 are in the prefix); (7,7,7) is new at 8
  assert mask[1].tolist() == [False] * 9


def test_sequence_term_penalizes_only_the_marked_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
  targets = rng.integers(0, 6, (2, 5))
  negative = np.zeros((2, 5), bool)
  negative[0, 3] = negative[1, 4] = True
  p = jax.nn.softmax(logits)
  expected = -(np.log(1 - p[0, 3, targets[0, 3]]) + np.log(1 - p[1, 4, targets[1, 4]])) / 10
  got = ul.sequence_term(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(negative))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(ul.sequence_term(jnp.asarray(logits), jnp.asarray(targets),
                                jnp.zeros((2, 5), bool))) == 0.0


def test_the_repetition_phase_penalizes_the_models_own_loops():
  import dataclasses
  rng = np.random.default_rng(0)
  streams = {"code": np.tile(rng.integers(1, 64, size=12), 200).astype(np.int32)}
  recipe = dataclasses.replace(TINY, seq_len=96, repetition_steps=3)
  model, _, _ = train.train_model(recipe, streams, vocab_size=64, eot=0, progress=False)
  with pytest.raises(ValueError, match="raise seq_len or set repetition_steps=0"):
    train.finetune_repetition(model, TINY, streams, progress=False)
  before = jax.tree_util.tree_map(np.asarray, model.params)  # the model passed in is donated
  tuned, losses, repeated = train.finetune_repetition(model, recipe, streams, progress=False)
  # a model that learned a 12-token cycle continues it: most 4-grams of its continuation repeat
  assert len(repeated) == 3 and repeated[0] > 0.5, repeated
  assert len(losses) == 2 and np.all(np.isfinite(losses))  # steps 0 and 2 (every 10th, last)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                   before, tuned.params)
  assert any(jax.tree_util.tree_leaves(changed))


def test_run_trains_then_fine_tunes_and_the_record_keeps_both(tmp_path, monkeypatch):
  import dataclasses
  import json
  import shutil
  shutil.copytree(train.MODELS_DIR / "tokenizer", tmp_path / "tokenizer")  # reused: no BPE run
  rng = np.random.default_rng(0)
  streams = {d: np.tile(rng.integers(1, 4096, size=40), 125).astype(np.int32)
             for d in ("code", "prose")}
  monkeypatch.setattr(train, "token_streams", lambda tok, split: streams)
  monkeypatch.setattr(train.data, "summary", lambda: {})
  monkeypatch.setattr(train, "RECIPES", {"draft": dataclasses.replace(
      TINY, domains=("code", "prose"), seq_len=96, repetition_steps=2)})
  parser = train.add_arguments(__import__("argparse").ArgumentParser())
  common = ["--out", str(tmp_path), "--models", "draft", "--no-progress"]
  assert train.run(parser.parse_args(common + ["--repetition-steps", "0"])) == 0
  entry = json.loads((tmp_path / "training.json").read_text())["models"]["draft"]
  assert entry["steps_trained"] == TINY.steps and "train_seconds" in entry
  assert "repetition_seconds" not in entry and entry["recipe"]["repetition_steps"] == 0
  assert train.run(parser.parse_args(common + ["--repetition-only"])) == 0
  entry = json.loads((tmp_path / "training.json").read_text())["models"]["draft"]
  # the fine-tune is added to the training's record, not written over it
  assert entry["steps_trained"] == TINY.steps and "train_seconds" in entry
  assert entry["recipe"]["repetition_steps"] == 2 and entry["repetition_after_saved_model"]
  assert len(entry["repeated_share_first_last"]) == 2 and "repetition_seconds" in entry


def test_bad_arguments_are_named_before_training(tmp_path):
  parser = train.add_arguments(__import__("argparse").ArgumentParser())
  with pytest.raises(ValueError, match=r"unknown built-in model\(s\) \['poetry'\]"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--models", "poetry"]))
  with pytest.raises(ValueError, match="--steps-scale must be > 0"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--steps-scale", "0"]))
  with pytest.raises(ValueError, match="--unlikelihood must be >= 0"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--unlikelihood", "-1"]))
  with pytest.raises(ValueError, match="--repetition-steps must be >= 0"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--repetition-steps", "-2"]))
  with pytest.raises(ValueError, match="nothing to do"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--repetition-only",
                                 "--repetition-steps", "0"]))
  with pytest.raises(FileNotFoundError, match="train it first"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--models", "draft",
                                 "--repetition-only"]))
  (tmp_path / "code").mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--models", "code"]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["code"]
