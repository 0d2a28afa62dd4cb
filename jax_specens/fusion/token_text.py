"""Token ids <-> text bytes for cross-tokenizer CoSD: every token's exact bytes, and a token
sequence over a growing text that is re-tokenized only from its last stable boundary.

Alignment between two tokenizers is by byte offsets into the shared UTF-8 text (a token's span is
the sum of the byte lengths before it), never by decoded string lengths. Token bytes come from the
tokenizer's own vocabulary, so they are exact where `decode` is not:

  * byte-level BPE (GPT-2 / SmolLM2): every vocabulary character stands for one byte;
  * SentencePiece with byte fallback (Gemma, Llama): "▁" is a space, `<0xNN>` is byte NN;
  * special tokens (BOS, EOS, chat markers) have no bytes.

A token may end inside a UTF-8 character (a byte piece of an emoji); text is only handed to a
tokenizer up to its last complete character (`complete`) and the rest is held back.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
WHITESPACE = frozenset(b" \n\t\r")


@functools.lru_cache(maxsize=None)
def _byte_level_decoder() -> dict[str, int]:
  """GPT-2's printable stand-in character for every byte, inverted (char -> byte)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def _kind(tokenizer) -> str:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return "decode"
  spec = json.loads(backend.to_str())
  decoder = json.dumps(spec.get("decoder"))
  if '"ByteLevel"' in decoder:
    return "bytelevel"
  if "\\u2581" in decoder or "▁" in decoder:
    return "sentencepiece"
  return "decode"


_TABLES: dict[int, tuple] = {}


def token_bytes(tokenizer) -> list[bytes]:
  """The bytes every token id stands for (b"" for special tokens); cached per tokenizer."""
  hit = _TABLES.get(id(tokenizer))
  if hit is not None and hit[0] is tokenizer:
    return hit[1]
  kind = _kind(tokenizer)
  n = len(tokenizer)
  special = set(tokenizer.all_special_ids)
  special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
  pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
  table = []
  if kind == "bytelevel":
    inv = _byte_level_decoder()
    for i, p in enumerate(pieces):
      table.append(b"" if i in special or p is None else
                   bytes(inv[c] for c in p) if all(c in inv for c in p) else p.encode())
  elif kind == "sentencepiece":
    for i, p in enumerate(pieces):
      m = _BYTE_PIECE.match(p or "")
      table.append(b"" if i in special or p is None else
                   bytes([int(m.group(1), 16)]) if m else p.replace("▁", " ").encode())
  else:  # a generic tokenizer: each token decoded on its own (exact for most vocabularies)
    for i in range(n):
      table.append(b"" if i in special else tokenizer.decode([i]).encode())
  _TABLES[id(tokenizer)] = (tokenizer, table)
  return table


def complete(data: bytes) -> int:
  """Length of the longest prefix of `data` that ends on a whole UTF-8 character."""
  n = len(data)
  for back in range(1, min(4, n) + 1):
    b = data[n - back]
    if b < 0x80:
      return n if back == 1 else n - back + 1
    if b >= 0xC0:  # a lead byte: is its sequence whole?
      need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
      return n if back >= need else n - back
  return n


def is_char_boundary(data: bytes, offset: int) -> bool:
  """Whether `offset` falls between two UTF-8 characters of `data` (not inside one)."""
  return offset <= 0 or offset >= len(data) or not (0x80 <= data[offset] < 0xC0)


