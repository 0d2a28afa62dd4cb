"""Cross-tokenizer CoSD (SPEC §4): draft and assistant with different tokenizers, joined by text.

One window, run from Python around two compiled programs per text-length bucket:
  1. the draft drafts K tokens from its own token ids (one jitted program: prefill + K passes);
  2. the window's text is re-tokenized with the assistant's tokenizer and scored in one pass;
  3. a draft token j is *verifiable* where the text boundary before it is also a boundary between
     assistant tokens i-1 and i: the assistant's distribution there is its logits at i-1, its
     candidate x^ is sampled (argmax when greedy), and x~ in its vocabulary is its own token i.
     The candidates are carried across by text: `p_d(x^)` reads the draft's first token of the
     text with x^ appended; `agree` means both candidates are the same assistant token;
  4. the verifier (rule / tree / learned, on `features.translated_features`) replaces at the first
     verifiable position it marks (where the candidates differ): the text becomes everything
     before that boundary plus x^'s text, and the draft re-tokenizes it. Without a replacement
     the draft keeps its own ids (no re-tokenization), so a verifier that never replaces gives
     exactly the draft's own output.
Text is always derived by decoding token prefixes (`decode(ids[:i])`), so boundaries compare the
same strings; special tokens are skipped when decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens.cache import init_cache
from jax_specens.fusion.features import translated_features
from jax_specens.fusion.verifier import as_verifier
from jax_specens.sampling import SamplingParams, check_params, log_probs, sample
from jax_specens.step import Model, forward, forward_prompt

MIN_BUCKET = 32


@dataclasses.dataclass
class CrossStats:
  """Per prompt: windows, replacements (windows whose draft tail was replaced), tokens emitted
  from each model (draft tokens, assistant tokens), model passes and wall time."""

  windows: int = 0
  replacements: int = 0
  draft_tokens: int = 0
  assistant_tokens: int = 0
  draft_calls: int = 0
  assistant_calls: int = 0
  wall_time: float = 0.0


@dataclasses.dataclass
class CrossOutput:
  """texts: generated text per prompt; finish: "stop" | "length"; stats: one CrossStats each."""

  texts: list[str]
  finish: list[str]
  stats: list[CrossStats]


def _bucket(n: int) -> int:
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames="k")
def _draft_window(model: Model, ids, length, key, params: SamplingParams, k: int):
  """K draft tokens after `ids[0, :length]` (ids `[1, L]` right-padded): tokens `[K]`, logits
  `[K, V]` (raw, each the distribution its token was drawn from)."""
  cache = init_cache(model.config, 1, ids.shape[1] + k, model.dtype)
  last, cache = forward_prompt(model, cache, ids, length)

  def body(j, carry):
    cache, last, key, toks, logits = carry
    key, sub = jax.random.split(key)
    tok = sample(sub, log_probs(last, params))  # [1]
    out, cache = forward(model, cache, tok[:, None], length + j)
    return cache, out[:, 0], key, toks.at[j].set(tok[0]), logits.at[j].set(last[0])

  v = last.shape[-1]
  init = (cache, last, key, jnp.zeros((k,), jnp.int32), jnp.zeros((k, v), jnp.float32))
  _, _, _, toks, logits = jax.lax.fori_loop(0, k, body, init)
  return toks, logits


@jax.jit
def _score(model: Model, ids):
  """Logits `[L, V]` of every position of `ids [1, L]` (one pass)."""
  cache = init_cache(model.config, 1, ids.shape[1], model.dtype)
  return forward(model, cache, ids, jnp.zeros((1,), jnp.int32))[0][0]


@jax.jit
def _sample_rows(logits, key, params: SamplingParams):
  """One token from each row of `logits [R, V]` (all rows use the one prompt's parameters)."""
  r = logits.shape[0]
  rows = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (r,)), params)
  return sample(key, log_probs(logits, rows))


