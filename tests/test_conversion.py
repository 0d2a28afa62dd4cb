"""`checkpoints_conversion.convert` and `jax-specens convert`: what is written, and bad input.

The Hugging Face directories come from the session zoo of `tests/fixtures_models.py` (tiny
random models saved with `save_pretrained`); every test that alters one works on a copy.
Bad input must fail with an error naming the problem and its fix, before anything is written,
and leave neither the output directory nor a temporary directory behind.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jax_specens
from checkpoints_conversion import convert, load_hf_model
from checkpoints_conversion import tensors as tensors_module
from jax_specens.cli.main import main
from jax_specens.models import SUPPORTED_FAMILIES
from tests.fixtures_models import one_torch_thread

SINGLE = "qwen2-gqa-tied"  # one model.safetensors
SHARDED = "llama-gqa-llama3-bias-untied"  # model.safetensors.index.json + shards


def params_of(model) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(model.params))
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def copy_hf(hf_zoo, name: str, tmp_path: Path) -> Path:
  dst = tmp_path / "hf"
  shutil.copytree(hf_zoo[name].hf_dir, dst)
  return dst


def edit_config(hf_dir: Path, **changes) -> None:
  path = hf_dir / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_nothing_written(out: Path) -> None:
  """Neither `out` nor a temporary sibling of it exists."""
  assert not out.exists()
  if out.parent.exists():
    assert [p.name for p in out.parent.iterdir() if out.name in p.name] == []


def stored_dtypes(out: Path) -> set:
  """The dtypes of the arrays in the orbax checkpoint of `out` (from its metadata)."""
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata((out / "params").absolute())
  meta = getattr(meta, "item_metadata", meta)  # StepMetadata or TreeMetadata, by orbax version
  meta = getattr(meta, "tree", meta)
  return {jnp.dtype(x.dtype)
          for x in jax.tree_util.tree_leaves(meta, is_leaf=lambda x: hasattr(x, "dtype"))}


def cli_error(capsys, *argv) -> str:
  assert main(["convert", *map(str, argv), "--quiet"]) == 2
  return capsys.readouterr().err


# ---- what a conversion writes ---------------------------------------------------------------


def test_saved_and_reloaded_params_equal_the_in_memory_conversion(hf_zoo):
  case = hf_zoo[SHARDED]
  in_memory = params_of(load_hf_model(case.hf_dir, dtype="float32"))
  reloaded = params_of(case.model)
  assert in_memory.keys() == reloaded.keys()
  for key, value in in_memory.items():
    np.testing.assert_array_equal(reloaded[key], value, err_msg=key)


def test_converted_params_are_the_torch_tensors(hf_zoo):
  """Spot checks of the layouts: nn.Linear transposed, GPT-2 Conv1D as is, fused qkv split."""
  llama = params_of(hf_zoo[SHARDED].model)
  torch_llama = {k: v.detach().numpy() for k, v in hf_zoo[SHARDED].torch_model.state_dict().items()}
  np.testing.assert_array_equal(llama["['layers'][1]['attn']['k']['kernel']"],
                                torch_llama["model.layers.1.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(llama["['lm_head']['kernel']"], torch_llama["lm_head.weight"].T)
  gpt2 = params_of(hf_zoo["gpt2-tied"].model)
  c_attn = hf_zoo["gpt2-tied"].torch_model.state_dict()["transformer.h.0.attn.c_attn.weight"]
  np.testing.assert_array_equal(gpt2["['layers'][0]['attn']['v']['kernel']"],
                                c_attn.numpy()[:, 64:])  # q, k, v side by side, 32 each
  phi3 = params_of(hf_zoo["phi3-gqa-partial-rotary-untied"].model)
  gate_up = hf_zoo["phi3-gqa-partial-rotary-untied"].torch_model.state_dict()[
      "model.layers.0.mlp.gate_up_proj.weight"].numpy()
  np.testing.assert_array_equal(phi3["['layers'][0]['mlp']['up']['kernel']"], gate_up[64:].T)


def test_tokenizer_and_eos_ids_travel_with_the_checkpoint(hf_zoo, tmp_path):
  from transformers import PreTrainedTokenizerFast
  hf = copy_hf(hf_zoo, SINGLE, tmp_path)
  (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  out = convert(hf, tmp_path / "out", progress=False)
  config = jax_specens.checkpoint.read_config(out)
  assert config.eos_token_ids == (2, 5) and config.bos_token_id == 1
  text = "the cat sat on the mat"
  assert (jax_specens.load_tokenizer(out).encode(text) ==
          PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json")).encode(text))


def test_base_model_checkpoint_without_prefix_converts(hf_zoo, tmp_path):
  """A bare `Qwen2Model` (tensor names without `model.`, tied head) converts like the full one."""
  case = hf_zoo[SINGLE]
  hf = tmp_path / "base"
  case.torch_model.model.save_pretrained(str(hf))
  assert not any(k.startswith("model.") for k in load_file(hf / "model.safetensors"))
  base = params_of(load_hf_model(hf, dtype="float32"))
  for key, value in params_of(case.model).items():
    np.testing.assert_array_equal(base[key], value, err_msg=key)


def test_bfloat16_conversion_loads_and_runs(hf_zoo, tmp_path):
  import torch
  case = hf_zoo[SINGLE]
  # A checkpoint stored in bfloat16 converts to bfloat16 by default ("auto"), bit for bit.
  hf = tmp_path / "hf_bf16"
  copy.deepcopy(case.torch_model).to(torch.bfloat16).save_pretrained(str(hf))
  out = convert(hf, tmp_path / "out", progress=False)
  assert stored_dtypes(out) == {jnp.dtype(jnp.bfloat16)}
  model = jax_specens.load_model(out, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(params_of(model)["['embed']['embedding']"], np.float32),
      case.torch_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy())
  assert model.config == case.config
  # It runs, and its logits are those of the float32 torch model up to bfloat16 rounding.
  tokens = np.arange(3, 3 + 2 * 8).reshape(2, 8)
  logits, _ = jax_specens.step(model, model.init_cache(2, 8), jnp.asarray(tokens, jnp.int32),
                               jnp.zeros(2, jnp.int32))
  with torch.no_grad(), one_torch_thread():
    ref = case.torch_model(torch.tensor(tokens)).logits.numpy()
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
  err, scale = float(np.abs(np.asarray(logits) - ref).max()), float(np.abs(ref).max())
  assert err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (logits up to {scale:.1f})"
  # A float32 checkpoint converts to bfloat16 when asked: the parameters are rounded casts.
  out32 = convert(case.hf_dir, tmp_path / "out32", dtype="bfloat16", progress=False)
  assert stored_dtypes(out32) == {jnp.dtype(jnp.bfloat16)}
  cast = params_of(jax_specens.load_model(out32, dtype=jnp.float32))
  for key, value in params_of(case.model).items():
    np.testing.assert_array_equal(
        cast[key], value.astype(jnp.bfloat16).astype(np.float32), err_msg=key)


# ---- the command line -----------------------------------------------------------------------


def test_cli_converts_and_refuses_to_overwrite_unless_asked(hf_zoo, tmp_path, capsys):
  hf, out = hf_zoo[SINGLE].hf_dir, tmp_path / "models" / "qwen2"
  assert main(["convert", str(hf), str(out), "--dtype", "float32", "--quiet"]) == 0
  assert f"-> {out}" in capsys.readouterr().out
  first = params_of(jax_specens.load_model(out))
  (out / "marker").write_text("the old directory")

  err = cli_error(capsys, hf, out, "--dtype", "float32")
  assert "already exists" in err and "--overwrite" in err
  assert (out / "marker").exists()  # untouched

  assert main(["convert", str(hf), str(out), "--overwrite", "--quiet"]) == 0
  assert not (out / "marker").exists()
  assert sorted(p.name for p in out.parent.iterdir()) == ["qwen2"]  # no temporary left
  for key, value in params_of(jax_specens.load_model(out)).items():
    np.testing.assert_array_equal(value, first[key], err_msg=key)


def test_cli_help_explains_the_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["convert", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for word in ("HF_DIR", "OUT_DIR", "--dtype", "--overwrite", "safetensors", *SUPPORTED_FAMILIES):
    assert word in text


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_model_type_lists_the_supported_ones(hf_zoo, tmp_path, capsys):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  edit_config(hf, model_type="bert")
  err = cli_error(capsys, hf, out)
  assert "unsupported model_type 'bert'" in err
  assert all(family in err for family in SUPPORTED_FAMILIES)
  assert_nothing_written(out)


def test_unsupported_rope_scaling_is_named(hf_zoo, tmp_path):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  edit_config(hf, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
  with pytest.raises(ValueError, match="rope_type='yarn'.*supported: default, linear, llama3"):
    convert(hf, out, progress=False)
  assert_nothing_written(out)


def test_missing_safetensors(hf_zoo, tmp_path, capsys):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  (hf / "model.safetensors").unlink()
  (hf / "pytorch_model.bin").write_bytes(b"never unpickled")
  err = cli_error(capsys, hf, out)
  assert "no model.safetensors" in err and "pytorch_model.bin" in err and "save_pretrained" in err
  assert_nothing_written(out)


def test_missing_shard_is_named(hf_zoo, tmp_path):
  hf, out = copy_hf(hf_zoo, SHARDED, tmp_path), tmp_path / "out" / "m"
  shard = sorted(hf.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f"shard.*{shard.name}.*missing"):
    convert(hf, out, progress=False)
  assert_nothing_written(out)


def test_truncated_safetensors_is_reported_corrupt(hf_zoo, tmp_path, capsys):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  path = hf / "model.safetensors"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  err = cli_error(capsys, hf, out)
  assert "model.safetensors is not a valid safetensors file" in err and "truncated" in err
  assert_nothing_written(out)


def test_renamed_tensor_is_named(hf_zoo, tmp_path):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  weights = load_file(hf / "model.safetensors")
  weights["model.layers.1.mlp.down.weight"] = weights.pop("model.layers.1.mlp.down_proj.weight")
  save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.* missing"):
    convert(hf, out, progress=False)
  assert_nothing_written(out)
  # With the expected name back, the unknown extra tensor is named instead.
  weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down.weight"]
  save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down\.weight'.* not part of"):
    convert(hf, out, progress=False)
  assert_nothing_written(out)


def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(hf_zoo, tmp_path, capsys):
  hf, out = copy_hf(hf_zoo, SINGLE, tmp_path), tmp_path / "out" / "m"
  edit_config(hf, intermediate_size=48)  # the weights were saved with 64
  err = cli_error(capsys, hf, out)
  assert "'model.layers.0.mlp.gate_proj.weight'" in err
  assert "shape (64, 32)" in err and "implies (48, 32)" in err
  assert_nothing_written(out)


def test_output_inside_input_is_refused(hf_zoo, tmp_path):
  hf = copy_hf(hf_zoo, SINGLE, tmp_path)
  with pytest.raises(ValueError, match="would replace the input"):
    convert(hf, hf, overwrite=True, progress=False)
  assert (hf / "model.safetensors").exists()


def test_interrupted_conversion_leaves_nothing_half_written(hf_zoo, tmp_path, monkeypatch):
  """Ctrl-C in the middle of reading tensors: no output, no temporary, an old output intact."""
  hf, out = hf_zoo[SINGLE].hf_dir, tmp_path / "out" / "m"
  read, calls = tensors_module.TensorFiles.read, []

  def interrupted_read(self, name):
    calls.append(name)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return read(self, name)

  monkeypatch.setattr(tensors_module.TensorFiles, "read", interrupted_read)
  with pytest.raises(KeyboardInterrupt):
    convert(hf, out, progress=False)
  assert_nothing_written(out)

  out.mkdir(parents=True)
  (out / "marker").write_text("the old directory")
  calls.clear()
  with pytest.raises(KeyboardInterrupt):
    convert(hf, out, overwrite=True, progress=False)
  assert sorted(p.name for p in out.iterdir()) == ["marker"]
  assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
