"""How repetitive greedy text is: the share of distinct 3-grams in each continuation.

1.0 means no 3-gram of tokens repeats; text that collapses into a loop ("the the the ...") tends
to 0 (32 copies of one token: 1 distinct 3-gram of 30). `jax-specens eval-fusion` reports it for
each built-in model and their ensemble on the demo's prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def distinct_ngram_share(tokens: Sequence[int], n: int = 3) -> float:
  """Distinct n-grams / n-grams of `tokens` (1.0 when there are fewer than n tokens)."""
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  return 1.0 if not grams else len(set(grams)) / len(grams)


def greedy_repetition(groups: dict, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                      n: int = 3) -> dict[str, dict]:
  """Greedy continuations of `prompts` by each entry of `groups` (name -> Model, or a list of
  Models decoded as a uniform `wprob` ensemble), ignoring EOS, and their distinct n-gram shares.

  Returns name -> {"mean": mean share over prompts, "min": the lowest, "per_prompt": [...],
  "tokens": [...], "texts": [...]}.
  """
  from jax_specens.decoding.api import decode
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  lengths = np.asarray([len(x) for x in ids], np.int32)
  batch = np.zeros((len(ids), int(lengths.max())), np.int32)
  for i, x in enumerate(ids):
    batch[i, :len(x)] = x
  result = {}
  for name, group in groups.items():
    method = "ensemble" if isinstance(group, (list, tuple)) else "ar"
    out = decode(group, batch, lengths, method=method, max_new_tokens=max_new_tokens,
                 temperature=0.0)
    rows = out.to_lists()
    shares = [distinct_ngram_share(r, n) for r in rows]
    result[name] = {"mean": float(np.mean(shares)), "min": float(np.min(shares)),
                    "per_prompt": shares, "tokens": rows,
                    "texts": [tokenizer.decode(r) for r in rows]}
  return result
