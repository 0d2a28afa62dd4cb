"""Which tokenizer a model speaks: pairing models by tokenizer content, not by embedding size.

Two checkpoints can share one tokenizer and still have embedding tables of different sizes
(Qwen2.5-0.5B has 151936 rows, Qwen2.5-7B 152064, for the same 151665 tokens): the rows past the
tokenizer's last id are padding. Two tokenizers can also differ with tables of equal size. So a
`Model` loaded from a directory carries a `Vocab`:

    size         the real vocabulary: ids [0, size) are tokens, ids >= size are padding rows
    fingerprint  sha256 of the tokenizer's content (vocabulary, merges, added/special tokens,
                 normalizer, pre-tokenizer, decoder; not its BOS/EOS settings or max length)
    source       the model directory (for messages and for loading the tokenizer)

`shared_size(models)` is what speculation and ensembles decode over: the models must have equal
fingerprints (ValueError naming both directories and pointing to cross-tokenizer CoSD otherwise),
and every model's logits are cut to that many ids (`restrict`), so a padded id is never proposed,
accepted or emitted. Models without tokenizer files (random test models, `create_model`) have no
fingerprint and pair by equal table size, as before.

The fingerprint is recorded in `DIR/tokenizer_fingerprint.json` when a model is saved, together
with the sha256 of the tokenizer files it was computed from; `identify` reuses it while those files
are unchanged and recomputes it otherwise (an old directory without the record, or a tokenizer
edited after conversion), without writing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from jaxtyping import Array, Float

from jax_specens.user_cache import portable_path, recorded_path

FINGERPRINT_FILE = "tokenizer_fingerprint.json"
RECORD_VERSION = 1
BORROWED_KEY = "tokenizer_of"  # a record of a tokenizer kept in another directory (`record`)
# the files that define which string each id means (tokenizer_config.json is left out: its
# BOS/EOS choices and max length differ between checkpoints that share one vocabulary)
CONTENT_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "added_tokens.json")
# the parts of tokenizer.json that decide the id <-> text mapping
TOKENIZER_JSON_KEYS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A model's tokenizer identity (static: part of a jitted program's key, source excluded)."""

  size: int
  fingerprint: str | None = None
  source: str | None = dataclasses.field(default=None, compare=False)

  def describe(self) -> str:
    fp = self.fingerprint[:12] if self.fingerprint else "no tokenizer"
    return f"{self.source or '<in memory>'} (tokenizer {fp}, {self.size} ids)"


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: Path) -> dict[str, str]:
  return {n: _sha256(directory / n) for n in CONTENT_FILES if (directory / n).is_file()}


def _content(directory: Path) -> tuple[str, int] | None:
  """(fingerprint, number of ids) of the tokenizer files in `directory`, None when there are none.

  tokenizer.json: the canonical JSON of TOKENIZER_JSON_KEYS; ids = 1 + the largest id of the
  model's vocabulary and the added tokens. Otherwise (a slow tokenizer only) the raw bytes of its
  files, and the ids of the tokenizer transformers builds from them.
  """
  path = directory / "tokenizer.json"
  if path.is_file():
    tok = json.loads(path.read_text(encoding="utf-8"))
    canon = json.dumps({k: tok.get(k) for k in TOKENIZER_JSON_KEYS}, sort_keys=True,
                       ensure_ascii=False, separators=(",", ":"))
    vocab = (tok.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in tok.get("added_tokens") or ()]
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest(), max(ids, default=-1) + 1
  files = _files(directory)
  if not files:
    return None
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                      trust_remote_code=False)
  canon = json.dumps({"files": files, "added": sorted(
      (i, str(t)) for i, t in tok.added_tokens_decoder.items())}, sort_keys=True)
  return "sha256:" + hashlib.sha256(canon.encode()).hexdigest(), len(tok)


def record(directory: str | os.PathLike, borrowed_from: str | os.PathLike | None = None
           ) -> dict | None:
  """Writes DIR/tokenizer_fingerprint.json for the tokenizer files in DIR (None: there are none).

  Call it on a directory being written (inside `checkpoint.atomic_dir`), after the tokenizer files.
  borrowed_from: a model directory whose tokenizer DIR speaks without a copy of its files (a
  draft of a target whose tokenizer.json is large: Gemma 3's is 33 MB). The record then holds
  that tokenizer's fingerprint, no files (so `identify` keeps using it) and the directory
  (`BORROWED_KEY`), where `checkpoint.load_tokenizer` reads the tokenizer.
  """
  directory = Path(directory)
  source = directory if borrowed_from is None else Path(borrowed_from)
  found = _content(source)
  if found is None:
    if borrowed_from is not None:
      raise ValueError(f"{borrowed_from} has no tokenizer files to borrow")
    return None
  meta = {"version": RECORD_VERSION, "fingerprint": found[0], "vocab_size": found[1],
          "files": _files(directory)}
  if borrowed_from is not None:
    meta[BORROWED_KEY] = portable_path(borrowed_from)
  (directory / FINGERPRINT_FILE).write_text(json.dumps(meta, indent=2))
  return meta


