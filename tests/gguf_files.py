"""Tiny GGUF files written offline with `gguf.GGUFWriter`, the way llama.cpp's converter does.

`write_gguf(path, hf_model, arch, types)` writes a random `transformers` model (llama, qwen2,
qwen3 or gemma3_text) as llama.cpp would: GGUF tensor names, q/k rows of llama permuted per head
(of no other architecture), Gemma RMSNorm weights stored as `1 + w`, config and a small
byte-level tokenizer (with a chat template and `<|im_end|>` as a control token) as metadata.
`types` maps a GGUF tensor name to the ggml type to store it in (default F32); quantizable types
are quantized with `gguf.quants.quantize`, the K-quants (no quantizer in gguf-py) get random
blocks with finite scales (`random_blocks`).
"""

from __future__ import annotations

import numpy as np

HIDDEN = 256  # K-quant blocks are 256 values: the rows of ffn_up / ffn_gate are one block
VOCAB = 64
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
# ggml type -> byte offsets of its fp16 scales in a block (the rest of a block may be any bytes)
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
LLAMA_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GEMMA_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
COMMON = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def tokens() -> list[str]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  alphabet = [c for c in bytes_to_unicode().values()][:VOCAB - len(SPECIAL)]
  return SPECIAL + alphabet


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
  """`[rows, bytes per row]` uint8 of random K-quant blocks with small, finite fp16 scales."""
  import gguf
  qtype = gguf.GGMLQuantizationType[type_name]
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  for off in K_SCALES[type_name]:
    scale = rng.uniform(0.001, 0.02, (rows, cols // block)).astype(np.float16)
    data[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
  return data.reshape(rows, -1)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_tensors(hf_model, arch: str) -> dict[str, np.ndarray]:
  """GGUF name -> float32 array in llama.cpp's layout and conventions."""
  cfg = hf_model.config
  out = {}
  for name, t in hf_model.state_dict().items():
    w = t.detach().float().numpy().copy()
    if name == "lm_head.weight":
      if cfg.tie_word_embeddings:
        continue
      out["output.weight"] = w
      continue
    if name == "model.embed_tokens.weight":
      out["token_embd.weight"] = w
      continue
    if name == "model.norm.weight":
      out["output_norm.weight"] = w + 1 if arch == "gemma3" else w
      continue
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = {**COMMON, **(GEMMA_NAMES if arch == "gemma3" else LLAMA_NAMES)}
    gname = f"blk.{layer}.{table[module]}.{kind}"
    if arch == "llama" and module == "self_attn.q_proj":
      w = llama_permute(w, cfg.num_attention_heads)
    if arch == "llama" and module == "self_attn.k_proj":
      w = llama_permute(w, cfg.num_key_value_heads)
    if arch == "gemma3" and module.endswith("norm"):
      w = w + 1
    out[gname] = w
  return out


def write_gguf(path, hf_model, arch: str, types: dict[str, str] | None = None,
               metadata: dict | None = None):
  """Writes `hf_model` as a GGUF file at `path` (see the module docstring); returns `path`."""
  import gguf
  cfg = hf_model.config
  w = gguf.GGUFWriter(str(path), (metadata or {}).get("general.architecture", arch))
  w.add_name("tiny")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if arch in ("gemma3", "qwen3"):  # llama.cpp writes these where the config has a head_dim
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  if arch == "gemma3":
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
  else:
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens())
  w.add_token_types([3] * len(SPECIAL) + [1] * (VOCAB - len(SPECIAL)))
  w.add_token_scores([0.0] * VOCAB)  # no merges: derived from the vocabulary
  w.add_bos_token_id(1)
  w.add_eos_token_id(0)
  w.add_chat_template(CHAT_TEMPLATE)
  for key, value in (metadata or {}).items():
    if key != "general.architecture":
      w.add_uint32(key, value) if isinstance(value, int) else w.add_string(key, value)
  for i, (name, x) in enumerate(gguf_tensors(hf_model, arch).items()):
    kind = (types or {}).get(name, "F32")
    if kind in K_SCALES:
      w.add_tensor(name, random_blocks(kind, *x.shape, seed=i),
                   raw_dtype=gguf.GGMLQuantizationType[kind])
    elif kind in ("F32", "F16"):
      w.add_tensor(name, x.astype(np.float16 if kind == "F16" else np.float32))
    else:
      qtype = gguf.GGMLQuantizationType[kind]
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
