"""Text in, text out: strings or chat conversations for a ragged batch, with any decoding method.

    out = generate_text(model, ["What is the capital of France?"], chat=True,
                        max_new_tokens=32, temperature=0)
    out.texts[0], out.finish_reasons[0], out.token_ids[0], out.stats

    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Name a prime number."}]
    out = generate_text([expert, amateur], [conversation], method="se", gamma=3,
                        max_new_tokens=64)

Prompts are tokenized exactly as transformers does it: a string with `tokenizer(text)` (its BOS
rule included), a conversation with `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`. Rows stop at every end-of-sequence id the models declare
(`config.json` and `generation_config.json` lists, the tokenizer's EOS) and, for conversations, at
the template's end-of-turn token. `texts` hold the generated text without the stop token.

Prompt-length buckets: the padded prompt width is static in the compiled program, so it is rounded
up to the next power of two, at least 32 (32, 64, 128, 256, ...). A new prompt whose length falls in
a bucket already compiled (same batch size, method, max_new_tokens and models) runs without
recompiling; `bucket=False` pads to the longest prompt instead. The batch size is static too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jax_specens import vocab
from jax_specens.decoding.outputs import DecodeOutput
from jax_specens.models.model import Model

MIN_BUCKET = 32
Messages = Sequence[dict]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The padded width of a prompt of `n` tokens: the next power of two, at least `minimum`."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class TextOutput:
  """texts: generated text per prompt (stop token removed, special tokens skipped);
  token_ids: generated ids per prompt (a final stop id included, as `decode` returns them);
  finish_reasons: "stop" | "length" | "cache_full"; prompt_ids: the tokenized prompts;
  stats: `DecodeOutput.to_dict()["stats"]`; output: the DecodeOutput itself."""

  texts: list[str]
  token_ids: list[list[int]]
  finish_reasons: list[str]
  prompt_ids: list[list[int]]
  stats: dict
  output: DecodeOutput | None = None

  def to_dict(self) -> dict:
    """The JSON of `jax-specens generate --json`: texts, tokens, lengths, finish_reasons, stats."""
    return {"texts": self.texts, "tokens": self.token_ids,
            "lengths": [len(t) for t in self.token_ids],
            "finish_reasons": self.finish_reasons, "stats": self.stats}


_TOKENIZERS: dict = {}  # (directory, its tokenizer files' stats) -> the loaded tokenizer


def _tokenizer_beside(source):
  """`checkpoint.load_tokenizer(source)`, loaded once per directory while its files are unchanged
  (Gemma 3's 262k-token tokenizer takes ~5 s to load: every `generate_text` call paid it)."""
  from jax_specens.checkpoint import load_tokenizer
  d = Path(source).resolve()
  stats = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(d.glob("*"))
                if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                      "merges")))
  key = (str(d), stats)
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = load_tokenizer(d)
  return _TOKENIZERS[key]


def tokenizer_of(models: Model | Sequence[Model]):
  """The Hugging Face tokenizer saved beside the first model loaded from a directory."""
  models = (models,) if isinstance(models, Model) else tuple(models)
  for m in models:
    source = vocab.of(m).source
    if source is not None:
      tok = _tokenizer_beside(source)
      if tok is not None:
        return tok
  raise ValueError("none of the models has tokenizer files beside it (load them with "
                   "jax_specens.load_model(DIR) from a directory that has tokenizer.json); pass "
                   "tokenizer=AutoTokenizer.from_pretrained(...) or decode token ids with "
                   "jax_specens.decode")


def is_conversation(x) -> bool:
  return not isinstance(x, str) and all(isinstance(m, dict) for m in x)


def encode(tokenizer, inputs: Sequence[str | Messages], *, chat: bool | None = None,
           system: str | None = None) -> list[list[int]]:
  """Token ids per prompt, as transformers makes them.

  inputs: strings, or conversations (lists of {"role", "content"} dicts).
  chat: None = a conversation gets the chat template, a string is plain text; True = every string
    is one user message (after the `system` message, if given); False = strings only.
  """
  if isinstance(inputs, str) or (len(inputs) and isinstance(inputs[0], dict)):
    raise ValueError("inputs must be a list of prompts: wrap one string as [text] and one "
                     "conversation as [[{'role': 'user', 'content': ...}]]")
  rows = []
  for i, x in enumerate(inputs):
    if isinstance(x, str) and not chat:
      if system is not None:
        raise ValueError("a system message needs the chat template: pass chat=True "
                         "(--chat on the command line)")
      ids = list(tokenizer(x)["input_ids"])
    elif isinstance(x, str) or is_conversation(x):
      if chat is False:
        raise ValueError(f"prompt {i} is a conversation but chat=False; pass strings")
      messages = [{"role": "user", "content": x}] if isinstance(x, str) else list(x)
      if system is not None:
        messages = [{"role": "system", "content": system}] + messages
      ids = _apply_template(tokenizer, messages)
    else:
      raise ValueError(f"prompt {i} is neither a string nor a list of {{'role', 'content'}} "
                       f"messages: {type(x).__name__}")
    if not ids:
      if tokenizer.bos_token_id is None:
        raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token; give text")
      ids = [tokenizer.bos_token_id]
    rows.append(ids)
  return rows


def require_chat_template(tokenizer) -> None:
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no chat template "
                     "(chat_template.jinja or tokenizer_config.json's chat_template); it is not an "
                     "instruct/chat model: give plain text prompts (no --chat / chat=False)")


