"""Distillation data: token sequences and the target's teacher-forced top-T distribution.

Sources, all offline:
- the target's own answers (greedy and sampled) to the shipped chat prompts (`prompts.py`),
  prompt included, in the target's chat template;
- the Python standard library's prose and code (`jax_specens.builtin.data`), tokenized with the
  target's tokenizer.
Both are split by document (a prompt, a stdlib file): `train` for training, `test` held out.
The teacher labels of a sequence are the target's top-T token ids and log-probabilities at every
position (`Harvest`); the draft is trained on those (T = 32 keeps the file small and covers
almost all of the target's probability mass).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jax_specens.builtin import data as stdlib_data
from jax_specens.decoding.api import decode
from jax_specens.draft import prompts as chat_prompts
from jax_specens.models.model import Model
from jax_specens.step import forward_hidden


@dataclasses.dataclass(frozen=True)
class Harvest:
  """tokens `[N, L]` (right-padded), mask `[N, L]` (1 where position t predicts token t + 1 and
  both are real), top_ids / top_logp `[N, L, T]`: the target's T most likely next tokens;
  features `[N, L, D]` (float16, optional): the target's final-normed hidden states, what a
  feature-input draft reads (`target_features`)."""

  tokens: np.ndarray
  mask: np.ndarray
  top_ids: np.ndarray
  top_logp: np.ndarray
  features: np.ndarray | None = None

  def save(self, path) -> None:
    np.savez(path, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})

  @classmethod
  def load(cls, path) -> "Harvest":
    with np.load(path, allow_pickle=False) as f:
      return cls(**{k: f[k] for k in ("tokens", "mask", "top_ids", "top_logp", "features")
                    if k in f})

  @property
  def num_tokens(self) -> int:
    return int(self.mask.sum())


def chat_ids(tok, prompt: str) -> list[int]:
  """The prompt in the target's chat template, ready for the assistant's answer."""
  messages = [{"role": "user", "content": prompt}]
  if getattr(tok, "chat_template", None):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  return tok.encode(prompt)


def pad(rows: list[list[int]], length: int | None = None, value: int = 0
        ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads to `[B, length]`; returns (tokens, lengths)."""
  length = length or max(map(len, rows))
  out = np.full((len(rows), length), value, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r[:length]
  return out, np.array([min(len(r), length) for r in rows], np.int32)


def target_answers(target: Model, prompt_rows: list[list[int]], *, max_new_tokens: int,
                   temperature: float, batch_size: int = 16, seed: int = 0,
                   progress: bool = True) -> list[list[int]]:
  """prompt + the target's answer (stopping at its EOS ids) for every prompt."""
  out = []
  stop = list(target.config.eos_token_ids) or None
  rows = sorted(range(len(prompt_rows)), key=lambda i: len(prompt_rows[i]))
  answers = {}
  for s in tqdm(range(0, len(rows), batch_size), desc=f"target answers T={temperature}",
                disable=not progress):
    idx = rows[s:s + batch_size]
    chunk = [prompt_rows[i] for i in idx]
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
    toks, lens = pad(chunk)
    res = decode(target, toks, lens, method="ar", max_new_tokens=max_new_tokens,
                 temperature=temperature, stop_ids=stop, key=jax.random.key(seed + s))
    for i, gen in zip(idx, res.to_lists()):
      answers[i] = gen
  for i, p in enumerate(prompt_rows):
    out.append(list(p) + answers[i])
  return out


def text_rows(tok, split: str, seq_len: int, max_tokens: int) -> list[list[int]]:
  """Windows of `seq_len + 1` tokens of stdlib prose and code (alternating documents)."""
  docs = []
  for a, b in zip(stdlib_data.documents("prose", split), stdlib_data.documents("code", split)):
    docs += [a, b]
  rows, total = [], 0
  for doc in docs:
    ids = tok.encode(doc.text)
    for s in range(0, max(1, len(ids) - 8), seq_len + 1):
      piece = ids[s:s + seq_len + 1]
      if len(piece) < 16:
        continue
      rows.append(piece)
      total += len(piece)
      if total >= max_tokens:
        return rows
  return rows


def _teacher_forward(target: Model, tokens: Int[Array, "B L"], taps: tuple[int, ...] = ()
                     ) -> tuple[Float[Array, "B L V"], Float[Array, "B L F"]]:
  """One teacher-forced pass over whole rows from an empty cache: logits and the final-normed
  hidden states (followed by the layers `taps`' normed outputs: `step.forward_hidden`)."""
  cache = target.init_cache(tokens.shape[0], tokens.shape[1])
  logits, x, _ = forward_hidden(target, cache, tokens, jnp.zeros((tokens.shape[0],), jnp.int32),
                                taps=taps)
  return logits, x


def _batches(fn, tokens: np.ndarray, batch_size: int, *, progress: bool, desc: str):
  """Yields (rows, fn's outputs for those rows) over `tokens` `[N, L]` in fixed-shape batches
  (the last padded with zero rows, cut off again), so `fn` compiles once."""
  n = tokens.shape[0]
  for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
    chunk = tokens[s:s + batch_size]
    m = chunk.shape[0]
    if m < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
    yield slice(s, s + m), [np.asarray(o)[:m] for o in fn(jnp.asarray(chunk))]


@functools.partial(jax.jit, static_argnames="top")
def teacher_topk(target: Model, tokens: Int[Array, "B L"], top: int
                 ) -> tuple[Int[Array, "B L T"], Float[Array, "B L T"]]:
  """The target's `top` most likely next tokens (ids, log-probs) at every position."""
  logits, _ = _teacher_forward(target, tokens)
  logp = jax.nn.log_softmax(logits, -1)
  vals, ids = jax.lax.top_k(logp, top)
  return ids.astype(jnp.int32), vals


def harvest(target: Model, rows: list[list[int]], seq_len: int, *, top: int = 32,
            batch_size: int = 8, progress: bool = True, desc: str = "teacher") -> Harvest:
  """Teacher-forces the target over `rows` (cut to `seq_len + 1` tokens) in fixed-shape batches."""
  rows = [r[:seq_len + 1] for r in rows if len(r) >= 2]
  n = len(rows)
  toks, lens = pad(rows, seq_len + 1)
  ids = np.zeros((n, seq_len, top), np.int32)
  logp = np.zeros((n, seq_len, top), np.float32)
  for rows_, (i, v) in _batches(lambda c: teacher_topk(target, c, top), toks[:, :seq_len],
                                batch_size, progress=progress, desc=desc):
    ids[rows_], logp[rows_] = i, v
  mask = (np.arange(seq_len)[None, :] < (lens[:, None] - 1)).astype(np.float32)
  return Harvest(tokens=toks[:, :seq_len], mask=mask, top_ids=ids, top_logp=logp)


@functools.partial(jax.jit, static_argnames="taps")
def _hidden(target: Model, tokens: Int[Array, "B L"], taps: tuple[int, ...] = ()
            ) -> Float[Array, "B L F"]:
  return _teacher_forward(target, tokens, taps)[1].astype(jnp.float16)


def target_features(target: Model, h: Harvest, *, taps: tuple[int, ...] = (),
                    batch_size: int = 16, progress: bool = True,
                    desc: str = "target features") -> Harvest:
  """`h` with `features`: the target's hidden states over its tokens, in fixed-shape batches
  (float16: 0.18 MB per 160-token row of a 576-wide model), followed by the normed outputs of
  its layers `taps` (a draft with `ModelConfig.feature_taps`; F = (1 + taps) D)."""
  width = target.config.hidden_size * (1 + len(taps))
  out = np.zeros(h.tokens.shape + (width,), np.float16)
  for rows, (x,) in _batches(lambda c: (_hidden(target, c, tuple(taps)),), h.tokens, batch_size,
                             progress=progress, desc=desc):
    out[rows] = x
  return dataclasses.replace(h, features=out)


def hard_labels(rows: list[list[int]], starts: list[int], seq_len: int, top: int) -> Harvest:
  """Labels of greedy target text without a forward pass: the target's top-1 at position t of
  its own greedy answer is token t + 1 (probability 1). Positions before `starts[i]` (the
  prompt, not written by the target) are masked out."""
  rows = [r[:seq_len + 1] for r in rows]
  toks, lens = pad(rows, seq_len + 1)
  n = len(rows)
  ids = np.zeros((n, seq_len, top), np.int32)
  ids[..., 0] = toks[:, 1:]
  logp = np.full((n, seq_len, top), -np.inf, np.float32)
  logp[..., 0] = 0.0
  t = np.arange(seq_len)[None, :]
  mask = ((t < lens[:, None] - 1) & (t >= np.asarray(starts)[:, None] - 1)).astype(np.float32)
  return Harvest(tokens=toks[:, :seq_len], mask=mask, top_ids=ids, top_logp=logp)


def concat(parts: list[Harvest]) -> Harvest:
  return Harvest(**{f.name: None if getattr(parts[0], f.name) is None else
                    np.concatenate([getattr(h, f.name) for h in parts])
                    for f in dataclasses.fields(Harvest)})


def frequent_ids(h: Harvest, k: int, vocab_size: int, always: tuple[int, ...] = ()
                 ) -> np.ndarray:
  """The K target ids most often the target's top-1 (ties and the rest: most frequent inputs).

  `always` (e.g. the EOS ids) are included whatever their count. Returned sorted.
  """
  v = vocab_size
  top1 = np.bincount(h.top_ids[..., 0][h.mask > 0], minlength=v).astype(np.float64)
  inputs = np.bincount(h.tokens[h.mask > 0], minlength=v).astype(np.float64)
  score = top1 + 1e-3 * inputs
  score[list(always)] = np.inf
  k = min(k, v)
  return np.sort(np.argsort(-score, kind="stable")[:k]).astype(np.int32)


def chat_rows(tok, split: str, family: str = "all") -> list[list[int]]:
  return [chat_ids(tok, p) for p in chat_prompts.prompts(split, family)]


def build_harvest(target: Model, tok, split: str, *, chat_prompts_n: int, family: str = "all",
                  answer_tokens: int, text_tokens: int, seq_len: int, top: int = 32,
                  temperatures=(0.0,),
                  batch_size: int = 16, gen_batch_size: int = 32, seed: int = 0,
                  soft_answers: bool = True, progress: bool = True) -> Harvest:
  """Teacher labels for `split`: the target's answers to up to `chat_prompts_n` chat prompts of
  `family` (`prompts.FAMILIES`; one answer per temperature) and `text_tokens` tokens of stdlib
  prose and code.

  soft_answers=False: the greedy answers are labelled by `hard_labels` (no teacher pass; on
  SmolLM2-135M with 2 CPU cores the pass over 820 answers took 3.5 minutes, generating them 9.5),
  sampled answers and text by the teacher's top-T.
  """
  rows, hard, starts = [], [], []
  prompt_rows = chat_rows(tok, split, family)[:chat_prompts_n]
  for i, temp in enumerate(temperatures):
    if prompt_rows and answer_tokens > 0:
      answers = target_answers(target, prompt_rows, max_new_tokens=answer_tokens,
                               temperature=temp, batch_size=gen_batch_size,
                               seed=seed + 1000 * i, progress=progress)
      if temp == 0 and not soft_answers:
        hard += answers
        starts += [len(p) for p in prompt_rows]
      else:
        rows += answers
  if text_tokens > 0:
    rows += text_rows(tok, split, seq_len, text_tokens)
  if not rows and not hard:
    raise ValueError(f"no distillation text for split {split!r}: raise --chat-prompts or "
                     "--text-tokens")
  parts = [hard_labels(hard, starts, seq_len, top)] if hard else []
  if rows:
    parts.append(harvest(target, rows, seq_len, top=top, batch_size=batch_size,
                         progress=progress, desc=f"teacher {split}"))
  return concat(parts)
