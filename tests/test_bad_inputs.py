"""Bad inputs that reach the disk, the memory or the positions of a model: each is refused with one
line that names the file (or the number) and the fix, before anything is jitted.

- a converted checkpoint with a corrupt, truncated or missing file: `CheckpointError` (a
  ValueError) naming the file and saying "convert again"; the CLI prints one line and exits 2;
- a request past the models' trained positions (unless allowed) or past the device's memory;
- a safetensors index whose entries, or symlinks, lead out of the model directory;
- the same through `generate`, `train-fusion` and the text API.

The other bad-argument lists: tests/test_decode_errors.py (decode), tests/test_cli_generate.py,
tests/test_conversion.py, tests/test_fusion_cli.py.
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import jax_specens
from jax_specens import cache
from jax_specens.checkpoint import CheckpointError, load_model, load_tokenizer, save_model
from jax_specens.builtin import builtin_dir
from jax_specens.cli.main import main
from jax_specens.decoding.api import decode
from jax_specens.decoding import api as decoding_api
from checkpoints_conversion.tensors import TensorFiles, safetensors_files


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """The built-in draft model (2 layers, vocab 4096, 256 positions) saved by `save_model` (so its
  config records the size of every params/ file), with its tokenizer."""
  out = tmp_path_factory.mktemp("ckpt") / "good"
  save_model(load_model("builtin:draft"), out, tokenizer_dir=builtin_dir("draft"))
  return out


def broken(good, tmp_path, rel: str, how: str):
  """A copy of `good` with file `rel` truncated to half, replaced by garbage, removed, or with
  its JSON replaced by `how` (any other string)."""
  bad = tmp_path / "bad"
  shutil.copytree(good, bad)
  f = bad / rel
  if how == "truncate":
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == "garbage":
    f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256) + b"x" * (f.stat().st_size % 256))
  elif how == "missing":
    shutil.rmtree(f) if f.is_dir() else f.unlink()
  else:
    f.write_text(how)
  return bad


def biggest_params_file(directory):
  files = [p for p in (directory / "params").rglob("*") if p.is_file()]
  return str(max(files, key=lambda p: p.stat().st_size).relative_to(directory))


CHECKPOINT_CASES = [  # (file, how, what the message names besides "convert again")
    ("jax_specens.json", "truncate", "jax_specens.json: not valid JSON"),
    ("jax_specens.json", "missing", "jax_specens.json: missing"),
    ("jax_specens.json", "[1, 2]", "not a JSON object"),
    ("jax_specens.json", '{"format_version": 1}', "not a jax_specens model config"),
    ("params", "missing", "params: the parameter directory is missing"),
    ("BIGGEST", "truncate", "(truncated)"),
    ("params/_METADATA", "missing", "_METADATA: missing"),
    ("params/_METADATA", "garbage", "cannot be read"),
    ("tokenizer.json", "truncate", "tokenizer.json: not valid JSON"),
    ("tokenizer_config.json", "missing", "tokenizer_config.json: missing"),
    ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON"),
]


@pytest.mark.parametrize("rel,how,message", CHECKPOINT_CASES,
                         ids=[f"{r}-{h[:8]}" for r, h, _ in CHECKPOINT_CASES])
def test_corrupt_checkpoint_raises_checkpoint_error(good, tmp_path, rel, how, message):
  rel = biggest_params_file(good) if rel == "BIGGEST" else rel
  bad = broken(good, tmp_path, rel, how)
  with pytest.raises(CheckpointError) as e:
    load_model(bad)
    load_tokenizer(bad)
  text = str(e.value)
  assert message in text and "convert again" in text and "\n" not in text
  assert isinstance(e.value, ValueError) and jax_specens.CheckpointError is CheckpointError


@pytest.mark.parametrize("rel,how", [("BIGGEST", "truncate"), ("tokenizer.json", "truncate"),
                                     ("jax_specens.json", "garbage")])
def test_cli_prints_one_line_and_exits_2_on_a_corrupt_checkpoint(good, tmp_path, capfd, rel, how):
  rel = biggest_params_file(good) if rel == "BIGGEST" else rel
  bad = broken(good, tmp_path, rel, how)
  assert main(["generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "convert again" in err[0] and rel.split("/")[-1] in err[0], err


def test_checkpoint_without_size_record_still_names_params(good, tmp_path):
  """A checkpoint written before sizes were recorded: orbax's failure becomes a CheckpointError."""
  bad = broken(good, tmp_path, biggest_params_file(good), "truncate")
  meta = json.loads((bad / "jax_specens.json").read_text())
  del meta["params_files"]
  (bad / "jax_specens.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="params.*cannot be read.*convert again"):
    load_model(bad)


# -- requests that cannot fit: refused before anything is allocated or jitted ------------------

@pytest.fixture
def no_jit(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("decode reached the jitted loop with a request that cannot fit")
  monkeypatch.setattr(decoding_api, "_generate", fail)


def small_model():
  from tests.decode_models import models
  return models()[0]  # vocab 64, max_position_embeddings 128


def test_decode_past_max_positions_is_refused_unless_allowed(no_jit):
  with pytest.raises(ValueError, match=r"128 positions.*at most 123.*allow_past_max_positions"):
    decode(small_model(), np.ones((1, 5), np.int32), [5], max_new_tokens=124)
  with pytest.raises(AssertionError, match="reached the jitted loop"):  # allowed: it would run
    decode(small_model(), np.ones((1, 5), np.int32), [5], max_new_tokens=124,
           allow_past_max_positions=True)


def test_decode_beyond_device_memory_is_refused(no_jit, monkeypatch):
  monkeypatch.setattr(cache, "available_memory", lambda: (20_000, "test memory"))
  with pytest.raises(ValueError, match=r"needs about .* GiB .* test memory has 0.0 GiB free; "
                                       r"lower max_new_tokens to at most \d+"):
    decode(small_model(), np.ones((2, 5), np.int32), [5, 5], max_new_tokens=120)


def test_memory_estimate_counts_kv_caches_of_every_model():
  cfg = small_model().config  # 1 layer, 2 kv heads of 8
  assert cache.kv_bytes(cfg, 3, 100, 4) == 2 * 1 * 3 * 100 * 2 * 8 * 4
  # 2 x 3 rows x 100 slots x 384 bytes of K and V, + ids and logits: ~83 kB
  cache.check_memory([cfg, cfg], [4, 4], 3, 5, 95, available=90_000)
  with pytest.raises(ValueError, match=r"2 model\(s\), batch 3, 100 slots"):
    cache.check_memory([cfg, cfg], [4, 4], 3, 5, 95, available=80_000)


def test_cli_huge_max_new_tokens_is_one_line_before_loading(good, capfd, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError("a model was loaded")
  monkeypatch.setattr("jax_specens.checkpoint.load_model", no_load)
  argv = ["generate", "--model", str(good), "--prompt", "hi", "--max-new-tokens", "10000000"]
  assert main(argv) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--max-new-tokens" in err[0] and "--allow-long" in err[0], err
  monkeypatch.setattr(cache, "available_memory", lambda: (1 << 30, "test memory"))
  assert main(argv + ["--allow-long"]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "test memory has 1.0 GiB free" in err[0], err
  assert "lower --max-new-tokens to at most" in err[0]


def test_text_api_past_max_positions(good, no_jit):
  from jax_specens.text import generate_text
  with pytest.raises(ValueError, match="allow_past_max_positions"):
    generate_text(load_model(good), ["hello"], max_new_tokens=1000)


def test_text_api_without_tokenizer(good, tmp_path, no_jit):
  from jax_specens.text import generate_text
  bare = tmp_path / "bare"
  save_model(load_model(good), bare)
  with pytest.raises(ValueError, match="tokenizer"):
    generate_text(load_model(bare), ["hello"], max_new_tokens=4)


# -- safetensors files must stay inside the model directory ---------------------------------

def hf_dir(tmp_path, weight_map):
  d = tmp_path / "hf"
  d.mkdir()
  save_file({"w": np.zeros((2, 2), np.float32)}, str(d / "model-00001.safetensors"))
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return d


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.st"])
def test_index_entry_outside_the_directory_is_refused(tmp_path, name):
  outside = tmp_path / "outside.safetensors"
  save_file({"v": np.zeros((2,), np.float32)}, str(outside))
  d = hf_dir(tmp_path, {"w": "model-00001.safetensors", "v": name})
  with pytest.raises(ValueError, match="not a file name inside"):
    safetensors_files(d)


def test_symlinked_shard_leading_out_is_refused(tmp_path):
  outside = tmp_path / "elsewhere.safetensors"
  save_file({"v": np.zeros((2,), np.float32)}, str(outside))
  d = hf_dir(tmp_path, {"w": "model-00001.safetensors", "v": "model-00002.safetensors"})
  os.symlink(outside, d / "model-00002.safetensors")
  with pytest.raises(ValueError, match="symlink .* outside the model directory"):
    TensorFiles(d)


def test_symlinked_single_file_leading_out_is_refused(tmp_path):
  outside = tmp_path / "elsewhere.safetensors"
  save_file({"v": np.zeros((2,), np.float32)}, str(outside))
  d = tmp_path / "hf"
  d.mkdir()
  os.symlink(outside, d / "model.safetensors")
  with pytest.raises(ValueError, match="outside the model directory"):
    safetensors_files(d)


def test_symlink_inside_the_directory_is_fine(tmp_path):
  d = hf_dir(tmp_path, {"w": "model-00001.safetensors", "v": "link.safetensors"})
  os.symlink(d / "model-00001.safetensors", d / "link.safetensors")
  assert [p.name for p in safetensors_files(d)] == ["model-00001.safetensors", "link.safetensors"]


def test_cli_convert_refuses_an_index_leading_out(tmp_path, capfd):
  d = hf_dir(tmp_path, {"w": "../outside.safetensors"})
  (d / "config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1}))
  assert main(["convert", str(d), str(tmp_path / "out")]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "not a file name inside" in err[0], err
  assert not (tmp_path / "out").exists()


def test_train_fusion_on_a_corrupt_checkpoint(good, tmp_path, capfd):
  bad = broken(good, tmp_path, "tokenizer.json", "truncate")
  corpus = tmp_path / "c.txt"
  corpus.write_text("some text\n")
  assert main(["train-fusion", "--draft", str(bad), "--model", str(good), "--data", str(corpus),
               "--out", str(tmp_path / "o"), "--quiet"]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "tokenizer.json" in err[0] and "convert again" in err[0], err
  assert not (tmp_path / "o").exists()
