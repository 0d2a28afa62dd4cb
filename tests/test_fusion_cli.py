"""`jax-specens train-fusion` and `generate --method cosd` end to end on the saved grammar models,
the learned ensemble weights in `se`, and the commands' input errors."""

import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import fusion
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.cli import fusion_args
from jax_specens.cli.main import main
from jax_specens.decoding.api import decode
from jax_specens.fusion import FusionHeadFn, TreeVerifier, load_verifier
from jax_specens.fusion.learned import LearnedEnsemble, learned_ensemble
from jax_specens.sampling import SamplingParams


@pytest.fixture(scope="module")
def trained(grammar_model_dirs, tmp_path_factory):
  """(OUT, the command's stdout) of one train-fusion run over the grammar corpus."""
  draft, assistant, corpus = grammar_model_dirs
  out = tmp_path_factory.mktemp("fusion") / "out"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = main(["train-fusion", "--draft", str(draft), "--model", str(assistant), "--data",
               str(corpus), "--out", str(out), "--steps", "50", "--seq-len", "33",
               "--tree-depth", "3", "--quiet"])
  assert rc == 0
  return out, stdout.getvalue()


def test_train_fusion_writes_every_verifier(grammar_model_dirs, trained, capsys):
  draft, assistant, corpus = grammar_model_dirs
  out, stdout = trained
  tok = load_tokenizer(draft)
  assert tok.decode(tok("t3 t40 t7")["input_ids"]) == "t3 t40 t7"
  assert sorted(p.name for p in out.iterdir()) == ["head", "metrics.json", "tree.json",
                                                   "weights_head"]
  assert not list(out.parent.glob(".out.tmp-*"))
  metrics = json.loads((out / "metrics.json").read_text())
  assert json.loads(stdout.split("\nwrote")[0]) == metrics["verifiers"]
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
  # an existing OUT is refused
  assert main(["train-fusion", "--draft", str(draft), "--model", str(assistant), "--data",
               str(corpus), "--out", str(out)]) == 2
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


def test_generate_cosd_flags(grammar_model_dirs, trained, tmp_path, capsys):
  """`generate --method cosd` with a trained tree verifier == decode(method="cosd") with it."""
  draft, assistant, _ = grammar_model_dirs
  out, _ = trained
  base = ["generate", "--draft", str(draft), "--model", str(assistant), "--method", "cosd",
          "--prompt", "t3 t8", "--prompt", "t40", "--max-new-tokens", "10", "--temperature", "0"]
  assert main(base + ["--verifier", "tree", "--verifier-path", str(out), "--window", "3",
                      "--json"]) == 0
  got = json.loads(capsys.readouterr().out)
  want = decode(load_model(assistant), np.array([[3, 8], [40, 0]]), np.array([2, 1]),
                method="cosd", draft=load_model(draft), gamma=3, max_new_tokens=10,
                temperature=0.0, verifier=load_verifier("tree", out))
  assert got["tokens"] == want.to_lists()
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


def test_learned_weights_keep_se_lossless(grammar_models, trained):
  """Greedy se with the learned ensemble function == greedy plain ensemble with it (docs/algorithms.md §2)."""
  out, _ = trained
  ens = learned_ensemble(out)
  prompts, lengths = np.array([[3, 8], [40, 0], [20, 0]]), np.array([2, 1, 1])
  kw = dict(ensemble=ens, max_new_tokens=10, temperature=0.0)
  plain = decode(grammar_models, prompts, lengths, method="ensemble", **kw)
  se = decode(grammar_models, prompts, lengths, method="se", gamma=2, **kw)
  assert se.to_lists() == plain.to_lists()
  assert int(se.stats.accepted.sum()) > 0  # speculation did happen