@jax.jit
def _decide(verifier, d_logits, a_logits, xd_d, xa_d, xd_a, xa_a, agree):
  """The verifier's replace marks `[K]` from the window's features (candidates in both vocabs)."""
  feats = translated_features([d_logits, a_logits], [[xd_d, xa_d], [xd_a, xa_a]], agree)
  return verifier(feats)


def _first_new(ids: Sequence[int], before: Sequence[int]) -> int:
  """The first token of `ids` past its common prefix with `before` (its last when none)."""
  same = next((n for n, (x, y) in enumerate(zip(ids, before)) if x != y),
              min(len(ids), len(before)))
  return ids[min(same, len(ids) - 1)]


def _pad(ids: Sequence[int], width: int):
  return jnp.asarray(np.pad(np.asarray(ids, np.int32), (0, width - len(ids)))[None])


class _Side:
  """One model with its tokenizer: encode / decode with special tokens handled once."""

  def __init__(self, model: Model, tokenizer, name: str):
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
      raise ValueError(f"cross-tokenizer cosd needs the {name}'s Hugging Face tokenizer "
                       "(tokenizer.json beside its checkpoint; load_tokenizer(dir))")
    vocab = len(tokenizer)
    if vocab > model.config.vocab_size:
      raise ValueError(f"the {name}'s tokenizer has {vocab} tokens but its model only "
                       f"{model.config.vocab_size}; is it the model's own tokenizer?")
    self.model, self.tok, self.name = model, tokenizer, name
    eos = getattr(tokenizer, "eos_token_id", None)
    self.stop = set(model.config.eos_token_ids) | ({eos} if eos is not None else set())

  def padded(self, ids: Sequence[int], extra: int = 0):
    """`ids` right-padded to its length bucket `[1, L]`; ValueError when the model cannot
    address L + extra positions (learned position embeddings)."""
    width = _bucket(len(ids))
    cfg = self.model.config
    if cfg.positions == "learned" and width + extra > cfg.max_position_embeddings:
      raise ValueError(f"the {self.name} has learned positions for {cfg.max_position_embeddings}"
                       f" tokens but the text needs {width + extra}; shorten the prompt or "
                       "max_new_tokens")
    return _pad(ids, width)

  def encode(self, text: str) -> list[int]:
    return list(self.tok(text, add_special_tokens=True)["input_ids"])

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def boundaries(self, ids: Sequence[int], min_len: int) -> dict[int, int]:
    """Text length -> i (>= 1) for the token prefixes `ids[:i]` that decode to >= min_len chars
    (scanned from the end: only the window's tail is decoded)."""
    out = {}
    for i in range(len(ids) - 1, 0, -1):
      n = len(self.decode(ids[:i]))
      if n < min_len:
        break
      out[n] = i  # the smallest i wins (scanning downwards)
    return out