class TokenText:
  """One model's token ids over a text (bytes), with each token's end offset.

  `ids`/`ends` are plain lists: `ends[i]` is the byte offset where token i ends, so token i spans
  `[ends[i-1], ends[i])`. Special tokens (BOS) span zero bytes.
  """

  def __init__(self, tokenizer, table: Sequence[bytes], ids: Sequence[int], text: bytes,
               prefix: int = 0):
    self.tok, self.table = tokenizer, table
    self.ids = list(ids)
    # the first `prefix` tokens are this model's own prompt: they span no bytes of the text
    lengths = [0 if i < prefix else len(table[x]) for i, x in enumerate(self.ids)]
    self.ends = list(np.cumsum(lengths, dtype=np.int64).tolist())
    self.text = text
    # leading tokens without text (BOS, an own prompt): kept when re-tokenizing
    self.floor = next((i for i in range(prefix, len(self.ids)) if table[self.ids[i]]),
                      len(self.ids))
    if (self.ends[-1] if self.ends else 0) != len(text):
      raise ValueError(
          f"the tokenizer's tokens do not spell the text {text[:40]!r}...: it normalises the "
          "text (or drops characters), so byte offsets cannot align it with the other model's "
          "tokens; cross-tokenizer cosd needs a lossless tokenizer (byte-level BPE or "
          "SentencePiece with byte fallback)")

  @classmethod
  def encode(cls, tokenizer, text: str, special: bool = True) -> "TokenText":
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return cls(tokenizer, token_bytes(tokenizer), ids, text.encode())

  @classmethod
  def after_prompt(cls, tokenizer, prompt_ids: Sequence[int]) -> "TokenText":
    """An empty text read after this model's own prompt (say, its chat template around a
    question): the prompt's tokens span no bytes and are never re-tokenized."""
    return cls(tokenizer, token_bytes(tokenizer), prompt_ids, b"", prefix=len(prompt_ids))

  def piece(self, text: bytes) -> list[int]:
    """Token ids of `text` (whole characters) on its own, no special tokens."""
    return list(self.tok(text.decode(), add_special_tokens=False)["input_ids"]) if text else []

  def start(self, i: int) -> int:
    return self.ends[i - 1] if i > 0 else 0

  def index_at(self, offset: int) -> int | None:
    """The token that starts at byte `offset` and is not empty (None when none does)."""
    i = int(np.searchsorted(self.ends, offset, side="right"))
    return i if i < len(self.ids) and self.start(i) == offset else None

  def truncate(self, offset: int) -> None:
    """Keeps the tokens that end at or before `offset` (a token boundary) and their text."""
    n = int(np.searchsorted(self.ends, offset, side="right"))
    del self.ids[n:], self.ends[n:]
    self.text = self.text[:offset]

  def append(self, ids: Sequence[int], text: bytes) -> None:
    """Appends tokens whose bytes are `text` (the caller's own tokens: not re-tokenized)."""
    end = self.ends[-1] if self.ends else 0
    for i in ids:
      end += len(self.table[i])
      self.ids.append(i)
      self.ends.append(end)
    self.text += text

  def stable(self, back: int = 3, search: int = 16, floor: int = 0) -> int:
    """A token index to re-tokenize from: at least `back` tokens before the end and on a
    character boundary, preferably one that starts a word (its text begins with whitespace or
    follows a newline); never below `floor` (tokens the caller keeps)."""
    hi = len(self.ids) - back
    fallback = None
    for i in range(hi, floor, -1):
      at = self.start(i)
      if not is_char_boundary(self.text, at):
        continue
      t = self.table[self.ids[i]]
      if (t and t[0] in WHITESPACE) or self.text[at - 1:at] == b"\n":
        return i
      fallback = i if fallback is None else fallback
      if i <= hi - search and fallback is not None:
        return fallback
    return floor

  def extend(self, text: bytes, floor: int = 0) -> int:
    """Sets the text to `self.text + text` (whole characters), re-tokenizing from the last stable
    boundary (never below token `floor`); returns the first token index that changed (the
    tokens before it, and their cache entries, are untouched)."""
    if not text:
      return len(self.ids)
    s = self.stable(floor=floor)
    at = self.start(s)
    tail = self.text[at:] + text
    new = self.piece(tail)
    old = self.ids[s:]
    same = next((n for n, (x, y) in enumerate(zip(new, old)) if x != y), min(len(new), len(old)))
    self.truncate(at)
    self.append(new, tail)
    if self.ends[-1] != len(self.text):
      raise ValueError(f"the tokenizer's tokens do not spell the text {tail[:40]!r}: it "
                       "normalises the text, so byte offsets cannot align the two models")
    return s + same
