"""`train-draft`: distilling a reduced-vocabulary draft from a target, as a specification.

The small target is the built-in code model (4 layers, vocab 4096, shipped with its tokenizer);
the real one SmolLM2-135M-Instruct (marked `real`).
"""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_specens import vocab
from jax_specens.builtin import MODELS_DIR
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decoding.api import decode
from jax_specens.draft import DraftRecipe, TrainConfig, init_from_target, train_draft
from jax_specens.draft import data as D
from jax_specens.draft.pipeline import rounded, save_draft
from jax_specens.draft.prompts import prompts
from jax_specens.draft.train import train
from jax_specens.precision import stored_dtype
from tests.conftest import tiny_models_xla_env

TARGET = MODELS_DIR / "code"
TINY = DraftRecipe(layers=(0,), vocab_k=512, seq_len=32, chat_prompts=4, answer_tokens=8,
                   text_tokens=1500, eval_chat_prompts=2, eval_text_tokens=300,
                   harvest_batch=8, gen_batch=4)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  out = tmp_path_factory.mktemp("draft") / "d"
  metrics = train_draft(TARGET, out, TINY, TrainConfig(batch_size=8, max_steps=30, eval_every=10,
                                                       learning_rate=3e-3), progress=False)
  return out, metrics


def test_output_is_an_ordinary_reduced_vocab_model_directory(distilled):
  out, metrics = distilled
  draft, target = load_model(out), load_model(TARGET)
  assert draft.config.num_layers == 1 and len(draft.config.vocab_subset) == 512
  assert draft.config.vocab_size == target.config.vocab_size
  assert set(target.config.eos_token_ids) <= set(draft.config.vocab_subset)
  assert load_tokenizer(out) is not None
  saved = json.loads((out / "distill.json").read_text())
  assert saved["final_eval"] == pytest.approx(metrics["final_eval"])
  assert 0 < metrics["draft_own_bytes"] and 0 < metrics["read_bytes_ratio"] < 0.5


def test_distillation_lowers_the_held_out_kl_and_raises_agreement(distilled):
  _, m = distilled
  assert m["final_eval"]["loss"] < m["initial_eval"]["loss"] - 0.02
  assert m["final_eval"]["agree"] > m["initial_eval"]["agree"]
  assert 0 < m["final_eval"]["alpha"] <= 1


def assert_greedy_sd_equals_ar(out):
  """Greedy sd with the draft distilled into `out` prints what ar prints on two code prompts,
  accepting some proposals; returns (target, draft, prompts, lengths)."""
  target, draft = load_model(TARGET), load_model(out)
  tok = load_tokenizer(TARGET)
  toks, lens = D.pad([tok.encode("def fib(n):"), tok.encode("import os\n")])
  ar = decode(target, toks, lens, method="ar", max_new_tokens=16, temperature=0.0)
  sd = decode(target, toks, lens, method="sd", draft=draft, gamma=3, max_new_tokens=16,
              temperature=0.0)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  assert int(np.sum(sd.stats.accepted)) > 0
  return target, draft, toks, lens


def test_draft_serves_sd_and_se_losslessly_in_greedy(distilled):
  target, draft, toks, lens = assert_greedy_sd_equals_ar(distilled[0])
  ens = decode([draft, target], toks, lens, method="ensemble", max_new_tokens=16, temperature=0.0)
  se = decode([draft, target], toks, lens, method="se", gamma=2, max_new_tokens=16,
              temperature=0.0)
  np.testing.assert_array_equal(se.tokens, ens.tokens)


def _embedding(model):
  return np.asarray(nnx.to_pure_dict(model.params)["embed"]["embedding"])


