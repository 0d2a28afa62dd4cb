"""The shipped built-in models: they load, they are specialists, and eval-fusion / demo use them."""

import argparse
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import fusion
from jax_specens.fusion.learned import LearnedEnsemble
from jax_specens.builtin import (BUILTIN_MODELS, DISTILLED_DRAFTS, MODELS_DIR, builtin_dir,
                                 builtin_model, builtin_tokenizer, data, evaluate)
from jax_specens.builtin import fusion_eval as fe

SEQ_LEN = 64


@pytest.fixture(scope="module")
def models():
  return {name: builtin_model(name) for name in BUILTIN_MODELS}


@pytest.fixture(scope="module")
def test_windows():
  """Per domain, the first SEQ_LEN + 1 tokens of 8 held-out documents spread over the test split."""
  tok = builtin_tokenizer().backend_tokenizer
  out = {}
  for domain in data.DOMAINS:
    ids = [tok.encode(d.text).ids for d in data.documents(domain, "test")]
    ids = [x for x in ids if len(x) > SEQ_LEN]
    out[domain] = np.asarray([x[:SEQ_LEN + 1] for x in ids[::max(1, len(ids) // 8)][:8]],
                             np.int32)
    assert out[domain].shape == (8, SEQ_LEN + 1)
  return out


def test_shipped_models_fit_the_size_budget_and_share_the_tokenizer(models):
  distilled = [MODELS_DIR / name for name in DISTILLED_DRAFTS]
  total = sum(f.stat().st_size for f in MODELS_DIR.rglob("*")
              if f.is_file() and not any(d in f.parents for d in distilled))
  assert total <= 24 * 2**20, f"shipped models take {total / 2**20:.1f} MB > 24 MB"
  for d in distilled:  # drafts of real targets, own weights in bf16 (README "Distilling a draft")
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size <= 42 * 2**20, f"{d.name} takes {size / 2**20:.1f} MB > 42 MB"
  vocab = len(builtin_tokenizer())
  for name, model in models.items():
    assert model.config.family == "llama" and model.config.vocab_size == vocab
    assert (builtin_dir(name) / "tokenizer.json").read_bytes() == (
        MODELS_DIR / "tokenizer" / "tokenizer.json").read_bytes()
  size = lambda m: sum(x.size for x in jax.tree_util.tree_leaves(m.params))
  assert size(models["draft"]) < min(size(models["code"]), size(models["prose"]))
  record = json.loads((MODELS_DIR / "training.json").read_text())
  assert set(record["models"]) == set(BUILTIN_MODELS)


def test_unknown_or_missing_builtin_model_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown built-in model 'poetry'"):
    builtin_dir("poetry")
  with pytest.raises(FileNotFoundError, match="train-builtin"):
    builtin_dir("code", models_dir=tmp_path)


def test_specialists_beat_the_other_specialist_and_the_draft_on_their_own_domain(
    models, test_windows):
  names = ("code", "prose", "draft")
  nll = {domain: dict(zip(names, evaluate.mean_nll(
      [models[n] for n in names], test_windows[domain], batch_size=2)))
         for domain in data.DOMAINS}
  # At least 0.3 nats (a 35% lower perplexity) better than the other specialist.
  assert nll["code"]["code"] < nll["code"]["prose"] - 0.3, nll
  assert nll["prose"]["prose"] < nll["prose"]["code"] - 0.3, nll
  # and better than the smaller general draft, trained for as many steps
  assert nll["code"]["code"] < nll["code"]["draft"], nll
  assert nll["prose"]["prose"] < nll["prose"]["draft"], nll
  assert all(np.isfinite(v) for d in nll.values() for v in d.values())


def test_score_batch_matches_each_definition(models, test_windows):
  """Per position: singles are the models' NLL; cosd never replacing is the draft (code), always
  replacing is the assistant (prose) where their argmaxes differ; wprob is a 50/50 mixture."""
  tokens = jnp.asarray(np.concatenate([test_windows["code"][:1], test_windows["prose"][:1]]))
  verifiers = {"rule": fusion.ConstantVerifier(False), "tree": fusion.ConstantVerifier(True),
               "learned": fusion.load_verifier("rule")}
  learned = LearnedEnsemble(fusion.init_head(fusion.HeadConfig("weights")))
  ordered = tuple(models[n] for n in fe.SINGLE)
  nll, correct = jax.device_get(fe.score_batch(ordered, verifiers, learned, tokens))
  col = {m: i for i, m in enumerate(fe.METHODS)}
  chex.assert_shape(nll, (2, SEQ_LEN, len(fe.METHODS)))
  ref = tokens[:, 1:]
  logits = [evaluate.teacher_forced_logits(m, tokens[:, :-1]) for m in ordered]
  for name, lg in zip(fe.SINGLE, logits):
    np.testing.assert_allclose(nll[..., col[name]], evaluate.token_nll(lg, ref), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(correct[..., col[name]], np.asarray(jnp.argmax(lg, -1) == ref))
  np.testing.assert_array_equal(nll[..., col["cosd rule"]], nll[..., col["code"]])
  differ = np.asarray(jnp.argmax(logits[0], -1) != jnp.argmax(logits[1], -1))
  assert differ.any() and (~differ).any()
  np.testing.assert_array_equal(nll[..., col["cosd tree"]],
                                np.where(differ, nll[..., col["prose"]], nll[..., col["code"]]))
  mix = -np.logaddexp(-nll[..., col["code"]], -nll[..., col["prose"]]) + np.log(2.0)
  np.testing.assert_allclose(nll[..., col["ensemble wprob"]], mix, rtol=1e-4, atol=1e-4)


def _parse(module, argv):
  parser = argparse.ArgumentParser()
  module.add_parser(parser.add_subparsers())
  return parser.parse_args(argv)


def test_eval_fusion_writes_the_table_json_and_verifiers(tmp_path, capsys):
  from jax_specens.cli import eval_fusion
  out = tmp_path / "ef"
  args = _parse(eval_fusion, ["eval-fusion", "--out", str(out), "--seq-len", str(SEQ_LEN),
                              "--test-windows", "2", "--fusion-windows", "8", "--head-steps", "4",
                              "--batch-size", "2", "--no-plot", "--no-progress"])
  assert args.run(args) == 0
  record = json.loads((out / "eval_fusion.json").read_text())
  table = record["table"]
  assert table["positions"] == {"code": 2 * SEQ_LEN, "prose": 2 * SEQ_LEN, "mixed": 4 * SEQ_LEN}
  for group in fe.GROUPS:
    for method in fe.METHODS:
      row = table[group][method]
      assert 1.0 < row["perplexity"] < 5000 and 0.0 <= row["accuracy"] <= 1.0
      assert np.isclose(row["perplexity"], np.exp(row["nll"]))
  # mixed = both domains pooled (equal numbers of positions)
  mixed_nll = (table["code"]["code"]["nll"] + table["prose"]["code"]["nll"]) / 2
  assert np.isclose(table["mixed"]["code"]["nll"], mixed_nll, rtol=1e-5)
  assert "| cosd tree |" in (out / "eval_fusion.md").read_text()
  assert fusion.load_verifier("tree", out / "verifiers" / "tree.json") is not None
  assert fusion.load_verifier("learned", out / "verifiers" / "head") is not None
  assert "best fused method" in capsys.readouterr().out


def test_eval_fusion_rejects_bad_settings_before_work(tmp_path):
  from jax_specens.cli import eval_fusion
  args = _parse(eval_fusion, ["eval-fusion", "--out", str(tmp_path / "x"), "--test-windows", "0"])
  with pytest.raises(ValueError, match="--test-windows must be >= 1"):
    args.run(args)
  assert not (tmp_path / "x").exists()


def test_demo_prints_every_method_side_by_side(tmp_path, capsys):
  from jax_specens.cli import demo
  runs = "ar (code),ensemble"
  args = _parse(demo, ["demo", "--builtin", "--max-new-tokens", "3", "--runs", runs,
                       "--json", str(tmp_path / "demo.json")])
  assert args.run(args) == 0
  printed = capsys.readouterr().out
  result = json.loads((tmp_path / "demo.json").read_text())
  assert list(result["results"]) == runs.split(",")
  for name, r in result["results"].items():
    assert len(r["outputs"]) == len(demo.PROMPTS) and r["tokens"] > 0 and r["tokens_per_s"] > 0
    for output in r["outputs"]:
      # as shown: newlines and tabs as symbols, the table's trailing spaces stripped
      assert output[:20].replace("\n", "⏎").replace("\t", "⇥").rstrip() in printed
  assert "tokens/s" in printed and "acceptance" in printed
  for _, prompt in demo.PROMPTS:
    assert prompt.replace("\n", "⏎") in printed
  with pytest.raises(ValueError, match="unknown demo run"):
    demo.run(_parse(demo, ["demo", "--builtin", "--runs", "beam"]))


def test_demo_gamma_auto_shows_the_gamma_each_row_chose(tmp_path, capsys):
  from jax_specens.cli import demo
  args = _parse(demo, ["demo", "--builtin", "--max-new-tokens", "4", "--runs", "se,cosd",
                       "--gamma", "auto", "--json", str(tmp_path / "demo.json")])
  assert args.run(args) == 0
  results = json.loads((tmp_path / "demo.json").read_text())["results"]
  se = results["se"]["gamma"]  # one per model, chosen by the calibration
  assert len(se) == 2 and all(1 <= g <= 8 for g in se)
  assert results["cosd"]["gamma"] == demo.COSD_AUTO_WINDOW  # cosd is not priced: a fixed window
  printed = capsys.readouterr().out
  assert f"{se[0]},{se[1]}" in printed and "gamma" in printed


@pytest.mark.parametrize("text", ["0", "-1", "three", "auto,2"])
def test_demo_gamma_must_be_a_positive_integer_or_auto(text, capsys):
  from jax_specens.cli import demo
  with pytest.raises(SystemExit):
    _parse(demo, ["demo", "--gamma", text])
  assert "--gamma takes an integer >= 1 or 'auto'" in capsys.readouterr().err
