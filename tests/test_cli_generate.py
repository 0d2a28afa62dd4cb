"""`jax-specens generate`: the CLI decodes exactly what `decode()` decodes, prints text or one JSON
line, stops at the models' EOS ids, and rejects bad arguments with a message and exit code 2."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jax_specens import create_model, decode, load_model, load_tokenizer
from jax_specens.checkpoint import save_model
from jax_specens.cli.generate import as_flags
from jax_specens.cli.main import main
from tests.decode_models import config, scaled
from tests.fixtures_real import gguf_parsed_once

WORDS = "the cat sat on a mat and dog ran far away to big red house".split()
EOS = (35, 60)  # row 0 of the greedy output below meets 35, row 1 neither
N = 8
PROMPTS = ["the cat sat on", "a dog ran"]


def save_tokenizer(directory):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
  vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>"
                          ).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  save_tokenizer(root / "tok")
  cfg = dataclasses.replace(config(), eos_token_ids=EOS)
  dirs = []
  for seed in (0, 1):
    d = save_model(scaled(create_model(cfg, seed=seed), 15.0), root / f"m{seed}",
                   tokenizer_dir=root / "tok")
    dirs.append(str(d))
  return dirs


def cli(capsys, *argv):
  code = main(["generate", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def reference(dirs, method, **kw):
  tok = load_tokenizer(dirs[0])
  rows = [tok.encode(p) for p in PROMPTS]
  lens = np.array([len(r) for r in rows], np.int32)
  prompts = np.zeros((2, lens.max()), np.int32)
  for i, r in enumerate(rows):
    prompts[i, :len(r)] = r
  models = [load_model(d) for d in dirs]
  return decode(models if len(models) > 1 else models[0], prompts, lens, method=method,
                max_new_tokens=N, stop_ids=list(EOS), key=jax.random.key(0), **kw)


def test_ar_json_and_text_match_decode(model_dirs, capsys):
  args = ["--model", model_dirs[0], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
          "--max-new-tokens", str(N), "--temperature", "0"]
  code, out, _ = cli(capsys, *args, "--json")
  assert code == 0
  got = json.loads(out)
  ref = reference(model_dirs[:1], "ar", temperature=0.0)
  assert got["tokens"] == ref.to_lists()
  assert got["lengths"] == [len(t) for t in got["tokens"]]
  assert set(got["finish_reasons"]) == {"stop", "length"}  # one row hit an EOS id, one did not
  for toks, reason in zip(got["tokens"], got["finish_reasons"]):
    assert (toks[-1] in EOS) == (reason == "stop")
    assert not set(toks[:-1]) & set(EOS)
  assert got["stats"]["model_calls"] == [max(got["lengths"])]
  # texts: one string per prompt, detokenized with the model's tokenizer, without the stop id
  tok = load_tokenizer(model_dirs[0])
  texts = [tok.decode(t[:-1] if r == "stop" else t, skip_special_tokens=True)
           for t, r in zip(ref.to_lists(), got["finish_reasons"])]
  assert got["texts"] == texts and all(texts)
  # without --json: one line of text per prompt, the same texts
  code, out, err = cli(capsys, *args)
  assert out.splitlines() == [f"[{i}] {t}" for i, t in enumerate(texts)]
  assert "ar:" in err and "tokens" in err


def test_se_json_reports_stats(model_dirs, capsys):
  code, out, _ = cli(capsys, "--model", model_dirs[0], "--model", model_dirs[1], "--method", "se",
                     "--gamma", "2", "--weights", "0.6,0.4", "--prompt", PROMPTS[0], "--prompt",
                     PROMPTS[1], "--max-new-tokens", str(N), "--temperature", "0.8",
                     "--seed", "3", "--json")
  assert code == 0
  got = json.loads(out)
  assert set(got) == {"texts", "tokens", "lengths", "finish_reasons", "stats"}
  assert len(got["texts"]) == 2 and all(isinstance(t, str) for t in got["texts"])
  st = got["stats"]
  assert len(st["model_calls"]) == 2 and min(st["model_calls"]) > 0
  assert 0 <= st["accepted"] <= st["proposed"]
  assert st["acceptance_rate"] == pytest.approx(st["accepted"] / st["proposed"])
  assert all(0 < n <= N for n in got["lengths"])


def test_scan_layers_decodes_the_same_tokens(model_dirs, capsys):
  argv = ["--model", model_dirs[0], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
          "--max-new-tokens", str(N), "--temperature", "0", "--no-stop", "--json"]
  unrolled, scanned = (json.loads(cli(capsys, *argv, *more)[1]) for more in ([], ["--scan-layers"]))
  assert scanned["tokens"] == unrolled["tokens"] and scanned["texts"] == unrolled["texts"]


@pytest.mark.parametrize("argv,message", [
    (["--method", "sd"], "--draft"),
    (["--weights", "0.5,0.2", "--method", "ensemble", "--model", "{m1}"], "sum to 1"),
    (["--gamma", "0", "--method", "se", "--model", "{m1}"], "use e.g. --gamma 4"),
    (["--gamma", "1,2,3", "--method", "se", "--model", "{m1}"], "--gamma has 3 entries"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--gamma", "2"], "not --method ar; drop --gamma 2"),
    (["--gamma", "2", "--method", "ensemble", "--model", "{m1}"], "not --method ensemble"),
    (["--chat"], "give --prompt TEXT"),
    (["--prompt", "the cat", "--chat"], "no chat template"),
    (["--prompt", "the cat", "--system", "be brief"], "--system needs --chat"),
])
def test_bad_arguments_exit_2_with_message(model_dirs, capsys, argv, message):
  argv = [a.format(m1=model_dirs[1]) for a in argv]
  prompt = [] if "--prompt-ids" in argv or "--prompt" in argv else ["--prompt-ids", "1,2"]
  code, out, err = cli(capsys, "--model", model_dirs[0], *prompt, "--max-new-tokens", "4", *argv)
  assert code == 2 and out == ""
  assert message in err
  assert "Traceback" not in err
  # errors name the command's flags, never decode()'s Python keywords
  assert not any(f"{k}=" in err for k in ("gamma", "temperature", "top_p", "weights", "draft"))


def test_chat_without_a_template_is_named_before_any_weights_load(model_dirs, capsys,
                                                                   monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("weights loaded before the chat template was checked")
  monkeypatch.setattr("jax_specens.checkpoint.load_model", no_loading)
  code, out, err = cli(capsys, "--model", model_dirs[0], "--prompt", "the cat", "--chat",
                       "--max-new-tokens", "4")
  assert code == 2 and out == "" and "no chat template" in err and "Traceback" not in err


@pytest.mark.parametrize("message,flags", [
    ("gamma must be >= 1 tokens per model, got 0; use e.g. gamma=4",
     "--gamma must be >= 1 tokens per model, got 0; use e.g. --gamma 4"),
    ("method 'ar' takes no draft model; use method='sd' for draft + target",
     "method 'ar' takes no draft model; use --method sd for draft + target"),
    ("top_p must be in (0, 1]; pass temperature=0 for greedy",
     "--top-p must be in (0, 1]; pass --temperature 0 for greedy"),
    ("needs a draft model: pass draft=... (the --draft DIR option)",
     "needs a draft model: pass --draft ... (the --draft DIR option)"),
    ("max_new_tokens must be a positive int", "--max-new-tokens must be a positive int"),
    ("the models have different tokenizers", "the models have different tokenizers"),
])
def test_library_errors_are_rewritten_as_flags(message, flags):
  assert as_flags(message) == flags


def test_prompt_ids_json_has_texts(model_dirs, capsys):
  code, out, _ = cli(capsys, "--model", model_dirs[0], "--prompt-ids", "4,5,6", "--temperature",
                     "0", "--max-new-tokens", str(N), "--json")
  assert code == 0
  got = json.loads(out)
  tok = load_tokenizer(model_dirs[0])
  toks = got["tokens"][0]
  body = toks[:-1] if got["finish_reasons"][0] == "stop" else toks
  assert got["texts"] == [tok.decode(body, skip_special_tokens=True)]
  assert got["finish_reasons"][0] in ("stop", "length", "cache_full")


def test_missing_model_dir(tmp_path, capsys):
  code, _, err = cli(capsys, "--model", str(tmp_path / "nope"), "--prompt-ids", "1",
                     "--max-new-tokens", "2")
  assert code == 2 and "convert" in err


def test_help_lists_generate(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  assert "generate" in capsys.readouterr().out


@pytest.mark.real
def test_real_chat_answers_paris_and_stops_like_transformers(real_smollm2, smollm2_gguf, capsys):
  """SmolLM2-135M-Instruct, --chat greedy: the answer names Paris and ends at <|im_end|> (finish
  reason stop), token for token what transformers' greedy generate() gives on the same template
  (the reference model: transformers' own load of the GGUF file, float32)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  question = "What is the capital of France?"
  code, out, err = cli(capsys, "--model", str(real_smollm2), "--chat", "--prompt", question,
                       "--max-new-tokens", "32", "--temperature", "0", "--json")
  assert code == 0, err
  got = json.loads(out)
  assert "Paris" in got["texts"][0] and got["finish_reasons"] == ["stop"]
  with gguf_parsed_once():  # one parse of the file for the tokenizer and the model
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert got["tokens"][0][-1] == im_end and im_end not in got["tokens"][0][:-1]
    assert got["texts"][0] == tok.decode(got["tokens"][0][:-1], skip_special_tokens=True)
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent),
                                              gguf_file=smollm2_gguf.name, dtype=torch.float32)
  with torch.no_grad():
    ref = hf.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=im_end)
  assert got["tokens"][0] == ref[0, ids["input_ids"].shape[1]:].tolist()