def test_draft_directory_shares_the_targets_embedding_instead_of_a_copy(distilled):
  out, _ = distilled
  meta = json.loads((out / "jax_specens.json").read_text())
  assert meta["shared_params"]["from"] == str(TARGET.absolute())
  assert set(meta["shared_params"]["groups"]) == {"embed"}
  assert not any("embed" in name for name in meta["params_files"])
  target = load_model(TARGET)
  on_disk = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
  assert on_disk < _embedding(target).nbytes  # the 4096 x D table is bigger than the 1-layer draft
  # loaded alone, the embedding comes from the recorded target; given the target, it is its array
  np.testing.assert_array_equal(_embedding(load_model(out)), _embedding(target))
  draft = load_model(out, share_from=target)
  a, b = (nnx.to_pure_dict(m.params)["embed"]["embedding"] for m in (draft, target))
  assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
  bf16 = load_model(out, dtype=jnp.bfloat16, share_from=load_model(TARGET, jnp.bfloat16))
  assert nnx.to_pure_dict(bf16.params)["embed"]["embedding"].dtype == jnp.bfloat16


def test_a_draft_stored_in_bfloat16_loads_as_the_float32_it_was(distilled, tmp_path):
  out, metrics = distilled
  target = load_model(TARGET, jnp.float32)
  draft = load_model(out, jnp.float32, share_from=target)
  wide = save_draft(tmp_path / "f32", draft, TARGET, metrics)
  narrow = save_draft(tmp_path / "bf16", draft, TARGET, metrics, store_dtype="bfloat16")
  assert (stored_dtype(wide), stored_dtype(narrow)) == (jnp.float32, jnp.bfloat16)
  assert json.loads((wide / "distill.json").read_text())["stored_dtype"] == "float32"
  assert json.loads((narrow / "distill.json").read_text())["stored_dtype"] == "bfloat16"
  loaded = load_model(narrow, share_from=target)  # no dtype: the directory's load_dtype
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.params)} == {jnp.dtype(jnp.float32)}
  chex.assert_trees_all_equal(nnx.to_pure_dict(loaded.params),
                              nnx.to_pure_dict(rounded(draft, jnp.bfloat16).params))
  np.testing.assert_array_equal(_embedding(loaded), _embedding(target))


