"""GGUF import, specified on tiny GGUF files written offline (tests/gguf_files.py).

- a GGUF written from a random transformers model the way llama.cpp writes it (q/k rows permuted
  for llama, Gemma norms as 1 + w; Qwen2 with q/k/v biases, Qwen3 with q/k norms and a head_dim
  of its own) converts back to a model with the PyTorch model's logits and greedy tokens, and
  transformers' own GGUF loader reads the Qwen files to the same model;
- every supported ggml type dequantizes to what transformers' independent torch dequantizer (or
  the float cast) gives, and close to the weights that were quantized;
- the dtype policy: bfloat16 files stay bfloat16, float16 and quantized files become float32,
  `load_model` loads the stored dtype, `jax-specens convert` says dtype and memory;
- bad files (not GGUF, truncated, unknown or undequantizable ggml type, unsupported architecture)
  fail with an error naming the problem, before anything is written.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_specens
from checkpoints_conversion import convert
from checkpoints_conversion.gguf_file import GGUFTensors
from jax_specens.cli.main import main
from jax_specens.precision import describe, stored_dtype
from tests import gguf_files
from tests.gguf_files import CHAT_TEMPLATE, HIDDEN, VOCAB, write_gguf

UP = "blk.0.ffn_up.weight"
UP_HF = "model.layers.0.mlp.up_proj.weight"


# GGUF architecture -> the family it converts to
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


def _hf_model(arch: str):
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM
  common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                max_position_embeddings=64, head_dim=64, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=0, pad_token_id=None)
  if arch == "qwen3":  # 4 heads of 128 in a width of 256: the head size comes from key_length
    # (transformers' GGUF loader ignores key_length and takes Qwen3Config's default, 128)
    cfg = AutoConfig.for_model(arch, num_attention_heads=4, num_key_value_heads=2,
                               rope_theta=10000.0, tie_word_embeddings=False,
                               **{**common, "head_dim": 128})
  elif arch in ("llama", "qwen2"):
    cfg = AutoConfig.for_model(arch, num_attention_heads=4, num_key_value_heads=2,
                               rope_theta=10000.0, tie_word_embeddings=arch == "qwen2", **common)
  else:
    cfg = AutoConfig.for_model(
        "gemma3_text", num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
        query_pre_attn_scalar=64, layer_types=["sliding_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **common)
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():  # norms away from their init so that a missed `1 + w` shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.3)
  return model


@pytest.fixture(scope="module")
def hf_models():
  return {arch: _hf_model(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_gguf_converts_to_the_torch_model(arch, hf_models, tmp_path):
  import torch
  hf = hf_models[arch]
  out = convert(write_gguf(tmp_path / "m.gguf", hf, arch), tmp_path / "out", progress=False)
  model = jax_specens.load_model(out)
  assert model.config.family == ARCHS[arch]
  assert model.config.tie_embeddings == (arch in ("gemma3", "qwen2"))
  assert model.config.qkv_bias == (arch == "qwen2") and model.config.qk_norm == (
      arch in ("qwen3", "gemma3"))
  prompt = np.random.default_rng(0).integers(3, VOCAB, (1, 10)).astype(np.int32)
  ours, _ = jax_specens.forward(model, model.init_cache(1, 16), jnp.asarray(prompt),
                                jnp.zeros(1, jnp.int32))
  with torch.no_grad():
    ref = hf(torch.from_numpy(prompt).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
  with torch.no_grad():
    want = hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].numpy()
  got = jax_specens.decode(model, jnp.asarray(prompt), jnp.array([prompt.shape[1]]),
                           method="ar", max_new_tokens=8, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got.tokens)[0, :8], want)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_transformers_reads_the_tiny_qwen_files_as_written(arch, hf_models, tmp_path):
  # llama.cpp's converter permutes q/k rows only for llama: transformers' GGUF loader, which
  # undoes what llama.cpp does per architecture, gives back the model these files were written from
  import torch
  from transformers import AutoModelForCausalLM
  hf = hf_models[arch]
  write_gguf(tmp_path / "m.gguf", hf, arch)
  loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                dtype=torch.float32)
  want = hf.state_dict()
  for name, value in loaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)


def test_tokenizer_chat_template_and_end_of_turn_ids(hf_models, tmp_path):
  from transformers import AutoTokenizer
  path = write_gguf(tmp_path / "m.gguf", hf_models["llama"], "llama")
  out = convert(path, tmp_path / "out", progress=False)
  assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
  # eos (0, "<|endoftext|>") and the end-of-turn "<|im_end|>" (2), as llama.cpp stops
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
  assert jax_specens.load_model(out).config.eos_token_ids == (0, 2)
  ours, ref = jax_specens.load_tokenizer(out), AutoTokenizer.from_pretrained(
      str(tmp_path), gguf_file="m.gguf")
  messages = [{"role": "user", "content": "hi!"}]
  ids = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 return_dict=False)
  assert ids == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
  assert ids[0] == 1 and 2 in ids  # <|im_start|> and <|im_end|> stay whole


def _reference_dequant(kind: str, raw: np.ndarray, shape) -> np.ndarray:
  """Independent of gguf-py: transformers' torch dequantizer, or the plain float cast."""
  import ml_dtypes
  if kind == "F16":
    return raw.view(np.float16).astype(np.float32).reshape(shape)
  if kind == "BF16":
    return raw.view(ml_dtypes.bfloat16).astype(np.float32).reshape(shape)
  import gguf
  import torch
  from transformers.integrations.gguf.dequant import dequantize
  qtype = int(gguf.GGMLQuantizationType[kind])
  return dequantize(torch.from_numpy(raw.copy()).reshape(-1), qtype).numpy().reshape(shape)