def cosd_text(draft: Model, assistant: Model, draft_tokenizer, assistant_tokenizer,
              prompts: Sequence[str] | str, *, max_new_tokens: int, window: int = 4,
              verifier="rule", verifier_path=None, alpha: float = 0.5, beta: float = 0.5,
              bonus: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0, key=None) -> CrossOutput:
  """CoSD for models with different tokenizers; returns the generated text of each prompt.

  max_new_tokens counts emitted tokens (the draft's plus the assistant's). Generation of a prompt
  stops at either model's end-of-sequence token. Sampling arguments apply to both models.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts or not all(isinstance(p, str) and p for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty strings")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be >= 1 draft tokens, got {window!r}")
  check_params(temperature, top_k, top_p, min_p)
  d = _Side(draft, draft_tokenizer, "draft")
  a = _Side(assistant, assistant_tokenizer, "assistant")
  verify = as_verifier(verifier, path=verifier_path, alpha=alpha, beta=beta)
  params = SamplingParams.make(1, temperature, top_k, top_p, min_p)
  key = jax.random.key(0) if key is None else key
  texts, finish, stats = [], [], []
  for prompt in prompts:
    key, sub = jax.random.split(key)
    t, f, s = _one_prompt(d, a, verify, prompt, sub, params, max_new_tokens, window, bonus)
    texts.append(t)
    finish.append(f)
    stats.append(s)
  return CrossOutput(texts, finish, stats)


def _one_prompt(d: _Side, a: _Side, verify, prompt: str, key, params, max_new: int, k: int,
                bonus: bool) -> tuple[str, str, CrossStats]:
  t0 = time.perf_counter()
  st = CrossStats()
  ids = d.encode(prompt)
  prompt_text = d.decode(ids)
  emitted, reason = 0, "length"
  while emitted < max_new:
    st.windows += 1
    key, k_draft, k_assist = jax.random.split(key, 3)
    toks, d_logits = _draft_window(d.model, d.padded(ids, k), jnp.asarray([len(ids)]),
                                   k_draft, params, k)
    st.draft_calls += k
    drafts = np.asarray(toks).tolist()
    d_logits = np.asarray(d_logits)
    # text before each draft token j (t[0] = the committed text) and after the window
    t = [d.decode(ids + drafts[:j]) for j in range(k + 1)]
    a_ids = a.encode(t[k])
    a_logits = np.asarray(_score(a.model, a.padded(a_ids)))[:len(a_ids)]
    st.assistant_calls += 1
    a_bound = a.boundaries(a_ids, min_len=len(t[0]))
    # verifiable positions j: the assistant token i starting at the boundary before draft token j
    at = [a_bound.get(len(t[j])) if t[k].startswith(t[j]) else None for j in range(k)]
    valid = np.asarray([i is not None for i in at])
    ia = np.asarray([i if i is not None else 1 for i in at] + [len(a_ids)])
    a_rows = a_logits[ia - 1]  # [K + 1, Va]: at each draft position, then after the window
    x_hat = np.asarray(_sample_rows(jnp.asarray(a_rows), k_assist, params)).tolist()
    pieces = [a.decode(a_ids[:i] + [x])[len(a.decode(a_ids[:i])):] for i, x in zip(ia, x_hat)]
    x_hat_d = [_first_new(d.encode(t[j] + pieces[j]), ids + drafts[:j]) if valid[j] else 0
               for j in range(k)]
    agree = np.asarray(a_ids + [-1])[ia[:k]] == np.asarray(x_hat[:k])
    marks = np.asarray(_decide(verify, jnp.asarray(d_logits), jnp.asarray(a_rows[:k]),
                               jnp.asarray(drafts), jnp.asarray(x_hat_d),
                               jnp.asarray(np.asarray(a_ids + [0])[ia[:k]]),
                               jnp.asarray(x_hat[:k]), jnp.asarray(agree))) & valid & ~agree
    replace_at = int(np.argmax(marks)) if marks.any() else None
    budget = max_new - emitted
    stop_at = next((j for j, x in enumerate(drafts) if x in d.stop), None)
    if replace_at is not None and (stop_at is None or replace_at <= stop_at):
      j, x_rep, piece = replace_at, x_hat[replace_at], pieces[replace_at]
      n_draft = min(j, budget)
      st.draft_tokens += n_draft
      if j < budget:  # the replacing token fits
        st.replacements += 1
        st.assistant_tokens += 1
        ids = d.encode(t[j] + piece)
        emitted += j + 1
        if x_rep in a.stop:
          reason = "stop"
          break
      else:
        ids = ids + drafts[:n_draft]
        emitted += n_draft
      continue
    n = min(k if stop_at is None else stop_at + 1, budget)
    ids = ids + drafts[:n]
    st.draft_tokens += n
    emitted += n
    if stop_at is not None and stop_at < n:
      reason = "stop"
      break
    if bonus and emitted < max_new:
      x_next = x_hat[k]
      ids = d.encode(d.decode(ids) + pieces[k])
      st.assistant_tokens += 1
      emitted += 1
      if x_next in a.stop:
        reason = "stop"
        break
  text = d.decode(ids)
  st.wall_time = time.perf_counter() - t0
  return (text[len(prompt_text):] if text.startswith(prompt_text) else text), reason, st
