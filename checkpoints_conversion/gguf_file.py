"""A GGUF file read as if it were a Hugging Face safetensors directory.

`GGUFTensors` has the interface of `tensors.TensorFiles` (names, shape, dtype, read, file_of) under
the tensor names `save_pretrained` would write, so `converter.plan` / `read_params` check and
convert a GGUF exactly as they do a safetensors checkpoint. Reading a tensor dequantizes it with the
`gguf` package (float32) and undoes what llama.cpp's converter did to it:

- llama: the rows of `attn_q` / `attn_k` are permuted per head (interleaved RoPE pairs);
- gemma3: RMSNorm weights are stored as `1 + w` (ours and transformers' are `w`);
- qwen2, qwen3: stored as they are (llama.cpp's converter permutes q/k only for `llama`).

These are the same inversions transformers' GGUF loader applies (`modeling_gguf_pytorch_utils`:
`LlamaTensorProcessor`, `Gemma2TensorProcessor`), so the values equal its float32 load bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
# GGUF `general.architecture` -> Hugging Face model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# llama.cpp's tensor names (gguf.constants.TENSOR_NAMES) -> Hugging Face names, per layer.
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_NORMS = {"ffn_norm": "post_attention_layernorm"}
_LAYER_BY_ARCH = {
    "llama": _LLAMA_NORMS, "qwen2": _LLAMA_NORMS, "qwen3": _LLAMA_NORMS,
    "gemma3": {"post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def _require_gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf "
                      "(or pip install 'jax_specens[gguf]')") from e
  return gguf


def is_gguf(path: str | os.PathLike) -> bool:
  """True when `path` is a file starting with the GGUF magic bytes."""
  path = Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


def open_reader(path: str | os.PathLike):
  """`gguf_reader.Reader` of `path`, or a ValueError saying what is wrong with the file."""
  from gguf.quants import _type_traits

  from checkpoints_conversion.gguf_reader import Reader
  _require_gguf()
  path = Path(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if head != MAGIC:
    raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); pass a "
                     ".gguf file or a Hugging Face model directory")
  try:
    reader = Reader(path)
  except ValueError as e:
    hint = ("upgrade gguf (pip install -U gguf) or re-quantize the model; " + _supported_types()
            if "unknown to the installed gguf" in str(e) else "it is truncated or corrupt: "
            "download it again")
    raise ValueError(f"{path} is not a valid GGUF file: {e}; {hint}") from e
  for t in reader.tensors:
    if t.tensor_type.name not in ("F32", "F16") and t.tensor_type not in _type_traits:
      raise ValueError(f"tensor {t.name!r} of {path} is stored as {t.tensor_type.name}, which "
                       f"the gguf package cannot dequantize; {_supported_types()}: "
                       "re-quantize the model with a supported type")
  return reader


def _supported_types() -> str:
  from gguf.quants import _type_traits
  names = ["F32", "F16"] + sorted(t.name for t in _type_traits)
  return "supported types: " + ", ".join(names)


def field(reader, key: str, default=None):
  """The value of metadata `key` (str, number, bool or list), or `default` when absent."""
  return reader.fields.get(key, default)


def architecture(reader, path) -> str:
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                     f"{', '.join(ARCHITECTURES)}. Convert the model's Hugging Face safetensors "
                     "directory instead (jax-specens convert HF_DIR OUT_DIR)")
  return arch


def hf_name(gguf_name: str, arch: str) -> str:
  """The Hugging Face name of a GGUF tensor; unknown names are kept (the plan then rejects them)."""
  m = _NAME.match(gguf_name)
  if not m:
    return gguf_name
  layer, base, kind = m.groups()
  if layer is None:
    return f"{_GLOBAL[base]}.{kind}" if base in _GLOBAL else gguf_name
  table = {**_LAYER, **_LAYER_BY_ARCH[arch]}
  return f"model.layers.{layer}.{table[base]}.{kind}" if base in table else gguf_name


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `LlamaModel.permute` of q/k rows `[n_head * head_dim, in]`."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors(contextlib.AbstractContextManager):
  """Name -> tensor view of a GGUF file under Hugging Face names (see the module docstring).

  Call `set_heads` before reading a llama model (the q/k un-permutation needs the head counts).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = self.hf_dir = Path(path)
    self.reader = open_reader(path)
    self.arch = architecture(self.reader, path)
    self.heads: dict[str, int] = {}
    self._tensor = {}
    for t in self.reader.tensors:
      self._tensor[hf_name(t.name, self.arch)] = t
    self.file_of = {n: f"{self.path.name}:{t.name}" for n, t in self._tensor.items()}
    self.where = f"the GGUF file {self.path}"
    self.config_source = "the GGUF metadata"

  def set_heads(self, num_heads: int, num_kv_heads: int) -> None:
    self.heads = {"q_proj": num_heads, "k_proj": num_kv_heads}

  def __exit__(self, *exc):
    self.reader = self._tensor = None  # drops the memory map
    return None

  @property
  def names(self) -> list[str]:
    return list(self._tensor)

  def __contains__(self, name: str) -> bool:
    return name in self._tensor

  def shape(self, name: str) -> tuple[int, ...]:
    """Hugging Face layout: GGUF lists dimensions innermost first, so reversed."""
    return tuple(int(d) for d in reversed(self._tensor[name].shape))

  def dtype(self, name: str) -> str:
    """ggml type name: "F32", "F16", "BF16", "Q4_K", ..."""
    return self._tensor[name].tensor_type.name

  def read(self, name: str) -> np.ndarray:
    """The tensor dequantized to float32, in Hugging Face layout and convention."""
    from gguf.quants import dequantize
    t = self._tensor[name]
    x = dequantize(t.data, t.tensor_type)  # every type was checked on opening
    x = np.asarray(x, np.float32).reshape(self.shape(name))
    module = name.rsplit(".", 1)[0]
    if self.arch == "llama" and module.endswith(("q_proj", "k_proj")):  # bias rows too
      if not self.heads:
        raise RuntimeError("GGUFTensors.set_heads was not called before reading q/k of llama")
      x = unpermute_rope_rows(x, self.heads[module.rsplit(".", 1)[-1]])
    if self.arch == "gemma3" and name.endswith("norm.weight"):
      x = x - np.float32(1.0)
    return x
