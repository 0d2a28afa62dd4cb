"""Cross-tokenizer CoSD on the real pair: SmolLM2-135M-Instruct (draft, byte-level BPE) and
Gemma-3-270M (assistant, SentencePiece with byte fallback).

Both are loaded with their layers scanned (`models/layout.py`: SmolLM2's 30 layers one scanned
block, Gemma 3's 18 three steps of its 6-layer period), which compiles each program several
times faster; the scanned models compute the unrolled logits (tests/test_gguf_real.py,
tests/test_layout.py), and what is checked here is the text carried between the tokenizers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import text
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decoding.api import decode
from jax_specens.fusion import ConstantVerifier, RuleVerifier, cosd_text
from jax_specens.fusion.token_text import TokenText, token_bytes
from tests.cross_reference import reference_cosd

NEW, K = 12, 4
ADVERSARIAL = [
    "Emoji 🙂🙃👍🏽 and a family 👨‍👩‍👧 then",
    "日本語の文章と中文字符，然后",
    "   leading spaces, then  two  spaces:",
    "Digits 3.14159, 2026-11-30 and 1234567 then",
    "def f(x):\n    if x:\n\treturn x + 1\n    ",
]


@pytest.fixture(scope="module")
def pair(real_smollm2, real_gemma3):
  return (load_model(real_smollm2, scan_layers=True), load_model(real_gemma3, scan_layers=True),
          load_tokenizer(real_smollm2), load_tokenizer(real_gemma3))


@pytest.mark.parametrize("which", ["draft", "assistant"])
@pytest.mark.real
def test_token_bytes_spell_text_and_incremental_tokenization_is_canonical(pair, which):
  tok = pair[2] if which == "draft" else pair[3]
  table = token_bytes(tok)
  rng = np.random.default_rng(0)
  for s in ADVERSARIAL:
    full = TokenText.encode(tok, s)
    assert b"".join(table[i] for i in full.ids) == s.encode()
    for _ in range(4):  # the same text arriving in random pieces (whole characters)
      chars, pos = list(s), int(rng.integers(1, 4))
      inc = TokenText.encode(tok, "".join(chars[:pos]))
      while pos < len(chars):
        step = int(rng.integers(1, 6))
        inc.extend("".join(chars[pos:pos + step]).encode(), floor=inc.floor)
        pos += step
      assert inc.ids == full.ids and inc.text == s.encode()


def _draft_alone(draft, tok, prompts):
  """The draft's own greedy text for each prompt: one ragged batch, one compiled program."""
  rows = [tok(p)["input_ids"] for p in prompts]
  got = decode(draft, *text.pad(rows), method="ar", max_new_tokens=NEW, temperature=0.0,
               stop_ids=sorted(set(draft.config.eos_token_ids) | {tok.eos_token_id}))
  return [tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids)):]
          for ids, new in zip(rows, got.to_lists())]


@pytest.mark.real
def test_never_replacing_reproduces_the_drafts_text(pair):
  draft, assistant, tok_d, tok_a = pair
  prompts = ["The capital of France is", ADVERSARIAL[0], ADVERSARIAL[4]]
  out = cosd_text(draft, assistant, tok_d, tok_a, prompts, max_new_tokens=NEW, window=K,
                  temperature=0.0, verifier=ConstantVerifier(False))
  assert out.texts == _draft_alone(draft, tok_d, prompts)
  assert all(s.replacements == 0 and s.assistant_tokens == 0 for s in out.stats)


@pytest.mark.real
@pytest.mark.parametrize("name, verifier, prompts", [
    ("always", ConstantVerifier(True), ["The capital of France is", ADVERSARIAL[2]]),
    ("rule", RuleVerifier(jnp.float32(0.5), jnp.float32(0.5)),
     [ADVERSARIAL[i] for i in (0, 1, 3, 4)])])
def test_batched_program_matches_the_text_level_reference(pair, name, verifier, prompts):
  """Always-replace gives what the assistant chooses at each window; the rule, the SPEC's rule;
  row by row, adversarial prompts in one batch (always: spaces; the rule: emoji, CJK, digits,
  code)."""
  draft, assistant, tok_d, tok_a = pair
  out = cosd_text(draft, assistant, tok_d, tok_a, prompts, max_new_tokens=NEW, window=K,
                  temperature=0.0, verifier=verifier)
  want = [reference_cosd(draft, assistant, tok_d, tok_a, p, max_new=NEW, k=K, verifier=verifier)
          for p in prompts]
  assert out.texts == want
  replaced = sum(s.replacements for s in out.stats)
  assert replaced > 0  # the assistant's text gets in
  if name == "always":
    assert all(s.replacements == s.assistant_tokens for s in out.stats)