def test_a_draft_can_borrow_its_targets_tokenizer_instead_of_a_copy(distilled, tmp_path):
  """`save_draft(..., borrow_tokenizer=True)` (`train-draft --borrow-tokenizer`): no tokenizer
  files, the same tokenizer identity (so it pairs with its target), load_tokenizer reads the
  target's; a target that lost it or holds another one is named."""
  out, metrics = distilled
  target = load_model(TARGET)
  draft = load_model(out, share_from=target)
  lent = tmp_path / "lent"
  shutil.copytree(TARGET, lent)
  slim = save_draft(tmp_path / "slim", draft, lent, metrics, borrow_tokenizer=True)
  assert not any((slim / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
  assert vocab.of(load_model(slim, share_from=target)) == vocab.of(draft) == vocab.of(target)
  assert vocab.of(draft).fingerprint is not None
  text = "the draft reads its target's tokenizer"
  assert load_tokenizer(slim).encode(text) == load_tokenizer(TARGET).encode(text)
  tok = json.loads((lent / "tokenizer.json").read_text())
  tok["added_tokens"] = tok["added_tokens"] + [{**tok["added_tokens"][-1], "id": 10**6,
                                                "content": "<other>"}]
  (lent / "tokenizer.json").write_text(json.dumps(tok))
  with pytest.raises(ValueError, match="now holds another tokenizer"):
    load_tokenizer(slim)
  shutil.rmtree(lent)
  with pytest.raises(ValueError, match="is gone"):
    load_tokenizer(slim)


def test_a_draft_of_a_target_in_the_user_cache_finds_it_on_another_machine(distilled, tmp_path,
                                                                          monkeypatch):
  """A target the demo converted lives in the user cache; its draft records it relative to that
  cache (`$JAX_SPECENS_CACHE/models/NAME`), so the shipped drafts find their targets' embedding and
  tokenizer under any HOME, here a cache moved to another place."""
  out, metrics = distilled
  target = load_model(TARGET)
  draft = load_model(out, share_from=target)
  first = tmp_path / "home1" / "cache"
  monkeypatch.setenv("JAX_SPECENS_CACHE", str(first))
  shutil.copytree(TARGET, first / "models" / "code")
  slim = save_draft(tmp_path / "slim", draft, first / "models" / "code", metrics,
                    borrow_tokenizer=True)
  meta = json.loads((slim / "jax_specens.json").read_text())
  assert meta["shared_params"]["from"] == "$JAX_SPECENS_CACHE/models/code"
  assert json.loads((slim / vocab.FINGERPRINT_FILE).read_text())[vocab.BORROWED_KEY] == (
      "$JAX_SPECENS_CACHE/models/code")
  second = tmp_path / "home2" / "cache"
  shutil.move(first, second)
  monkeypatch.setenv("JAX_SPECENS_CACHE", str(second))
  np.testing.assert_array_equal(_embedding(load_model(slim)), _embedding(target))
  text = "found in this machine's cache"
  assert load_tokenizer(slim).encode(text) == load_tokenizer(TARGET).encode(text)
  monkeypatch.setenv("JAX_SPECENS_CACHE", str(first))  # a cache without the target: named
  with pytest.raises(FileNotFoundError, match="models/code, which is not there"):
    load_model(slim)


@pytest.mark.parametrize("name", ["smollm2-draft", "smollm2-feature-draft"])
def test_the_demo_prefers_the_users_own_smollm2_draft_to_the_shipped_one(tmp_path, monkeypatch,
                                                                        name):
  from jax_specens.cli import demo_real
  monkeypatch.setenv("JAX_SPECENS_CACHE", str(tmp_path))
  assert demo_real.find_draft(name) == MODELS_DIR / name
  own = tmp_path / "models" / name
  own.mkdir(parents=True)
  (own / "jax_specens.json").write_text("{}")
  assert demo_real.find_draft(name) == own


def test_a_moved_or_changed_target_is_named_with_the_fix(distilled, tmp_path):
  out, _ = distilled
  moved = tmp_path / "moved"
  shutil.copytree(out, moved)
  meta = json.loads((moved / "jax_specens.json").read_text())
  meta["shared_params"]["from"] = str(tmp_path / "gone")
  (moved / "jax_specens.json").write_text(json.dumps(meta))
  other = load_model(MODELS_DIR / "prose")  # same vocabulary, another embedding
  with pytest.raises(FileNotFoundError, match="share_from=load_model.*--model"):
    load_model(moved, share_from=other)
  np.testing.assert_array_equal(  # the right model given explicitly: found by fingerprint
      _embedding(load_model(moved, share_from=[other, load_model(TARGET)])),
      _embedding(load_model(TARGET)))
  meta["shared_params"]["from"] = str(MODELS_DIR / "prose")
  (moved / "jax_specens.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="no longer the model"):
    load_model(moved)


def test_generate_cli_runs_a_distilled_draft_given_its_target(distilled):
  out, _ = distilled
  r = subprocess.run([sys.executable, "-m", "jax_specens.cli.main", "generate", "--model",
                      str(TARGET), "--draft", str(out), "--method", "sd", "--gamma", "2",
                      "--prompt", "def fib(n):", "--max-new-tokens", "6", "--temperature", "0"],
                     capture_output=True, text=True, timeout=300, env=_tiny_env())
  assert r.returncode == 0, r.stderr


def test_greedy_answers_are_labelled_by_their_tokens_or_by_the_teacher():
  """--greedy-labels tokens: each greedy answer position's label is its next token with
  probability 1 and the prompt is not trained on; teacher: the target's top-T at every position,
  whose first id is that same token. The label cache's key tells the two apart."""
  target, tok = load_model(TARGET), load_tokenizer(TARGET)
  kw = dict(chat_prompts_n=2, answer_tokens=6, text_tokens=0, seq_len=32, top=4,
            temperatures=(0.0,), gen_batch_size=2, progress=False)
  hard = D.build_harvest(target, tok, "train", soft_answers=False, **kw)
  soft = D.build_harvest(target, tok, "train", soft_answers=True, **kw)
  chex.assert_trees_all_equal(hard.tokens, soft.tokens)
  on = hard.mask > 0
  assert np.isinf(hard.top_logp[..., 1:][on]).all() and (hard.top_logp[..., 0][on] == 0).all()
  assert np.isfinite(soft.top_logp[soft.mask > 0]).all()
  np.testing.assert_array_equal(soft.top_ids[..., 0][on], hard.top_ids[..., 0][on])
  assert soft.mask.sum() > hard.mask.sum()  # the prompt's positions too
  assert "greedy_labels" not in DraftRecipe().harvest_key()  # older caches: tokens
  assert DraftRecipe(greedy_labels="teacher").harvest_key()["greedy_labels"] == "teacher"
  assert "answer_temperatures" not in DraftRecipe(answer_temperatures=(0.0,)).harvest_key()
  assert DraftRecipe(answer_temperatures=(0.0, 1.0)).harvest_key()["answer_temperatures"] == [0, 1]
  with pytest.raises(ValueError, match="--greedy-labels"):
    DraftRecipe(greedy_labels="soft")


def test_a_prompt_family_answers_only_its_prompts():
  """--prompt-family openings: the target answers the openings' training prompts alone (a phase
  on a family the draft has not seen), and the label cache's key says so."""
  target, tok = load_model(TARGET), load_tokenizer(TARGET)
  kw = dict(chat_prompts_n=2, answer_tokens=4, text_tokens=0, seq_len=32, top=4,
            temperatures=(0.0,), gen_batch_size=2, progress=False)
  h = D.build_harvest(target, tok, "train", family="openings", **kw)
  for row, prompt in zip(h.tokens, prompts("train", "openings")[:2]):
    ids = D.chat_ids(tok, prompt)
    np.testing.assert_array_equal(row[:len(ids)], ids)
  assert "prompt_family" not in DraftRecipe().harvest_key()  # older caches: all
  assert DraftRecipe(prompt_family="openings").harvest_key()["prompt_family"] == "openings"
  with pytest.raises(ValueError, match="--prompt-family"):
    DraftRecipe(prompt_family="stories")


def _text_labels():
  """(target, hard labels of 800 stdlib tokens, their 256 most frequent ids): a tiny train set."""
  target, tok = load_model(TARGET), load_tokenizer(TARGET)
  rows = D.text_rows(tok, "train", 24, 800)
  h = D.hard_labels(rows, [1] * len(rows), 24, 4)
  return target, h, D.frequent_ids(h, 256, target.config.vocab_size)


def test_an_interrupted_run_resumes_exactly(tmp_path):
  target, h, subset = _text_labels()
  cfg = TrainConfig(batch_size=4, max_steps=12, eval_every=6)
  straight, _ = train(init_from_target(target, [0], subset), h, h, cfg,
                      checkpoint_dir=tmp_path / "a", progress=False)

  class Stop(Exception):
    pass

  def stop_at_6(step, record):
    if step == 6:
      raise Stop
  with pytest.raises(Stop):
    train(init_from_target(target, [0], subset), h, h, cfg, checkpoint_dir=tmp_path / "b",
          progress=False, callback=stop_at_6)
  resumed, hist = train(init_from_target(target, [0], subset), h, h, cfg,
                        checkpoint_dir=tmp_path / "b", progress=False)
  assert hist["resumed_from"] == 6
  for a, b in zip(*(jax_leaves(m) for m in (straight, resumed))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_keep_best_returns_the_start_when_training_only_hurts_and_keep_last_the_end():
  target, h, subset = _text_labels()
  start = init_from_target(target, [0], subset)
  ruinous = dict(batch_size=4, max_steps=4, eval_every=2, learning_rate=10.0)  # loss only rises
  best, hb = train(start, h, h, TrainConfig(**ruinous), progress=False)
  last, hl = train(start, h, h, TrainConfig(**ruinous, keep="last"), progress=False)
  assert hb["kept"] == "best" and hl["kept"] == "last"
  assert min(e["eval_loss"] for e in hl["evals"]) > hl["initial_eval"]["loss"]
  for a, b in zip(jax_leaves(best), jax_leaves(start)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax_leaves(last), jax_leaves(start)))
  with pytest.raises(ValueError, match="keep must be one of"):
    TrainConfig(keep="first")


def jax_leaves(model):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model.params)]


def _tiny_env() -> dict[str, str]:  # the builtin models only
  return {**os.environ, **tiny_models_xla_env()}


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jax_specens.cli.main", "train-draft", *args],
                        capture_output=True, text=True, timeout=300, env=_tiny_env())


