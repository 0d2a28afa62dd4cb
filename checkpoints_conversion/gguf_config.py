"""GGUF metadata -> the `config.json` dict a Hugging Face checkpoint of the model would have.

The dict then goes through the same `hf_config.config_from_hf` as a safetensors checkpoint.
Keys are llama.cpp's (`{arch}.block_count`, `{arch}.attention.head_count`, ...); what the file does
not state is what llama.cpp itself assumes for the architecture (for Gemma 3: sliding window on 5
of every 6 layers, local RoPE base 10000, query scale 1/sqrt(head_dim) except for the 27B model),
which are also the defaults transformers' GGUF loader ends up with.

End of generation: llama.cpp stops at `eos`, `eot` and `eom` ids and at every token whose text is
one of `EOG_TEXTS` (`llama-vocab.cpp`); `eos_ids` returns that set, so an instruct model stops at
its end-of-turn token (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...).
"""

from __future__ import annotations

from typing import Any

from checkpoints_conversion.gguf_file import ARCHITECTURES, field
from checkpoints_conversion.hf_config import config_from_hf
from jax_specens.models.config import ModelConfig

# llama.cpp's end-of-generation token texts (llama-vocab.cpp, `special_eog_ids`).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
             "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
             "<end_of_utterance>")
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _rope_scaling(reader, arch: str) -> dict | None:
  kind = field(reader, f"{arch}.rope.scaling.type")
  if kind in (None, "none"):
    return None
  if kind != "linear":
    raise ValueError(f"unsupported RoPE scaling {kind!r} in the GGUF metadata "
                     f"({arch}.rope.scaling.type); supported: none, linear")
  return {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor"))}


def hf_config(reader, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """The Hugging Face config dict of the model in `reader`.

  tensor_shapes: Hugging Face tensor name -> shape (`GGUFTensors`), for what only the tensors say
  (vocabulary size, tied embeddings, biases).
  """
  arch = field(reader, "general.architecture")
  if "rope_freqs.weight" in tensor_shapes:
    raise ValueError("this GGUF stores per-dimension RoPE frequency factors (rope_freqs.weight, "
                     "Llama 3.1 style scaling), which are not supported from GGUF; convert the "
                     "model's Hugging Face safetensors directory instead")

  def key(name, default=None):
    return field(reader, f"{arch}.{name}", default)

  heads = int(key("attention.head_count"))
  hidden = int(key("embedding_length"))
  head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
  cfg: dict[str, Any] = {
      "model_type": ARCHITECTURES[arch],
      "vocab_size": tensor_shapes["model.embed_tokens.weight"][0],
      "hidden_size": hidden,
      "intermediate_size": int(key("feed_forward_length")),
      "num_hidden_layers": int(key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(key("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
      "max_position_embeddings": int(key("context_length")),
      "rope_theta": float(key("rope.freq_base", 10000.0)),
      "tie_word_embeddings": "lm_head.weight" not in tensor_shapes,
      "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
  }
  scaling = _rope_scaling(reader, arch)
  if arch in ("llama", "qwen2", "qwen3"):
    if arch != "qwen2":  # config_from_hf gives Qwen2 its q/k/v biases; attention_bias would add o's
      cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensor_shapes
    if scaling:
      cfg["rope_scaling"] = scaling
  elif arch == "gemma3":
    layers = cfg["num_hidden_layers"]
    pattern = key("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, list):  # one flag per layer (newer llama.cpp files)
      cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
      cfg["layer_types"] = ["full_attention" if (i + 1) % int(pattern) == 0
                            else "sliding_attention" for i in range(layers)]
    cfg["sliding_window"] = int(key("attention.sliding_window"))
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): 1/sqrt(hidden/heads) for the 27B (62 layers)
    cfg["query_pre_attn_scalar"] = hidden // heads if layers == 62 else head_dim
    cfg["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"),
                           **(scaling or {})},
        "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE},
    }
  return {k: v for k, v in cfg.items() if v is not None}


def eos_ids(reader) -> list[int]:
  """Every id that ends generation, as llama.cpp decides it (see the module docstring)."""
  ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
  tokens = field(reader, "tokenizer.ggml.tokens", [])
  ids += [i for i, text in enumerate(tokens) if text in EOG_TEXTS]
  return sorted({int(i) for i in ids if i is not None})


def load_gguf_config(files) -> ModelConfig:
  """`ModelConfig` of an open `GGUFTensors`; also tells it the head counts (q/k un-permutation)."""
  raw = hf_config(files.reader, {name: files.shape(name) for name in files.names})
  config = config_from_hf(raw, eos_ids(files.reader))
  files.set_heads(config.num_heads, config.num_kv_heads)
  return config