def identify(directory: str | os.PathLike, table_size: int) -> Vocab:
  """The Vocab of the model in `directory` whose embedding table has `table_size` rows.

  Reads the recorded fingerprint while the tokenizer files are those it was computed from;
  recomputes it otherwise. Without tokenizer files: no fingerprint, size = `table_size`.
  """
  directory = Path(directory)
  found = None
  rec = directory / FINGERPRINT_FILE
  if rec.is_file():
    try:
      meta = json.loads(rec.read_text())
      if meta.get("version") == RECORD_VERSION and meta.get("files") == _files(directory):
        found = (meta["fingerprint"], int(meta["vocab_size"]))
    except (ValueError, KeyError, TypeError):
      found = None  # unreadable record: recompute from the files themselves
  if found is None:
    found = _content(directory)
  if found is None:
    return Vocab(size=table_size, fingerprint=None, source=str(directory))
  # a tokenizer with more ids than the table (rare): only the table's ids can be decoded
  return Vocab(size=min(found[1], table_size), fingerprint=found[0], source=str(directory))


def borrowed(directory: str | os.PathLike) -> Path | None:
  """The directory whose tokenizer `directory` borrows (`record(..., borrowed_from=...)`), checked
  to still hold that tokenizer; None when `directory` records no borrowed tokenizer."""
  rec = Path(directory) / FINGERPRINT_FILE
  try:
    meta = json.loads(rec.read_text()) if rec.is_file() else {}
  except ValueError:
    return None
  if not isinstance(meta, dict) or BORROWED_KEY not in meta:
    return None
  source = recorded_path(meta[BORROWED_KEY])
  # the source's own record when its files are unchanged (no 33 MB re-parse per load)
  found = identify(source, 0).fingerprint if source.is_dir() else None
  if found != meta.get("fingerprint"):
    raise ValueError(f"{directory} speaks the tokenizer of {source}, which "
                     + ("is gone" if found is None else "now holds another tokenizer")
                     + "; convert the target again there, or load the tokenizer from the "
                     "target's directory")
  return source


def of(model) -> Vocab:
  """The model's Vocab (a model built in memory: its table size, no fingerprint)."""
  v = getattr(model, "vocab", None)
  return v if v is not None else Vocab(size=model.config.vocab_size)


def check_shared(models: Sequence) -> int:
  """The number of ids `models` decode over together; ValueError when their tokenizers differ.

  Models with fingerprints must all have the same one (their table sizes may differ). A model
  without one pairs only by equal table size with every other model.
  """
  vocabs = [of(m) for m in models]
  known = [v for v in vocabs if v.fingerprint is not None]
  cosd = ("for two models with different tokenizers use cross-tokenizer CoSD: "
          "jax_specens.fusion.cosd_text(draft, assistant, draft_tokenizer, assistant_tokenizer, "
          "prompts, ...) or `jax-specens generate --method cosd --draft DIR --model DIR`")
  if len({v.fingerprint for v in known}) > 1:
    first = known[0]
    other = next(v for v in known if v.fingerprint != first.fingerprint)
    raise ValueError(f"the models have different tokenizers: {first.describe()} and "
                     f"{other.describe()}; speculation and ensembles need one shared tokenizer "
                     f"(same vocabulary, merges and special tokens); {cosd}")
  tables = [m.config.vocab_size for m in models]
  if len(known) < len(vocabs) and len(set(tables)) > 1:
    raise ValueError(f"the models have different vocabulary sizes {tables} and at least one has "
                     "no tokenizer files to compare; ensembles and speculation need one shared "
                     f"vocabulary (same tokenizer); {cosd}")
  return min(v.size for v in vocabs)


def shared_size(models: Sequence) -> int:
  """The shared real vocabulary (static; `check_shared` has validated the models)."""
  return min(of(m).size for m in models)


def restrict(logits: Float[Array, "... V"], size: int) -> Float[Array, "... size"]:
  """Logits over the first `size` ids: the padding rows of a larger table are cut off, so no
  sampler or acceptance test can ever pick one. A cut, not a -inf mask: tables of different sizes
  need a cut anyway, and the two cost the same within noise (benchmarks/vocab_mask.py: mask/cut
  0.47-3.5, median ~1.0, on the shared 2-core CPU)."""
  return logits if logits.shape[-1] == size else logits[..., :size]