def check_chat(model_dir) -> None:
  """Before any weights load (`generate --chat`): the tokenizer beside `model_dir` (a directory
  or `builtin:NAME`; loaded once, the one `generate_text` then uses) has a chat template."""
  from jax_specens.builtin import resolve
  tokenizer = _tokenizer_beside(resolve(model_dir))
  if tokenizer is not None:
    require_chat_template(tokenizer)


def _apply_template(tokenizer, messages) -> list[int]:
  require_chat_template(tokenizer)
  enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)
  return list(enc["input_ids"])


def end_of_turn_ids(tokenizer) -> list[int]:
  """The special token the chat template writes right after an assistant's message (e.g.
  `<|im_end|>`, `<end_of_turn>`); empty without a template or when none follows."""
  if not getattr(tokenizer, "chat_template", None):
    return []
  mark = "XQ7Z marker"
  text = tokenizer.apply_chat_template(
      [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
      tokenize=False)
  if mark not in text:
    return []
  after = tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
  special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
  return [after[0]] if after and after[0] in special else []


def stop_ids(models: Sequence[Model], tokenizer=None, chat: bool = False) -> list[int]:
  """Every end-of-sequence id the models declare: their `eos_token_ids` (config.json and
  generation_config.json, merged at conversion), the generation_config.json beside each model
  directory, the tokenizer's EOS and, for chat, the template's end-of-turn token."""
  import json
  ids = set()
  for m in models:
    ids.update(m.config.eos_token_ids)
    source = vocab.of(m).source
    gen = Path(source) / "generation_config.json" if source else None
    if gen is not None and gen.is_file():
      eos = json.loads(gen.read_text()).get("eos_token_id")
      ids.update([eos] if isinstance(eos, int) else (eos or []))
  if tokenizer is not None:
    if tokenizer.eos_token_id is not None:
      ids.add(tokenizer.eos_token_id)
    if chat:
      ids.update(end_of_turn_ids(tokenizer))
  limit = vocab.shared_size(models)
  return sorted(i for i in ids if 0 <= i < limit)


def pad(rows: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token rows with 0 to `width` (default: the longest): (prompts [B, T], lengths)."""
  lengths = np.array([len(r) for r in rows], np.int32)
  prompts = np.zeros((len(rows), int(width or lengths.max())), np.int32)
  for i, r in enumerate(rows):
    prompts[i, :len(r)] = r
  return prompts, lengths


def padded_width(models: Sequence[Model], longest: int, max_new_tokens: int, use_bucket: bool
                 ) -> int:
  """The bucketed width, or `longest` where a model's learned positions would not fit it."""
  if not use_bucket:
    return longest
  width = bucket(longest)
  learned = [m.config.max_position_embeddings for m in models if m.config.positions == "learned"]
  if learned and width + max_new_tokens + 64 > min(learned):
    return longest
  return width


def decode_texts(tokenizer, out: DecodeOutput, stops: Sequence[int]) -> list[str]:
  """Each row's generated text, its final stop id removed."""
  texts = []
  for ids in out.to_lists():
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
  return texts


def generate_text(models: Model | Sequence[Model], inputs: Sequence[str | Messages], *,
                  max_new_tokens: int, method: str = "ar", tokenizer=None,
                  chat: bool | None = None, system: str | None = None, draft: Model | None = None,
                  extra_stop_ids: Sequence[int] = (), stop: bool = True, bucket: bool = True,
                  decode_fn: Callable[..., DecodeOutput] | None = None, **decode_kwargs: Any
                  ) -> TextOutput:
  """Tokenizes `inputs`, decodes them in one batch with `jax_specens.decode`, detokenizes.

  Args:
    models, method, draft, max_new_tokens, **decode_kwargs: as `jax_specens.decode` (gamma,
      temperature, top_p, ensemble, weights, key, ...).
    inputs: strings and/or conversations, one per batch row (see `encode`).
    tokenizer: default: the one saved beside the first model (all must share it: `vocab`).
    chat, system: see `encode`.
    extra_stop_ids: stop ids besides the declared ones; stop=False ignores every stop id.
    bucket: pad prompts to a bucketed width (module doc) so new prompts reuse compiled programs.
    decode_fn: replaces `jax_specens.decode` (e.g. `jax_specens.parallel.decode` on a mesh).
  """
  from jax_specens.decoding.api import decode
  ms = (models,) if isinstance(models, Model) else tuple(models)
  every = ms + ((draft,) if draft is not None else ())
  vocab.check_shared(every)
  if tokenizer is None:
    tokenizer = tokenizer_of(every)
  rows = encode(tokenizer, inputs, chat=chat, system=system)
  conversational = any(not isinstance(x, str) for x in inputs) or bool(chat)
  stops = (stop_ids(every, tokenizer, conversational) + list(extra_stop_ids)) if stop else []
  longest = max(len(r) for r in rows)
  prompts, lengths = pad(rows, padded_width(every, longest, max_new_tokens, bucket))
  out = (decode_fn or decode)(models, prompts, lengths, method=method, draft=draft,
                              max_new_tokens=max_new_tokens, stop_ids=stops or None,
                              **decode_kwargs)
  return TextOutput(texts=decode_texts(tokenizer, out, stops), token_ids=out.to_lists(),
                    finish_reasons=out.finish_reasons(), prompt_ids=rows,
                    stats=out.to_dict()["stats"], output=out)
