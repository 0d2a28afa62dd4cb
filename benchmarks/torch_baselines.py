"""What a user writes today in PyTorch: baselines the peer benchmark times our decoders against.

- `hf_generate`: `model.generate()` (greedy), optionally with `assistant_model=` (HF assisted
  generation = speculative decoding, `gamma` draft tokens per round). Hugging Face supports assisted
  generation at batch size 1 only, so a batch is then generated row by row (what a user has to do).
- `torch_ensemble_generate`: a hand-written greedy weighted-probability ensemble loop over n Hugging
  Face models, each with its own KV cache (`past_key_values`), one call per model per token.

Prompts are left-padded (Hugging Face's convention for batched generation). Generation is fixed
length (no stop token), like `decode()` without `stop_ids`: set `generation_config.eos_token_id =
None` on the models (see `hf_models.py`).
"""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
  """`[B, T]` input ids and attention mask, left-padded."""
  t = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), t), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):] = torch.tensor(p)
    mask[i, t - len(p):] = 1
  return ids, mask


@torch.no_grad()
def hf_generate(model, ids, mask, max_new_tokens: int, assistant=None, gamma: int = 4
                ) -> torch.Tensor:
  """Greedy `generate()`; `[B, max_new_tokens]` new tokens."""
  kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
  if assistant is None:
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, ids.shape[1]:]
  assistant.generation_config.num_assistant_tokens = gamma
  assistant.generation_config.num_assistant_tokens_schedule = "constant"
  assistant.generation_config.assistant_confidence_threshold = 0.0  # always draft gamma tokens
  rows = []
  for b in range(ids.shape[0]):  # assisted generation: batch size 1 only
    n = int(mask[b].sum())
    row = ids[b:b + 1, ids.shape[1] - n:]
    out = model.generate(input_ids=row, attention_mask=torch.ones_like(row),
                         assistant_model=assistant, **kwargs)
    rows.append(out[:, n:])
  return torch.cat(rows, 0)


@torch.no_grad()
def torch_ensemble_generate(models, weights, ids, mask, max_new_tokens: int) -> torch.Tensor:
  """Greedy argmax of `sum_k w_k softmax(l_k)`, every model called once per token with a cache."""
  b = ids.shape[0]
  pos = (mask.cumsum(-1) - 1).clamp(min=0)
  pasts = [None] * len(models)
  cur_ids, cur_pos, cur_mask = ids, pos, mask
  out = torch.empty((b, max_new_tokens), dtype=torch.long)
  for t in range(max_new_tokens):
    probs = 0
    for k, m in enumerate(models):
      o = m(input_ids=cur_ids, attention_mask=cur_mask, position_ids=cur_pos,
            past_key_values=pasts[k], use_cache=True)
      pasts[k] = o.past_key_values
      probs = probs + weights[k] * torch.softmax(o.logits[:, -1].float(), -1)
    nxt = probs.argmax(-1)
    out[:, t] = nxt
    cur_ids = nxt[:, None]
    cur_pos = cur_pos[:, -1:] + 1
    cur_mask = torch.cat([cur_mask, torch.ones((b, 1), dtype=cur_mask.dtype)], -1)
  return out