def test_cli_help_and_errors_name_the_flag(tmp_path):
  assert "--vocab-k" in _cli("--help").stdout
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--layers", "0,9")
  assert r.returncode == 2 and "--layers" in r.stderr and "Traceback" not in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--steps", "0")
  assert r.returncode == 2 and "--steps" in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--unroll", "2")
  assert r.returncode == 2 and "--features" in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--layers", "0",
           "--init-from", str(tmp_path))
  assert r.returncode == 2 and "--layers and --init-from" in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--grow-layers", "0")
  assert r.returncode == 2 and "--grow-layers" in r.stderr and "--init-from" in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--grow-layers", "x")
  assert r.returncode == 2 and "--grow-layers must be comma-separated" in r.stderr
  r = _cli("--target", str(TARGET), "--out", str(tmp_path / "o"), "--grow-layers", "9",
           "--init-from", str(tmp_path))
  assert r.returncode == 2 and "--grow-layers [9] not in" in r.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["smollm2-draft", "smollm2-feature-draft", "gemma3-feature-draft"])
def test_the_shipped_drafts_name_their_targets_in_the_user_cache_not_by_a_build_path(name):
  """The shipped drafts find their target where `jax-specens demo` converts it on any machine
  (`$JAX_SPECENS_CACHE/models/NAME`), not at the build machine's absolute path."""
  d = MODELS_DIR / name
  meta = json.loads((d / "jax_specens.json").read_text())
  assert meta["shared_params"]["from"].startswith("$JAX_SPECENS_CACHE/models/")
  record = json.loads((d / vocab.FINGERPRINT_FILE).read_text())
  assert record.get(vocab.BORROWED_KEY, "$JAX_SPECENS_CACHE/").startswith("$JAX_SPECENS_CACHE/")