# type -> max |dequantized - original| / max |original| (None: random K-quant blocks)
TYPES = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.15, "Q4_K": None,
         "Q5_K": None, "Q6_K": None}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_dequantize_matches_reference(kind, hf_models, tmp_path):
  hf = hf_models["llama"]
  path = write_gguf(tmp_path / "m.gguf", hf, "llama", types={UP: kind})
  files = GGUFTensors(path)
  assert files.dtype(UP_HF) == kind
  raw = next(t for t in files.reader.tensors if t.name == UP).data
  got = files.read(UP_HF)
  want = _reference_dequant(kind, np.asarray(raw), files.shape(UP_HF))
  np.testing.assert_array_equal(got, want)
  original = gguf_files.gguf_tensors(hf, "llama")[UP]
  if TYPES[kind] is not None:
    assert np.abs(got - original).max() <= TYPES[kind] * np.abs(original).max()


def _kernel(model, dtype=None):
  up = nnx.to_pure_dict(model.params)["layers"][0]["mlp"]["up"]["kernel"]
  return np.asarray(up if dtype is None else up.astype(dtype))


def test_dtype_policy(hf_models, tmp_path, capsys):
  hf = hf_models["llama"]
  names = list(gguf_files.gguf_tensors(hf, "llama"))
  matrices = {n: "BF16" for n in names if "norm" not in n}
  bf16 = write_gguf(tmp_path / "bf16.gguf", hf, "llama", types=matrices)
  f16 = write_gguf(tmp_path / "f16.gguf", hf, "llama", types={n: "F16" for n in matrices})
  q4k = write_gguf(tmp_path / "q4k.gguf", hf, "llama", types={UP: "Q4_K"})

  assert main(["convert", str(bf16), str(tmp_path / "a"), "--quiet"]) == 0
  model = jax_specens.load_model(tmp_path / "a")
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(model.params)))
  assert stored_dtype(tmp_path / "a") == jnp.bfloat16 and _kernel(model).dtype == jnp.bfloat16
  assert f"bfloat16, {n_params * 2 / 1e6:.0f} MB" in capsys.readouterr().out
  assert describe(model) == f"bfloat16, {n_params * 2 / 1e6:.0f} MB"
  assert _kernel(jax_specens.load_model(tmp_path / "a", dtype=jnp.float32)).dtype == jnp.float32

  convert(f16, tmp_path / "b", progress=False)  # float16 -> float32 (lossless), not bfloat16
  assert stored_dtype(tmp_path / "b") == jnp.float32
  convert(f16, tmp_path / "c", dtype="bfloat16", progress=False)
  assert stored_dtype(tmp_path / "c") == jnp.bfloat16

  convert(q4k, tmp_path / "d", progress=False)
  model = jax_specens.load_model(tmp_path / "d")
  assert stored_dtype(tmp_path / "d") == jnp.float32
  np.testing.assert_array_equal(_kernel(model), GGUFTensors(q4k).read(UP_HF).T)


