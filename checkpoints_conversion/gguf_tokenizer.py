"""The tokenizer a GGUF file describes -> `tokenizer.json` + `tokenizer_config.json`.

A GGUF carries no `tokenizer.json`: the vocabulary, merges, token types and special ids are
metadata. transformers' own GGUF tokenizer builders (`integrations.gguf.gguf_tokenizer_mapping`,
which need no torch) turn them into a `tokenizers.Tokenizer`; this module reads the metadata with
the `gguf` package (transformers' reader imports torch), hands it to them, and saves the result
with the chat template, BOS/EOS flags and special tokens in `tokenizer_config.json`.
`generation_config.json` lists every end-of-generation id (`gguf_config.eos_ids`).
"""

from __future__ import annotations

import json
from pathlib import Path

from checkpoints_conversion.gguf_file import field


def tokenizer_metadata(reader) -> tuple[str, dict, dict]:
  """`(architecture, tokenizer_dict, tokenizer_config)` as transformers' `get_gguf_tokenizer`."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
  arch = field(reader, "general.architecture")
  grouped = {group: {name: field(reader, f"tokenizer.{key}")
                     for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
  if "tokens" not in tokenizer:
    raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens metadata); pass "
                     "a GGUF converted with its tokenizer")
  if tokenizer.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
  for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                    ("pad_token", "padding")):
    token_id = field(reader, f"tokenizer.ggml.{key}_token_id")
    if token_id is not None:
      config[name] = tokenizer["tokens"][token_id]
  return arch, tokenizer, config


def write_tokenizer(reader, out_dir: Path, eos: list[int]) -> None:
  """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `out_dir`."""
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  arch, tokenizer_dict, config = tokenizer_metadata(reader)
  try:
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
  except (ValueError, KeyError) as e:
    raise ValueError(f"cannot build a tokenizer from the GGUF metadata ({e})") from e
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
  tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
  generation = {"eos_token_id": eos}
  for key in ("bos", "padding"):
    token_id = field(reader, f"tokenizer.ggml.{key}_token_id")
    if token_id is not None:
      generation[f"{'pad' if key == 'padding' else key}_token_id"] = int(token_id)
  (Path(out_dir) / "generation_config.json").write_text(json.dumps(generation, indent=2))
