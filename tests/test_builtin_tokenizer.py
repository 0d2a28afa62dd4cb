"""The built-in corpora (fixed held-out split by file) and the shared byte-level BPE tokenizer."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jax_specens.builtin import builtin_tokenizer, data
from jax_specens.builtin import tokenizer as tokenizer_lib

TRICKY = "def f(x):\n\treturn x  # héllo 😀 \u00a0\r\n\n    The cat sat.   \x00end"


def test_split_source_moves_docstrings_to_prose():
  source = ('"""Module doc."""\nimport os\n\n\nclass A:\n  """Class\n  doc."""\n  x = 1\n\n'
            'def f(): "inline doc"; return 2\n\nasync def g():\n  """G doc."""\n  await h()\n')
  code, prose = data.split_source(source)
  assert "Module doc" not in code and "Class" not in code and "G doc" not in code
  assert "import os" in code and "x = 1" in code and "await h()" in code
  assert 'def f(): "inline doc"; return 2' in code  # shares its line with code: kept
  assert prose.split("\n\n") == ["Module doc.", "Class\ndoc.", "inline doc", "G doc."]
  assert data.split_source("def broken(:\n") is None


def test_documents_follow_their_fixed_split():
  for domain in data.DOMAINS:
    test = data.documents(domain, "test")
    fusion = data.documents(domain, "fusion")
    assert test and fusion
    assert all(d.split == "test" and d.domain == domain and d.text.strip() for d in test)
    assert all(data.split_of(d.key) == "fusion" for d in fusion)
    assert not {d.key for d in test} & {d.key for d in fusion}
  # Code and its docstrings share a key, hence a split; pydoc topics are prose documents.
  prose_keys = {d.key for d in data.documents("prose", "test")}
  held = prose_keys | {d.key for d in data.documents("prose", "fusion")}
  assert any(k.startswith("pydoc_data/topics.py:") for k in held)
  code_keys = {d.key for d in data.documents("code", "test")}
  assert {k for k in prose_keys if k.endswith(".py")} <= code_keys
  assert not any('"""' in d.text[:3] for d in data.documents("code", "test"))


def test_split_is_a_stable_hash_of_the_key():
  keys = [f"pkg/mod{i}.py" for i in range(2000)]
  splits = [data.split_of(k) for k in keys]
  assert splits == [data.split_of(k) for k in keys]
  frac = {s: splits.count(s) / len(keys) for s in data.SPLITS}
  assert 0.05 < frac["test"] < 0.11 and 0.05 < frac["fusion"] < 0.11 and frac["train"] > 0.8


def test_bad_domain_or_split_is_named():
  with pytest.raises(ValueError, match="unknown domain 'poetry'"):
    data.documents("poetry")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    data.documents("code", "dev")


def test_trained_tokenizer_round_trips_and_loads_with_transformers(tmp_path):
  texts = ["def add(a, b):\n    return a + b\n"] * 20 + ["The quick brown fox jumps."] * 20
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
  # BPE stops early when a tiny corpus runs out of pairs to merge: at most the target, and merges
  # beyond the 256 bytes + <|endoftext|>.
  assert 257 < tok.get_vocab_size() <= 300 and tokenizer_lib.eot_id(tok) == 0
  tokenizer_lib.save_tokenizer(tok, tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["eos_token"] == tokenizer_lib.EOT
  hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  for text in texts[:1] + texts[-1:] + [TRICKY, ""]:
    ids = hf.encode(text)
    assert ids == tok.encode(text).ids  # nothing added (no BOS/EOS)
    assert hf.decode(ids) == text
  stream = tokenizer_lib.encode_documents(tok, ["ab", "cd"])
  assert stream.dtype == np.int32 and list(stream).count(0) == 2 and stream[-1] == 0
  assert len(tok.encode(texts[0]).ids) < len(texts[0]) / 2  # merges were learned


def test_tokenizer_vocab_too_small():
  with pytest.raises(ValueError, match="vocab_size=100 is too small"):
    tokenizer_lib.train_tokenizer(["abc"], vocab_size=100)


def test_shipped_tokenizer_round_trips_held_out_text_of_both_domains():
  tok = builtin_tokenizer()
  assert tok.eos_token == tokenizer_lib.EOT and tok.eos_token_id == 0
  assert tok.decode(tok.encode(TRICKY)) == TRICKY
  for domain in data.DOMAINS:
    docs = data.documents(domain, "test")[:5]
    chars = tokens = 0
    for doc in docs:
      ids = tok.encode(doc.text)
      assert tok.decode(ids) == doc.text
      chars, tokens = chars + len(doc.text), tokens + len(ids)
    assert chars / tokens > 2.5, f"{domain}: {chars / tokens:.2f} chars per token"
