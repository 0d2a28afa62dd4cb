"""`jax-specens train-fusion` end to end on the saved grammar models, and its input errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.checkpoint import load_tokenizer
from jax_specens.cli import fusion_args
from jax_specens.cli.main import main
from jax_specens.decode import decode
from jax_specens import fusion
from jax_specens.fusion import FusionHeadFn, TreeVerifier, load_verifier
from jax_specens.fusion.learned import LearnedEnsemble, learned_ensemble
from jax_specens.sampling import SamplingParams


def test_train_fusion_writes_every_verifier(grammar_model_dirs, tmp_path, capsys):
  draft, assistant, corpus = grammar_model_dirs
  tok = load_tokenizer(draft)
  assert tok.decode(tok("t3 t40 t7")["input_ids"]) == "t3 t40 t7"
  out = tmp_path / "fusion"
  args = ["train-fusion", "--draft", str(draft), "--model", str(assistant), "--data", str(corpus),
          "--out", str(out), "--steps", "60", "--seq-len", "33", "--tree-depth", "3", "--quiet"]
  assert main(args) == 0
  assert sorted(p.name for p in out.iterdir()) == ["head", "metrics.json", "tree.json",
                                                   "weights_head"]
  assert not list(tmp_path.glob(".fusion.tmp-*"))
  metrics = json.loads((out / "metrics.json").read_text())
  assert json.loads(capsys.readouterr().out.split("\nwrote")[0]) == metrics["verifiers"]
  assert metrics["positions"]["total"] == 150 * 32
  v = metrics["verifiers"]
  assert v["learned"]["accuracy"] >= v["rule"]["accuracy"] and v["tree"]["accuracy"] > 0.9
  assert metrics["ensemble_nll"]["learned"] < metrics["ensemble_nll"]["uniform"]
  assert isinstance(load_verifier("tree", out), TreeVerifier)
  assert isinstance(load_verifier("learned", out), FusionHeadFn)
  # the weights head as an ensemble function: log r over the vocabulary, weights sum to 1
  ens = learned_ensemble(out)
  assert isinstance(ens, LearnedEnsemble)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 48)), jnp.float32)
  log_r = ens(logits, SamplingParams.make(3))
  np.testing.assert_allclose(np.exp(np.asarray(log_r)).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ens.weights(logits)).sum(-1), 1.0, rtol=1e-5)
  # existing OUT is refused, and kept as it was
  assert main(args) == 2
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(ValueError, match="verifier head, not ensemble weights"):
    learned_ensemble(out / "head")


def test_train_fusion_bad_input(grammar_model_dirs, tmp_path, capsys):
  draft, assistant, _ = grammar_model_dirs
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  base = ["train-fusion", "--draft", str(draft), "--model", str(assistant), "--quiet"]
  for data, message in ((empty, "corpus is empty"), (tmp_path / "nope.txt", "does not exist")):
    assert main(base + ["--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
  with pytest.raises(SystemExit):
    main(base + ["--data", str(empty), "--out", str(tmp_path / "o"), "--head", "forest"])


def test_generate_cosd_flags(grammar_model_dirs, tmp_path, capsys):
  """`generate --method cosd` with a trained tree verifier == decode(method="cosd") with it."""
  draft, assistant, corpus = grammar_model_dirs
  out = tmp_path / "fusion"
  assert main(["train-fusion", "--draft", str(draft), "--model", str(assistant), "--data",
               str(corpus), "--out", str(out), "--head", "verifier", "--steps", "20",
               "--seq-len", "33", "--quiet"]) == 0
  capsys.readouterr()
  base = ["generate", "--draft", str(draft), "--model", str(assistant), "--method", "cosd",
          "--prompt", "t3 t8", "--prompt", "t40", "--max-new-tokens", "10", "--temperature", "0"]
  assert main(base + ["--verifier", "tree", "--verifier-path", str(out), "--window", "3",
                      "--json"]) == 0
  got = json.loads(capsys.readouterr().out)
  tok = load_tokenizer(draft)
  from jax_specens.checkpoint import load_model
  want = decode(load_model(assistant), np.array([[3, 8], [40, 0]]), np.array([2, 1]),
                method="cosd", draft=load_model(draft), gamma=3, max_new_tokens=10,
                temperature=0.0, verifier=load_verifier("tree", out))
  assert got["tokens"] == want.to_lists()
  assert tok.decode(got["tokens"][1]).split()[0].startswith("t")
  assert got["stats"]["model_calls"][1] == got["stats"]["steps"]
  # misplaced or missing fusion options
  for extra, message in (
      (["--verifier", "learned"], "needs a trained checkpoint"),
      (["--verifier", "learned", "--verifier-path", str(tmp_path / "no")], "does not exist"),
      (["--method", "ar", "--alpha", "0.3"], "--alpha apply to --method cosd, not ar"),
      (["--method", "cosd", "--fusion-head", str(out)], "applies to --method ensemble/se")):
    args = [a for a in base if a not in ("--method", "cosd")] + extra
    if "--method" not in extra:
      args += ["--method", "cosd"]
    if extra[:2] == ["--method", "ar"]:
      args = [a for a in args if a not in ("--draft", str(draft))]
    assert main(args) == 2, extra
    assert message in capsys.readouterr().err, extra
  assert fusion_args.VERIFIERS == fusion.VERIFIERS
