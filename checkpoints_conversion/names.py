"""Per-family maps from Hugging Face tensor names to our parameter paths.

Every family is written as one table of `(hf name, our module paths, kind, bias)` rows per layer;
`rules_for(config)` expands it into `Rule`s. Two layouts differ from ours:

- `nn.Linear` weights are `[out, in]`, our kernels `[in, out]` (transpose); GPT-2's `Conv1D` is
  already `[in, out]`.
- fused tensors (Phi-3 `qkv_proj` and `gate_up_proj`, GPT-2 `c_attn`) hold several of our
  parameters side by side along the output features; they are split in the order listed.
"""

from __future__ import annotations

import dataclasses
import re

from jax_specens.models.config import ModelConfig

ParamPath = tuple  # e.g. ("layers", 0, "attn", "q", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Hugging Face tensor and the parameter(s) it becomes.

  hf: full tensor name as `save_pretrained` writes it (e.g. "model.layers.0.self_attn.q_proj.weight").
  targets: our parameter paths; several when the tensor is fused (split along output features).
  transpose: the tensor is an `nn.Linear` weight `[out, in]`.
  """

  hf: str
  targets: tuple[ParamPath, ...]
  transpose: bool = False


# Tensors some checkpoints carry that are not parameters (causal-mask buffers, RoPE tables).
IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")

# Rows: (HF module under the layer prefix, our modules under ("layers", i), kind, bias switch).
# kind: "linear" (nn.Linear, transposed), "conv1d" (GPT-2, not transposed), "norm".
_ATTN = (("q", "k", "v"), "o")


def _llama_like(config: ModelConfig) -> list[tuple]:
  phi3 = config.family == "phi3"
  gemma_post = config.post_norms  # Gemma2/3: post_attention_layernorm is *after* attention
  rows = [("input_layernorm", ("attn_norm",), "norm", None)]
  if phi3:
    rows.append(("self_attn.qkv_proj", (("attn", "q"), ("attn", "k"), ("attn", "v")), "linear",
                 "qkv_bias"))
  else:
    rows += [(f"self_attn.{n}_proj", (("attn", n),), "linear", "qkv_bias") for n in "qkv"]
  rows.append(("self_attn.o_proj", (("attn", "o"),), "linear", "o_bias"))
  if config.qk_norm:
    rows += [("self_attn.q_norm", (("attn", "q_norm"),), "norm", None),
             ("self_attn.k_norm", (("attn", "k_norm"),), "norm", None)]
  if gemma_post:
    rows += [("post_attention_layernorm", ("post_attn_norm",), "norm", None),
             ("pre_feedforward_layernorm", ("mlp_norm",), "norm", None),
             ("post_feedforward_layernorm", ("post_mlp_norm",), "norm", None)]
  else:
    rows.append(("post_attention_layernorm", ("mlp_norm",), "norm", None))
  if phi3:
    rows.append(("mlp.gate_up_proj", (("mlp", "gate"), ("mlp", "up")), "linear", "mlp_bias"))
  else:
    rows += [(f"mlp.{n}_proj", (("mlp", n),), "linear", "mlp_bias") for n in ("gate", "up")]
  rows.append(("mlp.down_proj", (("mlp", "down"),), "linear", "mlp_bias"))
  return rows


def _gpt2(config: ModelConfig) -> list[tuple]:
  del config
  return [
      ("ln_1", ("attn_norm",), "norm", None),
      ("attn.c_attn", (("attn", "q"), ("attn", "k"), ("attn", "v")), "conv1d", "qkv_bias"),
      ("attn.c_proj", (("attn", "o"),), "conv1d", "o_bias"),
      ("ln_2", ("mlp_norm",), "norm", None),
      ("mlp.c_fc", (("mlp", "up"),), "conv1d", "mlp_bias"),
      ("mlp.c_proj", (("mlp", "down"),), "conv1d", "mlp_bias"),
  ]


def _path(module) -> tuple:
  return module if isinstance(module, tuple) else (module,)


def _expand(hf: str, ours: list[tuple], kind: str, bias: bool, config: ModelConfig) -> list[Rule]:
  if kind == "norm":
    rules = [Rule(f"{hf}.weight", tuple(o + ("scale",) for o in ours))]
    bias = config.norm == "layer"
  else:
    rules = [Rule(f"{hf}.weight", tuple(o + ("kernel",) for o in ours), kind == "linear")]
  if bias:
    rules.append(Rule(f"{hf}.bias", tuple(o + ("bias",) for o in ours)))
  return rules


def model_prefix(config: ModelConfig) -> str:
  """Prefix of the base-model tensors in a `*ForCausalLM` checkpoint."""
  return "transformer." if config.family == "gpt2" else "model."


def rules_for(config: ModelConfig) -> list[Rule]:
  """Every tensor a checkpoint of `config` must contain, in file order of a typical checkpoint."""
  gpt2 = config.family == "gpt2"
  pre = model_prefix(config)
  rules = [Rule(f"{pre}{'wte' if gpt2 else 'embed_tokens'}.weight", (("embed", "embedding"),))]
  if gpt2:
    rules.append(Rule(f"{pre}wpe.weight", (("pos_embed", "embedding"),)))
  rows = _gpt2(config) if gpt2 else _llama_like(config)
  for i in range(config.num_layers):
    layer = f"{pre}{'h' if gpt2 else 'layers'}.{i}."
    for hf, modules, kind, bias in rows:
      ours = [("layers", i) + _path(m) for m in modules]
      rules += _expand(layer + hf, ours, kind, bool(bias and getattr(config, bias)), config)
  rules += _expand(f"{pre}{'ln_f' if gpt2 else 'norm'}", [("final_norm",)], "norm", False, config)
  if not config.tie_embeddings:
    rules.append(Rule("lm_head.weight", (("lm_head", "kernel"),), transpose=True))
  return rules
