"""One row of cross-tokenizer CoSD on the host: its shared text, both token sequences, where each
model's cache is valid, and the per-window alignment of draft positions to assistant tokens (by
byte offsets; see `cross.py` for the algorithm and `token_text.py` for the offsets)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_specens.fusion.token_text import TokenText, complete, is_char_boundary, token_bytes
from jax_specens.models.model import Model
from jax_specens.text import encode


@dataclasses.dataclass
class CrossStats:
  """Per prompt: windows, replacements (windows whose draft tail was replaced), tokens emitted
  from each model (draft tokens, assistant tokens), model passes and wall time (of the batch)."""

  windows: int = 0
  replacements: int = 0
  draft_tokens: int = 0
  assistant_tokens: int = 0
  draft_calls: int = 0
  assistant_calls: int = 0
  wall_time: float = 0.0


class Side:
  """One model with its tokenizer: token bytes, stop tokens, cached tokenizations of pieces."""

  def __init__(self, model: Model, tokenizer, name: str):
    if tokenizer is None or not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
      raise ValueError(f"cross-tokenizer cosd needs the {name}'s Hugging Face tokenizer "
                       "(tokenizer.json beside its checkpoint; load_tokenizer(dir))")
    vocab = len(tokenizer)
    if vocab > model.config.vocab_size:
      raise ValueError(f"the {name}'s tokenizer has {vocab} tokens but its model only "
                       f"{model.config.vocab_size}; is it the model's own tokenizer?")
    self.model, self.tok, self.name = model, tokenizer, name
    self.table = token_bytes(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    self.eos = eos if eos is not None else next(iter(model.config.eos_token_ids), None)
    self.stop = set(model.config.eos_token_ids) | ({eos} if eos is not None else set())
    self._pieces: dict[bytes, list[int]] = {}

  def piece(self, data: bytes) -> list[int]:
    """This tokenizer's ids for `data` (whole characters) on its own."""
    if data not in self._pieces:
      self._pieces[data] = list(self.tok(data.decode(), add_special_tokens=False)["input_ids"])
    return self._pieces[data]

  def cache_len(self, prompt_len: int, max_new: int, k: int) -> int:
    """Cache slots for a prompt of `prompt_len` tokens: the prompt, up to 4 tokens of this model
    per emitted token, the window's lookahead and the feed padding; a multiple of 64."""
    n = -(-(prompt_len + 4 * max_new + 2 * k + 64) // 64) * 64
    cfg = self.model.config
    if cfg.positions == "learned" and n > cfg.max_position_embeddings:
      raise ValueError(f"the {self.name} has learned positions for {cfg.max_position_embeddings}"
                       f" tokens but the text may need {n}; shorten the prompt or max_new_tokens")
    return n


def carry(src: Side, dst: Side, x: int) -> int | None:
  """Token `x` of `src` in `dst`'s vocabulary: `dst`'s first token of its text, `dst`'s
  end-of-sequence for a stop; None when it cannot be carried (partial UTF-8, special)."""
  if x in src.stop:
    return dst.eos
  data = src.table[x]
  if not data or complete(data) != len(data) or not is_char_boundary(data, 0):
    return None
  ids = dst.piece(data)
  return ids[0] if ids else None


@dataclasses.dataclass
class Plan:
  """A window's alignment: the assistant's feed, and per draft position j the assistant token
  index starting at the byte offset before x~_j (None: not verifiable)."""

  drafts: np.ndarray  # [K] the draft's ids
  offsets: list[int]  # [K + 1] byte offset before each draft token, then after the window
  stop_at: int | None  # the first draft stop token, if any
  feed: list[int]  # assistant tokens to feed
  start: int  # their first position
  rows: np.ndarray  # [K + 1] index into the feed of the logits for each position, then the end
  index: list  # [K] assistant token index i per position, or None
  own: np.ndarray  # [K + 1] the assistant's token i there (x~ in its vocabulary), else 0
  whole: bool  # whether the assistant's text reaches the end of the window


@dataclasses.dataclass
class Candidates:
  """Per draft position (`[K]` arrays): x^ in the draft's vocabulary, whether the candidates
  agree (x^ is the assistant's own token there)."""

  xa_d: np.ndarray
  agree: np.ndarray
  replaceable: np.ndarray  # verifiable, candidates differ, x^'s text carried across whole


@dataclasses.dataclass(frozen=True)
class SidePrompts:
  """One prompt that each model reads in its own form, for models whose prompts differ (a chat
  template on one side, plain text on the other). Each side is a string (plain text, with the
  tokenizer's special tokens, as `text.encode` makes it) or a conversation (a list of
  {"role", "content"} messages, formatted by that model's chat template). Both models then
  continue one shared text that starts empty: the answer."""

  draft: str | list[dict]
  assistant: str | list[dict]


class Row:
  """One prompt's state between windows. A string prompt is the start of the shared text; with
  `SidePrompts` each model's cache starts with its own prompt and the shared text is empty."""

  def __init__(self, d: Side, a: Side, prompt: str | SidePrompts):
    self.ds, self.as_ = d, a
    if isinstance(prompt, SidePrompts):
      self.d = TokenText.after_prompt(d.tok, encode(d.tok, [prompt.draft])[0])
      self.a = TokenText.after_prompt(a.tok, encode(a.tok, [prompt.assistant])[0])
      self.text = b""
    else:
      self.d = TokenText.encode(d.tok, prompt)
      self.a = TokenText.encode(a.tok, prompt)
      self.text = prompt.encode()
    self.prompt_len = len(self.text)
    self.d_fed = self.a_fed = 0  # cache slots holding valid tokens of each sequence
    self.emitted, self.done, self.reason = 0, False, "length"
    self.stats = CrossStats()

  def generated(self) -> str:
    return self.text[self.prompt_len:].decode(errors="replace")

  def draft_feed(self) -> tuple[list[int], int]:
    if self.done:
      return [0], 0
    return self.d.ids[self.d_fed:], self.d_fed

  def assistant_plan(self, drafts: np.ndarray) -> Plan:
    """Re-tokenizes the window's text for the assistant (from its stable boundary; its cache is
    rolled back to the first changed token) and aligns the draft positions to its tokens."""
    k = len(drafts)
    if self.done:
      zeros = np.zeros(k + 1, np.int32)
      return Plan(drafts, [0] * (k + 1), None, [0], 0, zeros, [None] * k, zeros, False)
    d, a = self.ds, self.as_
    offsets, stop_at = [len(self.text)], None
    for j, x in enumerate(drafts):
      if stop_at is None and int(x) in d.stop:
        stop_at = j
      offsets.append(offsets[-1] + (len(d.table[x]) if stop_at is None else 0))
    end = k if stop_at is None else stop_at + 1
    window = self.text + b"".join(d.table[x] for x in drafts[:end])
    whole = complete(window)
    if whole > len(self.a.text):
      self.a_fed = min(self.a_fed, self.a.extend(window[len(self.a.text):whole],
                                                 floor=self.a.floor))
    n = len(self.a.ids)
    need = int(np.searchsorted(self.a.ends, offsets[0], side="left"))
    start = max(0, min(self.a_fed, need, n - 1))
    index = []
    for j in range(k):
      o = offsets[j]
      i = None
      if j < end and is_char_boundary(window, o):
        if j == stop_at and o == len(self.a.text):
          i = n  # the draft stops where the assistant's text ends
        elif o < len(self.a.text):
          i = self.a.index_at(o)
      index.append(i if i is not None and i - 1 >= start else None)
      if i == n and self.as_.eos is None:
        index[-1] = None
    rows = np.asarray([(i - 1 - start) if i is not None else 0 for i in index] + [n - 1 - start],
                      np.int32)
    own = np.asarray([0 if i is None else self.a.ids[i] if i < n else self.as_.eos
                      for i in index] + [0], np.int32)
    self.a_fed = n
    return Plan(drafts, offsets, stop_at, self.a.ids[start:n], start, rows, index, own,
                len(self.a.text) == len(window))

  def _carry(self, x: int) -> int | None:
    """x^ (an assistant id) in the draft's vocabulary (`carry`)."""
    return carry(self.as_, self.ds, x)

  def candidates(self, plan: Plan, x_hat: np.ndarray) -> Candidates:
    k = len(plan.drafts)
    c = Candidates(np.zeros(k, np.int32), np.zeros(k, bool), np.zeros(k, bool))
    for j, i in enumerate(plan.index):
      if i is None:
        continue
      xa, xd_a = int(x_hat[j]), int(plan.own[j])
      carried = self._carry(xa)
      c.xa_d[j] = 0 if carried is None else carried
      c.agree[j] = xa == xd_a or (i == len(self.a.ids) and xa in self.as_.stop)
      c.replaceable[j] = carried is not None and not c.agree[j]
    return c

  def _accept(self, drafts) -> None:
    data = b"".join(self.ds.table[x] for x in drafts)
    self.d.append([int(x) for x in drafts], data)
    self.text += data

  def _append_assistant(self, x: int) -> None:
    """Appends x^'s text: the draft tokenizes it after its own tokens, the assistant
    re-tokenizes from its stable boundary."""
    data = self.as_.table[x]
    self.text += data
    self.d.append(self.ds.piece(data), data)
    self.a_fed = min(self.a_fed, self.a.extend(data, floor=self.a.floor))

  def commit(self, plan: Plan, c: Candidates, marks: np.ndarray, x_hat: np.ndarray,
             max_new: int, bonus: bool) -> int:
    """Applies the window's decision; returns the number of tokens emitted."""
    k = len(plan.drafts)
    st = self.stats
    st.windows += 1
    st.draft_calls += k
    st.assistant_calls += 1
    budget = max_new - self.emitted
    d_len = len(self.d.ids)  # the draft's cache now holds d_len + k - 1 valid tokens
    if marks.any():
      j = int(np.argmax(marks))
      if j >= budget:
        return self._finish(plan.drafts[:budget], d_len, budget, "length")
      self._accept(plan.drafts[:j])
      self.d_fed = d_len + j
      self.a.truncate(plan.offsets[j])
      self.a_fed = min(self.a_fed, plan.index[j])
      x = int(x_hat[j])
      st.draft_tokens += j
      st.assistant_tokens += 1
      st.replacements += 1
      self.emitted += j + 1
      self._end_with_assistant(x, max_new)
      return j + 1
    end = k if plan.stop_at is None else plan.stop_at + 1
    n = min(end, budget)
    if plan.stop_at is not None and plan.stop_at < n:
      return self._finish(plan.drafts[:n], d_len, n, "stop")
    if n < k or self.emitted + n >= max_new:
      return self._finish(plan.drafts[:n], d_len, n, "length")
    self._accept(plan.drafts)
    self.d_fed = d_len + k - 1
    self.emitted += k
    st.draft_tokens += k
    x = int(x_hat[k])
    if not bonus or not plan.whole or (x not in self.as_.stop and self._carry(x) is None):
      return k
    st.assistant_tokens += 1
    self.emitted += 1
    self._end_with_assistant(x, max_new)
    return k + 1

  def _end_with_assistant(self, x: int, max_new: int) -> None:
    """The window ends with the assistant's token `x` (already counted as emitted): a stop id
    finishes the row, any other token joins the text."""
    if x in self.as_.stop:
      self.done, self.reason = True, "stop"
    else:
      self._append_assistant(x)
      self.done = self.emitted >= max_new

  def _finish(self, drafts, d_len: int, n: int, reason: str) -> int:
    self._accept(drafts)
    self.d_fed = d_len + max(n - 1, 0)
    self.stats.draft_tokens += n
    self.emitted += n
    self.done, self.reason = True, reason
    return n