@pytest.mark.real
@pytest.mark.parametrize("name,target_dir,layers,k,features", [
    ("smollm2-draft", "real_smollm2", 4, 8192, False),
    ("smollm2-feature-draft", "real_smollm2", 1, 8192, True),
    ("gemma3-feature-draft", "real_gemma3", 1, 16384, True)])
def test_the_shipped_drafts_take_the_real_targets_embedding_and_sd_equals_ar(
    request, name, target_dir, layers, k, features):
  """`builtin:smollm2-draft`, `builtin:smollm2-feature-draft` and `builtin:gemma3-feature-draft`
  (distilled by `train-draft`, the last two with --features; shipped in bfloat16 without the
  embedding) fit the real targets they were distilled from: the fingerprints match, they load as
  float32, greedy sd with them prints what ar prints, and they were trained (an untrained copy of
  the same layers accepts almost nothing: held-out agreement 0.04, and 0.00 for the feature
  drafts). The Gemma draft has no tokenizer files: it speaks its target's by fingerprint."""
  target_dir = request.getfixturevalue(target_dir)
  target, tok = load_model(target_dir), load_tokenizer(target_dir)
  draft = load_model(f"builtin:{name}", share_from=target)
  a, b = (nnx.to_pure_dict(m.params)["embed"]["embedding"] for m in (draft, target))
  assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()  # matched, not loaded elsewhere
  assert vocab.of(draft) == vocab.of(target) and vocab.of(draft).fingerprint is not None
  assert len(draft.config.vocab_subset) == k and draft.config.num_layers == layers
  assert draft.config.feature_input == features
  assert {x.dtype for x in jax.tree_util.tree_leaves(draft.params)} == {jnp.dtype(jnp.float32)}
  rows = [D.chat_ids(tok, "What is gravity?"), D.chat_ids(tok, "Write a haiku about the sea.")]
  toks, lens = D.pad(rows)
  ar = decode(target, toks, lens, method="ar", max_new_tokens=16, temperature=0.0)
  sd = decode(target, toks, lens, method="sd", draft=draft, gamma=3, max_new_tokens=16,
              temperature=0.0)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  assert sd.stats.acceptance_rate > 0.15, sd.stats.to_dict()
