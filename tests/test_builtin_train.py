"""Training the built-in models: the schedule, the time budget, and that a model really learns."""

import numpy as np
import pytest

from jax_specens.builtin import train

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


def test_bad_arguments_are_named_before_training(tmp_path):
  parser = train.add_arguments(__import__("argparse").ArgumentParser())
  with pytest.raises(ValueError, match=r"unknown built-in model\(s\) \['poetry'\]"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--models", "poetry"]))
  with pytest.raises(ValueError, match="--steps-scale must be > 0"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--steps-scale", "0"]))
  (tmp_path / "code").mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    train.run(parser.parse_args(["--out", str(tmp_path), "--models", "code"]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["code"]
