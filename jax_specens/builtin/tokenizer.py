"""The built-in models' shared byte-level BPE tokenizer, trained with Hugging Face `tokenizers`.

Byte-level, so every string round-trips exactly (`decode(encode(s)) == s`); one special token,
`<|endoftext|>`, separates documents and is the EOS (and BOS/pad) id. Nothing is added to an
encoded text. Saved as `tokenizer.json` plus `tokenizer_config.json`, so
`transformers.AutoTokenizer.from_pretrained(dir)` (and `jax_specens.checkpoint.load_tokenizer`) load it
like any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
                    ) -> Tokenizer:
  """A byte-level BPE of `vocab_size` tokens (including the 256 bytes and `<|endoftext|>`, id 0)."""
  if vocab_size < 257 + 1:
    raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs the "
                     "256 byte tokens, <|endoftext|> and at least one merge; use >= 258")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike, model_max_length: int = 2048
                   ) -> Path:
  """Writes `tokenizer.json` and `tokenizer_config.json` into (existing) `directory`."""
  directory = Path(directory)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": EOT,
      "eos_token": EOT,
      "pad_token": EOT,
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": model_max_length,
  }, indent=2))
  return directory


def load(directory: str | os.PathLike) -> Tokenizer:
  path = Path(directory) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; train the built-in tokenizer first: "
                            "python -m jax_specens.builtin.train")
  return Tokenizer.from_file(str(path))


def eot_id(tok: Tokenizer) -> int:
  return tok.token_to_id(EOT)


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
  """One int32 stream: every text's tokens followed by `<|endoftext|>`."""
  eot = eot_id(tok)
  ids = []
  for enc in tok.encode_batch(list(texts)):
    ids.extend(enc.ids)
    ids.append(eot)
  return np.asarray(ids, np.int32)