def _patch_type(path, name: str, new_type: int):
  """Rewrites the ggml type id of tensor `name` in the tensor-info header."""
  import gguf
  reader = gguf.GGUFReader(path)
  info = next(t for t in reader.tensors if t.name == name).field
  type_offset = info.offset + sum(p.nbytes for p in info.parts[:4])
  with open(path, "r+b") as f:
    f.seek(type_offset)
    f.write(np.uint32(new_type).tobytes())


def _bad(kind: str, hf, tmp_path):
  path = tmp_path / "bad.gguf"
  if kind == "not gguf":
    path.write_text("{\"model_type\": \"llama\"}")
  elif kind == "unsupported architecture":
    write_gguf(path, hf, "llama", metadata={"general.architecture": "phi3"})
  else:
    write_gguf(path, hf, "llama")
    data = path.read_bytes()
    if kind == "truncated header":
      path.write_bytes(data[:200])
    elif kind == "truncated data":
      path.write_bytes(data[:len(data) // 2])
    elif kind == "unknown ggml type":
      _patch_type(path, UP, 250)
    elif kind == "type without dequantizer":
      _patch_type(path, UP, 15)  # Q8_K: known to gguf, but no dequantizer (and the size differs)
  return path


BAD = {
    "not gguf": "is not a GGUF file",
    "truncated header": "truncated or corrupt",
    "truncated data": "truncated",
    "unknown ggml type": "ggml type 250",
    "type without dequantizer": "Q8_K",
    "unsupported architecture": ("unsupported GGUF architecture 'phi3'; supported: llama, "
                                 "qwen2, qwen3, gemma3"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_fail_clearly_and_write_nothing(kind, hf_models, tmp_path, capsys):
  path = _bad(kind, hf_models["llama"], tmp_path)
  with pytest.raises(ValueError, match=BAD[kind].replace("(", r"\(")):
    convert(path, tmp_path / "out", progress=False)
  assert main(["convert", str(path), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert BAD[kind].split(";")[0] in err and "Traceback" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_float16_safetensors_convert_to_float32(hf_models, tmp_path):
  import copy

  import torch
  hf = copy.deepcopy(hf_models["llama"]).to(torch.float16)
  hf.save_pretrained(str(tmp_path / "hf"))
  convert(tmp_path / "hf", tmp_path / "out", progress=False)  # auto: float16 is not bfloat16
  model = jax_specens.load_model(tmp_path / "out")
  assert stored_dtype(tmp_path / "out") == jnp.float32 and _kernel(model).dtype == jnp.float32
  np.testing.assert_array_equal(
      _kernel(model), hf.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T)


def test_gguf_conversion_needs_no_torch(hf_models, tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  path = write_gguf(tmp_path / "m.gguf", hf_models["llama"], "llama", types={UP: "Q4_K"})
  code = ("import sys; sys.modules['torch'] = None  # any `import torch` fails\n"
          "from checkpoints_conversion import convert\n"
          f"convert({str(path)!r}, {str(tmp_path / 'out')!r}, progress=False)\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
  assert (tmp_path / "out" / "jax_specens.json").is_file()
  assert (tmp_path / "out" / "tokenizer.json").is_file()
