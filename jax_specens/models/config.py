"""One frozen configuration for every supported decoder-only family.

A family is a set of switches on one transformer (see `transformer.py`): which norm, which
activation, where biases are, rotary or learned positions, sliding windows, soft-capping.
`checkpoints_conversion.hf_config` fills this dataclass from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

SUPPORTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
)

LayerType = Literal["full", "sliding"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one layer type.

  kind: "default" | "linear" (positions divided by `factor`) | "llama3" (frequency-dependent
  scaling with `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position`).
  """

  theta: float = 10000.0
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


SUPPORTED_ROPE_KINDS = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a forward pass needs to know, hashable so it can be a static jit argument."""

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  # norms
  norm: Literal["rms", "layer"] = "rms"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False  # Gemma: y = x_hat * (1 + w)
  post_norms: bool = False  # Gemma2/3: extra norms after attention and after the MLP
  qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over head_dim on q and k before RoPE
  # MLP
  activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
  gated_mlp: bool = True  # act(x W_gate) * (x W_up) W_down, else act(x W_up) W_down
  # biases
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  # positions
  positions: Literal["rope", "learned"] = "rope"
  rope: RopeConfig = RopeConfig()
  rope_local: RopeConfig | None = None  # Gemma3: RoPE of the sliding-window layers
  partial_rotary_factor: float = 1.0
  # attention
  layer_types: tuple[LayerType, ...] = ()  # empty: every layer is "full"
  sliding_window: int | None = None
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  # KV slots per block of the blocked attention (`models/attend.py`): a pass at most this wide over
  # a longer cache reads only the blocks in use. None: always one dense pass over the whole cache.
  attention_block: int | None = 512
  # embeddings
  embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
  tie_embeddings: bool = True
  # reduced output vocabulary (a distilled draft, EAGLE-3 style): the head scores only these K
  # target ids (head row i <-> token id vocab_subset[i]); every other id gets logit -inf, so the
  # logits stay `[..., vocab_size]` over the target's ids. Empty: the full vocabulary.
  vocab_subset: tuple[int, ...] = ()
  # a draft that reads its target's hidden states (EAGLE style, `decoding/sd_features.py`):
  # the input at position i is `fuse([embed(token_i); feature_{i-1}])`, where a feature is the
  # final-normed hidden state the head scores (the target's for committed tokens, the draft's
  # own along its chain of proposals). Only `sd` can feed it (docs/algorithms.md §2).
  feature_input: bool = False
  # a feature-input draft that also reads the target's residual stream after these target layers
  # (EAGLE-3's low / middle / high features): the target's feature is then
  # `[final-normed; rms(h_l) for l in feature_taps]` and `feature_fc` maps it to D; along its
  # chain the draft reads its own D-wide output directly
  feature_taps: tuple[int, ...] = ()
  # tokens
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.family not in SUPPORTED_FAMILIES:
      raise ValueError(
          f"unknown model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    for r in (self.rope, self.rope_local):
      if r is not None and r.kind not in SUPPORTED_ROPE_KINDS:
        raise ValueError(
            f"unsupported RoPE scaling {r.kind!r}; supported: {', '.join(SUPPORTED_ROPE_KINDS)}"
        )
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
      )
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ValueError("sliding-window layers need sliding_window > 0")
    if self.attention_block is not None and self.attention_block < 1:
      raise ValueError(f"attention_block must be a positive number of slots or None; got "
                       f"{self.attention_block}")
    if self.vocab_subset:
      ids = self.vocab_subset
      if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.vocab_size:
        raise ValueError(
            f"vocab_subset must hold distinct token ids in [0, {self.vocab_size}); got "
            f"{len(ids)} ids in [{min(ids)}, {max(ids)}] with {len(ids) - len(set(ids))} repeats")
    if self.feature_taps and (not self.feature_input or min(self.feature_taps) < 0
                              or len(set(self.feature_taps)) != len(self.feature_taps)):
      raise ValueError(f"feature_taps {self.feature_taps}: distinct target layer indices >= 0, "
                       "for a feature_input draft only (train-draft --features --feature-taps)")

  # ---- derived -------------------------------------------------------------------------------
  def layer_type(self, i: int) -> LayerType:
    return self.layer_types[i] if self.layer_types else "full"

  def layer_stack(self) -> tuple[int, int]:
    """(period P, repeats n) for scanning the layers (`models/layout.py`): the shortest P with
    every layer of the same type as layer `i mod P` (window and RoPE follow the type), and
    n = num_layers // P. Llama-style models: (1, L); Gemma 3 (five sliding, one global): (6, L // 6).
    """
    kinds = [self.layer_type(i) for i in range(self.num_layers)]
    period = next(p for p in range(1, self.num_layers + 1)
                  if all(kinds[i] == kinds[i % p] for i in range(self.num_layers)))
    return period, self.num_layers // period

  def window(self, i: int) -> int | None:
    """Sliding window of layer i (keys j visible from query p iff p - window < j <= p)."""
    return self.sliding_window if self.layer_type(i) == "sliding" else None

  def rope_for(self, i: int) -> RopeConfig:
    if self.layer_type(i) == "sliding" and self.rope_local is not None:
      return self.rope_local
    return self.rope

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

  @property
  def feature_width(self) -> int:
    """F, the width of the target features a feature-input draft reads: D, or (1 + taps) D with
    `feature_taps` (its `feature_fc` maps them to D)."""
    return self.hidden_size * (1 + len(self.feature_taps))

  @property
  def head_size(self) -> int:
    """Rows of the LM head: K for a reduced vocabulary, else vocab_size."""
    return len(self.vocab_subset) or self.vocab_size

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

  # ---- (de)serialisation ----------------------------------------------------------------------
  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    d["rope"] = RopeConfig(**d["rope"]) if d.get("rope") is not None else RopeConfig()
    if d.get("rope_local") is not None:
      d["rope_local"] = RopeConfig(**d["rope_local"])
    for k in ("layer_types", "eos_token_ids", "vocab_subset", "feature_taps"):
      if k in d:
        d[k] = tuple(d[k])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, s: str) -> "ModelConfig":
    return cls.from_dict(json.loads(s))
