"""Hugging Face `config.json` -> `ModelConfig`.

The JSON is first parsed by `transformers.AutoConfig` (no remote code), which standardises old
layouts: `rope_scaling`/`rope_theta` become `rope_parameters`, `layer_types` are derived from
`sliding_window_pattern` / `use_sliding_window` + `max_window_layers`, and so on. This module then
reads the standardised attributes family by family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jax_specens.models.config import (SUPPORTED_FAMILIES, SUPPORTED_ROPE_KINDS, ModelConfig,
                                       RopeConfig)

# HF activation name -> ours. gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh form.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu",
}
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Families whose `sliding_window` (when set) applies to every layer.
ALL_LAYERS_SLIDE = ("mistral", "phi3")


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  """The raw `config.json` of a Hugging Face model directory, as a dict."""
  path = Path(hf_dir) / "config.json"
  if not Path(hf_dir).is_dir():
    raise FileNotFoundError(f"{hf_dir} is not a directory; pass a Hugging Face model directory "
                            "(the one holding config.json and *.safetensors)")
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {hf_dir} is not a Hugging Face model directory "
                            "(save one with model.save_pretrained(dir))")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def check_model_type(raw: dict) -> str:
  """The `model_type` of a raw config dict, or a ValueError listing the supported ones."""
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_FAMILIES:
    hint = (" (for Gemma 3 convert the text model, Gemma3ForCausalLM, model_type 'gemma3_text')"
            if model_type == "gemma3" else "")
    raise ValueError(f"unsupported model_type {model_type!r} in config.json{hint}; supported: "
                     f"{', '.join(SUPPORTED_FAMILIES)}")
  return model_type


def standardised(raw: dict):
  """A `transformers.PretrainedConfig` built from `raw` (its own defaults and legacy handling)."""
  from transformers import AutoConfig
  model_type = check_model_type(raw)
  d = {k: v for k, v in raw.items() if k != "model_type"}
  try:
    return AutoConfig.for_model(model_type, **d)
  except (TypeError, ValueError, KeyError) as e:  # transformers' own validation of the fields
    raise ValueError(f"config.json of model_type {model_type!r} is invalid: {e}") from e


def _token_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _rope(params: dict | None, family: str, what: str = "rope_parameters") -> RopeConfig:
  params = dict(params or {})
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in SUPPORTED_ROPE_KINDS:
    raise ValueError(f"{family}: unsupported RoPE scaling rope_type={kind!r} in config.json "
                     f"{what}; supported: {', '.join(SUPPORTED_ROPE_KINDS)}")
  kw: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "kind": kind}
  if kind in ("linear", "llama3"):
    kw["factor"] = float(params["factor"])
  if kind == "llama3":
    kw.update(low_freq_factor=float(params["low_freq_factor"]),
              high_freq_factor=float(params["high_freq_factor"]),
              original_max_position=int(params["original_max_position_embeddings"]))
  return RopeConfig(**kw)


def _activation(name: str, family: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"{family}: unsupported activation {name!r}; supported: "
                     f"{', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _layer_types(hf, family: str, num_layers: int) -> tuple[str, ...]:
  window = getattr(hf, "sliding_window", None)
  if not window:  # e.g. Qwen2 with use_sliding_window=False: every layer attends fully
    return ()
  if family in ALL_LAYERS_SLIDE:
    return ("sliding",) * num_layers
  names = getattr(hf, "layer_types", None) or ()
  unknown = sorted(set(names) - set(LAYER_TYPES))
  if unknown:
    raise ValueError(f"{family}: unsupported layer_types {unknown}; supported: "
                     f"{', '.join(LAYER_TYPES)}")
  types = tuple(LAYER_TYPES[n] for n in names)
  return types if "sliding" in types else ()


def _gpt2_fields(hf) -> dict:
  if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
    raise ValueError("gpt2: scale_attn_by_inverse_layer_idx=True is not supported")
  if getattr(hf, "add_cross_attention", False):
    raise ValueError("gpt2: add_cross_attention=True (an encoder-decoder model) is not supported")
  d = hf.n_embd
  return dict(
      intermediate_size=hf.n_inner or 4 * d,
      head_dim=d // hf.n_head,
      num_kv_heads=hf.n_head,
      norm="layer",
      norm_eps=hf.layer_norm_epsilon,
      activation=_activation(hf.activation_function, "gpt2"),
      gated_mlp=False,
      qkv_bias=True, o_bias=True, mlp_bias=True,
      positions="learned",
      query_scale=None if hf.scale_attn_weights else 1.0,
  )


def _rope_family_fields(hf, family: str) -> dict:
  heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
  rope_params = hf.rope_parameters or {}
  fields: dict[str, Any] = dict(
      intermediate_size=hf.intermediate_size,
      head_dim=head_dim,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
      norm_eps=hf.rms_norm_eps,
      activation=_activation(
          getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu"), family),
  )
  if family == "gemma3_text":
    fields["rope"] = _rope(rope_params.get("full_attention"), family,
                           "rope_parameters['full_attention']")
    fields["rope_local"] = _rope(rope_params.get("sliding_attention"), family,
                                 "rope_parameters['sliding_attention']")
  else:
    fields["rope"] = _rope(rope_params, family)
  if family == "phi3":
    fields["partial_rotary_factor"] = float(
        rope_params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)))
  bias = bool(getattr(hf, "attention_bias", False))
  fields.update(qkv_bias=bias or family == "qwen2", o_bias=bias,
                mlp_bias=bool(getattr(hf, "mlp_bias", False)))
  fields["qk_norm"] = family in ("qwen3", "gemma3_text")
  if family.startswith("gemma"):
    fields.update(norm_plus_one=True, embed_scale=True)
  if family in ("gemma2", "gemma3_text"):
    if getattr(hf, "use_bidirectional_attention", False):
      raise ValueError(f"{family}: use_bidirectional_attention=True is not supported (decoding "
                       "needs causal attention)")
    # Gemma3's attention never applies attn_logit_softcapping (transformers keeps the field only).
    fields.update(post_norms=True, query_scale=float(hf.query_pre_attn_scalar) ** -0.5,
                  attn_softcap=(getattr(hf, "attn_logit_softcapping", None)
                                if family == "gemma2" else None),
                  final_softcap=getattr(hf, "final_logit_softcapping", None))
  return fields


def config_from_hf(hf, generation_eos=None) -> ModelConfig:
  """`ModelConfig` of a Hugging Face config (a `PretrainedConfig`, or a raw `config.json` dict).

  generation_eos: the `eos_token_id` of `generation_config.json` (int or list), merged with the
  config's own. Raises ValueError naming the field for anything the model core cannot run.
  """
  if isinstance(hf, dict):
    hf = standardised(hf)
  family = check_model_type({"model_type": hf.model_type})
  num_layers = hf.num_hidden_layers
  fields = _gpt2_fields(hf) if family == "gpt2" else _rope_family_fields(hf, family)
  layer_types = _layer_types(hf, family, num_layers)
  eos = tuple(dict.fromkeys(_token_ids(hf.eos_token_id) + _token_ids(generation_eos)))
  return ModelConfig(
      family=family,
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      num_layers=num_layers,
      num_heads=hf.num_attention_heads,
      max_position_embeddings=hf.max_position_embeddings,
      layer_types=layer_types,
      sliding_window=hf.sliding_window if layer_types else None,
      tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
      bos_token_id=hf.bos_token_id,
      eos_token_ids=eos,
      pad_token_id=hf.pad_token_id,
      **fields,
  )


def generation_eos(hf_dir: str | os.PathLike):
  """`eos_token_id` of `generation_config.json` in `hf_dir`, or None."""
  path = Path(hf_dir) / "generation_config.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def load_hf_config(hf_dir: str | os.PathLike) -> ModelConfig:
  """`ModelConfig` of the Hugging Face model saved in `hf_dir` (config + generation config)."""
  raw = read_hf_config(hf_dir)
  check_model_type(raw)
  return config_from_hf(raw, generation_eos(hf_dir))
