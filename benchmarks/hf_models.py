"""Random Hugging Face Llama models built offline, saved with `save_pretrained`, converted.

Random models agree on almost no token, so speculation would measure nothing but rejections.
`build_pair` therefore makes a draft that *is* part of the target: the target has `layers` layers,
the draft its first `draft_layers` (same embeddings, final norm and LM head), and the target's deeper
layers only add small residual updates (their output projections scaled by `depth_scale`). The draft
is cheaper (about draft_layers / layers of the cost) and agrees with the target on most tokens, like a
real small model of the same family. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads, draft_layers)
    "small": (128, 64, 128, 2, 4, 2, 1),
    "base": (2048, 256, 768, 8, 8, 4, 2),
}


@dataclasses.dataclass
class Pair:
  """A target and its draft: PyTorch models (eval, float32), their HF and converted directories."""

  target_torch: object
  draft_torch: object
  target_hf: Path
  draft_hf: Path
  target_dir: Path
  draft_dir: Path


def llama_config(vocab, hidden, intermediate, layers, heads, kv_heads, max_positions=1024):
  from transformers import LlamaConfig
  return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def randomise_(model, seed: int, depth_from: int, depth_scale: float) -> None:
  """Matrices ~ N(0, 1/sqrt(fan_in)) (logits spread out: no greedy near-ties); the output
  projections of layers >= depth_from scaled by depth_scale."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if p.ndim < 2:
        continue
      std = 1.0 / math.sqrt(p.shape[-1])
      if "embed_tokens" in name:
        std = 1.0
      p.copy_(torch.randn(p.shape, generator=gen) * std)
      parts = name.split(".")
      if "layers" in parts and parts[-2] in ("o_proj", "down_proj"):
        if int(parts[parts.index("layers") + 1]) >= depth_from:
          p.mul_(depth_scale)


def _eager(model):
  model.generation_config.eos_token_id = None  # fixed-length generation, like decode() w/o stop
  model.generation_config.pad_token_id = 0
  return model.eval()


def build_pair(root: str | Path, size: str = "base", depth_scale: float = 0.1, seed: int = 0,
               dtype: str = "float32") -> Pair:
  """Builds, saves and converts a (target, draft) pair of `SIZES[size]` under `root`."""
  import torch
  from transformers import LlamaForCausalLM

  from checkpoints_conversion import convert

  vocab, hidden, inter, layers, heads, kv, draft_layers = SIZES[size]
  root = Path(root)
  torch.manual_seed(seed)
  target = LlamaForCausalLM(llama_config(vocab, hidden, inter, layers, heads, kv))
  randomise_(target, seed, draft_layers, depth_scale)
  draft = LlamaForCausalLM(llama_config(vocab, hidden, inter, draft_layers, heads, kv))
  missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
  assert not missing, missing
  pair = Pair(_eager(target), _eager(draft), root / "hf" / "target", root / "hf" / "draft",
              root / "converted" / "target", root / "converted" / "draft")
  for model, hf_dir, out_dir in ((target, pair.target_hf, pair.target_dir),
                                 (draft, pair.draft_hf, pair.draft_dir)):
    if not (out_dir / "jax_specens.json").exists():
      model.save_pretrained(str(hf_dir))
      convert(hf_dir, out_dir, dtype=dtype, overwrite=True, progress=False)
  return pair
