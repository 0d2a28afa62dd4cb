"""Cross-tokenizer CoSD (docs/algorithms.md §4): draft and assistant with different tokenizers, joined by text.

All rows advance together, one window per loop turn. Each row has one shared text (UTF-8
bytes); each model keeps its own token sequence over it (`TokenText`) and its own KV cache over
that sequence. A window:

  1. the draft feeds the tokens its cache lacks and drafts K tokens x~_1..x~_K (one compiled
     program, `cross_steps.draft_window`); they are the draft's own ids and are never re-tokenized;
  2. the assistant re-tokenizes only the new text, from its last stable boundary (a changed
     earlier token rolls its cache back to there), and scores the new tokens in one pass;
  3. draft position j is *verifiable* where the byte offset before x~_j is a character boundary
     and the start of an assistant token i. There the assistant's distribution is its logits
     after token i - 1 and its candidate x^_j is its top token (argmax, at any temperature, as in
     docs/algorithms.md §4); x~_j in the assistant's vocabulary is its token i; x^_j in the draft's vocabulary
     is the first draft token of x^_j's text; they *agree* when x^_j is token i;
  4. the verifier (rule / tree / learned, on `features.translated_features`) replaces at the
     first verifiable position it marks where the candidates differ and x^'s text is whole
     characters: the text becomes everything before that boundary plus x^_j's text, the draft
     keeps its accepted ids and tokenizes x^_j's text after them, and drops its rejected tail by
     moving its cache position back.
A verifier that never replaces gives exactly the draft's own greedy/sampled output. With `bonus`
and no replacement the assistant's next token after the window is appended as well. Text is
handed to a tokenizer only up to its last whole character; the rest waits for the next window.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jax_specens.fusion.cross_rows import CrossStats, Row, Side, SidePrompts
from jax_specens.fusion.cross_steps import (ASSISTANT_MIN_WIDTH, DRAFT_MIN_WIDTH,
                                            assistant_score, bucket, decide, draft_window)
from jax_specens.fusion.verifier import as_verifier
from jax_specens.sampling import SamplingParams, check_params
from jax_specens.models.model import Model


@dataclasses.dataclass
class CrossOutput:
  """texts: generated text per prompt; finish: "stop" | "length"; stats: one CrossStats each."""

  texts: list[str]
  finish: list[str]
  stats: list[CrossStats]


def _check(prompts, max_new_tokens, window, temperature, top_k, top_p, min_p
           ) -> list[str | SidePrompts]:
  if isinstance(prompts, (str, SidePrompts)):
    prompts = [prompts]
  if not prompts or not all((isinstance(p, str) and p) or isinstance(p, SidePrompts)
                            for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty strings (shared text) or "
                     "SidePrompts (each model's own prompt: plain text or a conversation)")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be >= 1 draft tokens, got {window!r}")
  check_params(temperature, top_k, top_p, min_p)
  return list(prompts)


def cosd_text(draft: Model, assistant: Model, draft_tokenizer, assistant_tokenizer,
              prompts: Sequence[str | SidePrompts] | str | SidePrompts, *,
              max_new_tokens: int, window: int = 4, verifier="rule", verifier_path=None,
              alpha: float = 0.5, beta: float = 0.5,
              bonus: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0, key=None, progress: bool = False) -> CrossOutput:
  """CoSD for models with different tokenizers; returns the generated text of each prompt.

  A string prompt is text both models continue. `SidePrompts(draft=..., assistant=...)` gives each
  model its own prompt (each through its own chat template, or one chat model and one base model
  reading plain text); the generated text, shared, is the answer.

  max_new_tokens counts emitted tokens (the draft's plus the assistant's). A row stops at either
  model's end-of-sequence token. Sampling arguments apply to the draft's drafts; the assistant's
  candidate is always its top token (docs/algorithms.md §4).
  """
  prompts = _check(prompts, max_new_tokens, window, temperature, top_k, top_p, min_p)
  d = Side(draft, draft_tokenizer, "draft")
  a = Side(assistant, assistant_tokenizer, "assistant")
  verify = as_verifier(verifier, path=verifier_path, alpha=alpha, beta=beta)
  k = window
  rows = [Row(d, a, p) for p in prompts]
  b = len(rows)
  params = SamplingParams.make(b, temperature, top_k, top_p, min_p)
  key = jax.random.key(0) if key is None else key
  # caches: prompt + generated tokens (an emitted token is at most `d.growth` tokens of either
  # model) + the window's lookahead and feed padding
  d_cache = draft.init_cache(b, d.cache_len(max(len(r.d.ids) for r in rows), max_new_tokens, k))
  a_cache = assistant.init_cache(b, a.cache_len(max(len(r.a.ids) for r in rows),
                                                max_new_tokens, k))
  t0 = time.perf_counter()
  bar = tqdm.tqdm(total=max_new_tokens * b, disable=not progress, desc="cosd (cross)")
  while any(not r.done for r in rows):
    key, sub = jax.random.split(key)
    # 1. draft: feed what each cache lacks, draft K
    feeds = [r.draft_feed() for r in rows]
    width = bucket(max(len(f) for f, _ in feeds), DRAFT_MIN_WIDTH)
    tokens, start, n_feed = _pack(feeds, width, d_cache.max_len, "draft")
    drafts, d_logits, d_cache = draft_window(draft, d_cache, tokens, start,
                                             n_feed, sub, params, k)
    drafts = np.asarray(drafts)
    # 2. assistant: re-tokenize the new text, score it
    plans = [r.assistant_plan(drafts[i]) for i, r in enumerate(rows)]
    width = bucket(max(len(p.feed) for p in plans), ASSISTANT_MIN_WIDTH)
    tokens, start, _ = _pack([(p.feed, p.start) for p in plans], width, a_cache.max_len,
                             "assistant")
    where = jnp.asarray(np.stack([p.rows for p in plans]))
    own = jnp.asarray(np.stack([p.own for p in plans]))
    x_hat, a_part, a_cache = assistant_score(assistant, a_cache, tokens, start, where, own)
    x_hat = np.asarray(x_hat)
    # 3. x^ in the draft's vocabulary, the verifier's marks
    cands = [r.candidates(p, x_hat[i]) for i, (r, p) in enumerate(zip(rows, plans))]
    c = {f: jnp.asarray(np.stack([getattr(x, f) for x in cands])) for f in ("xa_d", "agree")}
    a_part = jax.tree_util.tree_map(lambda x: x[:, :k], a_part)
    marks = np.asarray(decide(verify, d_logits, jnp.asarray(drafts), c["xa_d"], a_part,
                              c["agree"]))
    # 4. commit each row
    for i, r in enumerate(rows):
      if not r.done:
        bar.update(r.commit(plans[i], cands[i], marks[i] & cands[i].replaceable, x_hat[i],
                            max_new_tokens, bonus))
  bar.close()
  wall = time.perf_counter() - t0
  for r in rows:
    r.stats.wall_time = wall
  return CrossOutput([r.generated() for r in rows], [r.reason for r in rows],
                     [CrossStats(**r.stats.__dict__) for r in rows])


def _pack(feeds, width: int, cache_len: int, name: str):
  """`[(ids, start)]` per row -> right-padded tokens `[B, width]`, starts, counts."""
  tokens = np.zeros((len(feeds), width), np.int32)
  for i, (ids, s) in enumerate(feeds):
    tokens[i, :len(ids)] = ids
    if s + width > cache_len:
      raise RuntimeError(f"row {i}'s text needs more {name} tokens ({s + width} slots) than "
                         f"its cache holds ({cache_len}); pass a smaller max_new_tokens")
  start = np.asarray([s for _, s in feeds], np.int32)
  n = np.asarray([max(len(ids), 1) for ids, _ in feeds], np.int32)
  return jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(n)


__all__ = ["CrossOutput", "CrossStats", "cosd_text"]
