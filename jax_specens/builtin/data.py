"""Real text found offline on any machine with Python: the corpora of the built-in models.

Two domains, both read from the running interpreter's own standard library
(`sysconfig.get_paths()["stdlib"]`), so nothing is downloaded:

- **code**: the standard library's Python source files (tests, codec tables, `pydoc_data` and
  `site-packages` left out) with their docstrings removed — code and comments only;
- **prose**: English text shipped with Python: the language reference topics of
  `pydoc_data/topics.py` (what `help("assert")` prints), the docstrings removed from those very
  source files (module, class and function documentation), and the plain-text files of the stdlib
  (`LICENSE.txt`, `idlelib/*.txt` where IDLE is installed).

Every document has a stable key (its path relative to the stdlib, or `pydoc_data/topics.py:<topic>`);
a hash of the key puts it in one fixed split — `train` (the language models), `fusion` (the CoSD
tree / learned fusion head) or `test` (held out for every evaluation). A source file's code and its
docstrings share the key, hence the split: no held-out text is ever seen in training.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import sysconfig
from pathlib import Path

DOMAINS = ("code", "prose")
SPLITS = ("train", "fusion", "test")
# Percent of documents in each split, by hash of the document key.
SPLIT_PERCENT = {"test": 8, "fusion": 8, "train": 84}

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings",
                        "pydoc_data", "__pycache__", "config-3", "lib-dynload", "turtledemo"})


@dataclasses.dataclass(frozen=True)
class Document:
  """One piece of text: `key` is stable across machines, `split` follows from it."""

  key: str
  domain: str
  text: str

  @property
  def split(self) -> str:
    return split_of(self.key)


def hash_percent(key: str) -> int:
  """A fixed bucket in [0, 100) of a key (sha256): every machine agrees without a file list."""
  return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


def split_of(key: str) -> str:
  """The fixed split of a document key: a hash, so every machine agrees without a file list."""
  bucket = hash_percent(key)
  if bucket < SPLIT_PERCENT["test"]:
    return "test"
  if bucket < SPLIT_PERCENT["test"] + SPLIT_PERCENT["fusion"]:
    return "fusion"
  return "train"


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def source_files() -> tuple[str, ...]:
  """Keys (posix paths relative to the stdlib) of the standard library's Python modules."""
  root = stdlib_dir()
  keys = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if any(part in _SKIP_DIRS or part.startswith("config-3") for part in rel.parts[:-1]):
      continue
    if rel.name.startswith(("_sysconfigdata", "test_")):
      continue
    keys.append(rel.as_posix())
  return tuple(sorted(keys))


def split_source(source: str) -> tuple[str, str] | None:
  """Splits Python source into (code without docstrings, the docstrings as paragraphs).

  A docstring is the string-literal first statement of a module, class or function; its lines are
  removed from the code (one that shares a line with other code is left in place). None when the
  file does not parse with this interpreter.
  """
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return None
  lines = source.splitlines(keepends=True)
  drop, docs = set(), []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    body = node.body
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
      continue
    expr = body[0]
    docs.append((expr.lineno, inspect.cleandoc(expr.value.value)))
    first, last = expr.lineno - 1, expr.end_lineno - 1
    alone = (lines[first][:expr.col_offset].strip() == ""
             and lines[last][expr.end_col_offset:].strip() in ("", ";"))
    if alone:
      drop.update(range(first, last + 1))
  code = "".join(line for i, line in enumerate(lines) if i not in drop)
  prose = "\n\n".join(text for _, text in sorted(docs) if text.strip())
  return code, prose


@functools.lru_cache(maxsize=None)
def _read_source(key: str) -> tuple[str, str] | None:
  try:
    source = (stdlib_dir() / key).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError):
    return None
  return split_source(source)


def _pydoc_topics() -> dict[str, str]:
  try:
    from pydoc_data.topics import topics
  except ImportError:  # a stripped-down Python without pydoc_data
    return {}
  return dict(topics)


def _text_files() -> list[str]:
  root = stdlib_dir()
  keys = [p.relative_to(root).as_posix() for p in [root / "LICENSE.txt"] if p.is_file()]
  keys += [p.relative_to(root).as_posix() for p in sorted((root / "idlelib").glob("*.txt"))]
  return keys


def documents(domain: str, split: str | None = None) -> list[Document]:
  """All documents of `domain` ("code" or "prose") in `split` (any split when None), in key order.

  Only the files of the requested split are read.
  """
  if domain not in DOMAINS:
    raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
  wanted = lambda key: split is None or split_of(key) == split
  docs = []
  for key in source_files():
    if not wanted(key):
      continue
    parts = _read_source(key)
    if parts is None:
      continue
    text = parts[0] if domain == "code" else parts[1]
    if text.strip():
      docs.append(Document(key, domain, text))
  if domain == "prose":
    for name, text in sorted(_pydoc_topics().items()):
      key = f"pydoc_data/topics.py:{name}"
      if wanted(key):
        docs.append(Document(key, domain, text))
    for key in _text_files():
      if wanted(key):
        docs.append(Document(key, domain, (stdlib_dir() / key).read_text(encoding="utf-8",
                                                                         errors="replace")))
  if not docs:
    raise FileNotFoundError(
        f"no {domain} text found in the standard library at {stdlib_dir()} (split {split}); the "
        "built-in corpora need a Python installation with its standard library sources (.py files)")
  return docs


def summary() -> dict:
  """Number of documents and characters per domain and split, and where they were read from."""
  out = {"stdlib": str(stdlib_dir())}
  for domain in DOMAINS:
    docs = documents(domain)
    out[domain] = {s: {"documents": sum(d.split == s for d in docs),
                       "chars": sum(len(d.text) for d in docs if d.split == s)} for s in SPLITS}
  return out
