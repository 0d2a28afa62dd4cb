"""Greedy and sampled CoSD in the jitted decode loop (docs/algorithms.md §4), on the two grammar models.

A reference implementation below decodes CoSD window by window in Python from full-sequence
forward passes; the jitted loop must match it token for token, row by row, including where each
row's replacements happen. Extreme rule parameters give verifiers that never replace (alpha = 0:
p_d < 0 never holds) or always replace a disagreement (alpha = 2, beta = 0); alpha and beta are
per-row arrays, so every case runs in one batch through one compiled program.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.cache import init_cache
from jax_specens.decoding.api import decode
from jax_specens.fusion import RuleVerifier
from jax_specens.step import forward
from tests.fixtures_fusion import REGION

K = 3
NEW = 14
L = 32  # reference forward width (prompt + NEW + K fits)
# prompts in regions A, B, C (each twice) with different lengths
PROMPTS = np.array([[3, 0, 0, 0], [REGION + 5, REGION + 9, 0, 0], [2 * REGION + 1, 0, 0, 0],
                    [7, 1, 12, 0], [REGION + 2, 0, 0, 0], [2 * REGION + 8, 2 * REGION + 3, 0, 0]],
                   np.int32)
LENGTHS = np.array([1, 2, 1, 3, 1, 2], np.int32)
RULE = dict(alpha=0.5, beta=0.5)
NEVER = dict(alpha=0.0, beta=0.5)
ALWAYS = dict(alpha=2.0, beta=0.0)


def per_row(*cases):
  """A RuleVerifier whose alpha, beta are `[B, 1]` (one case per row, broadcast over positions)."""
  rows = [cases[i % len(cases)] for i in range(len(PROMPTS))]
  return RuleVerifier(alpha=jnp.array([[c["alpha"]] for c in rows], jnp.float32),
                      beta=jnp.array([[c["beta"]] for c in rows], jnp.float32))


@jax.jit
def _logits(model, tokens):
  cache = init_cache(model.config, 1, L)
  return forward(model, cache, tokens[None], jnp.zeros((1,), jnp.int32))[0][0]


def logits_of(model, seq):
  return np.asarray(_logits(model, jnp.asarray(np.pad(seq, (0, L - len(seq))), jnp.int32)))


def softmax64(logits):
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_cosd(draft, assistant, prompt, alpha, beta, bonus):
  """Greedy CoSD of one row, straight from docs/algorithms.md §4; returns (tokens, replaced windows)."""
  seq, out, replaced = list(prompt), [], 0
  while len(out) < NEW:
    drafts, d_logits = [], []
    for _ in range(K):
      d_logits.append(logits_of(draft, seq + drafts)[len(seq) + len(drafts) - 1])
      drafts.append(int(np.argmax(d_logits[-1])))
    a_logits = logits_of(assistant, seq + drafts)[len(seq) - 1:len(seq) + K]
    cands = np.argmax(a_logits, -1)
    # docs/algorithms.md §4's rule in numpy, independent of the library's feature code: replace x~_j by x^_j
    # iff x~_j != x^_j and p_d(x~_j) < alpha and p_a(x^_j) > beta * p_d(x~_j)
    p_d = softmax64(np.stack(d_logits))[np.arange(K), drafts]
    p_a = softmax64(a_logits[:K])[np.arange(K), cands[:K]]
    replace = (np.asarray(drafts) != cands[:K]) & (p_d < alpha) & (p_a > beta * p_d)
    if replace.any():
      j = int(np.argmax(replace))
      new = drafts[:j] + [int(cands[j])]
      replaced += len(out) + j < NEW  # the replacing token is emitted
    else:
      new = drafts + ([int(cands[K])] if bonus else [])
    seq += new
    out += new
  return out[:NEW], replaced


def run(models, draft, verifier, bonus, temperature=0.0, key=0):
  return decode(models, PROMPTS, LENGTHS, method="cosd", draft=draft, verifier=verifier,
                bonus=bonus, gamma=K, max_new_tokens=NEW, temperature=temperature,
                key=jax.random.key(key))


@pytest.fixture(scope="module")
def greedy_ar(grammar_models):
  return [decode(m, PROMPTS, LENGTHS, max_new_tokens=NEW, temperature=0.0).to_lists()
          for m in grammar_models]


@pytest.mark.parametrize("bonus", [False, True])
def test_greedy_cosd_reduces_to_one_model(grammar_models, greedy_ar, bonus):
  draft, assistant = grammar_models
  same = run(draft, draft, per_row(RULE, ALWAYS), bonus)
  assert same.to_lists() == greedy_ar[0]  # same model: the candidates always agree
  # the assistant only adds bonus tokens: one per full window (the last one is cut at NEW)
  assert int(same.stats.accepted[1]) == (len(PROMPTS) * (NEW // (K + 1)) if bonus else 0)
  out = run(assistant, draft, per_row(NEVER, ALWAYS), bonus)
  lists = out.to_lists()
  for b in range(len(PROMPTS)):
    if b % 2:
      assert lists[b] == greedy_ar[1][b], (b, "always replace -> the assistant's greedy output")
    elif not bonus:  # (a bonus token is the assistant's, so never-replace differs with bonus)
      assert lists[b] == greedy_ar[0][b], (b, "never replace -> the draft's greedy output")
  assert out.finish_reasons() == ["length"] * len(PROMPTS)
  assert greedy_ar[0] != greedy_ar[1]  # the models genuinely differ


@pytest.mark.parametrize("bonus", [False, True])
def test_greedy_cosd_matches_the_reference_row_by_row(grammar_models, bonus):
  draft, assistant = grammar_models
  out = run(assistant, draft, per_row(RULE), bonus)
  got = out.to_lists()
  replaced = []
  for b in range(len(PROMPTS)):
    want, r = reference_cosd(draft, assistant, PROMPTS[b, :LENGTHS[b]].tolist(), **RULE,
                             bonus=bonus)
    assert got[b] == want, b
    replaced.append(r)
  # replacements happen in some rows and not in others: per-row replacement points
  assert 0 < sum(r > 0 for r in replaced) < len(PROMPTS)
  st = out.stats
  assert int(st.accepted.sum()) == int(out.lengths.sum()) == NEW * len(PROMPTS)
  assert int(st.rejections) == sum(replaced)  # windows with a replacement
  if not bonus:  # then every assistant token is a replacement
    assert int(st.accepted[1]) == sum(replaced)
  assert int(st.model_calls[0]) == K * int(st.steps)  # K draft passes per window
  assert int(st.model_calls[1]) == int(st.steps)  # one assistant pass per window


def test_sampled_cosd_is_valid_and_keyed(grammar_models):
  draft, assistant = grammar_models
  a = run(assistant, draft, per_row(RULE), False, temperature=1.0, key=1)
  b = run(assistant, draft, per_row(RULE), False, temperature=1.0, key=1)
  c = run(assistant, draft, per_row(RULE), False, temperature=1.0, key=2)
  chex.assert_trees_all_equal(a.tokens, b.tokens)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  toks = np.asarray(a.tokens)
  assert toks.min() >= 0 and toks.max() < draft.config.vocab_size
  assert int(a.stats.accepted.sum()) == int(a.lengths.sum())
  # tokens stay in each prompt's region (both models learned that much)
  region = PROMPTS[:, 0] // REGION
  assert np.mean(toks // REGION == region[:, None]) > 0.9


def test_cross_tokenizer_mode_refuses_a_lossy_tokenizer(grammar_models, grammar_model_dirs):
  """Cross-tokenizer mode aligns the two models by byte offsets of the text, so it needs
  tokenizers whose tokens spell the text; the word-level one (spaces dropped) is refused
  clearly, before any model runs."""
  from jax_specens.checkpoint import load_tokenizer
  from jax_specens.fusion import cosd_text
  draft, assistant = grammar_models
  tok = load_tokenizer(grammar_model_dirs[0])
  prompts = [" ".join(f"t{x}" for x in row[:n]) for row, n in zip(PROMPTS, LENGTHS)]
  with pytest.raises(ValueError, match="do not spell the text.*lossless tokenizer"):
    cosd_text(draft, assistant, tok, tok, prompts, max_new_tokens=NEW, window=K,
              temperature=0.0, **RULE)


def test_cosd_bad_arguments_fail_before_tracing(grammar_models, tmp_path):
  draft, assistant = grammar_models
  call = lambda **kw: decode(assistant, PROMPTS, LENGTHS, method="cosd", max_new_tokens=4, **kw)
  with pytest.raises(ValueError, match="needs a draft model"):
    call()
  with pytest.raises(ValueError, match="unknown verifier 'oracle'.*rule, tree, learned"):
    call(draft=draft, verifier="oracle")
  with pytest.raises(ValueError, match="needs a trained checkpoint"):
    call(draft=draft, verifier="learned")
  with pytest.raises(FileNotFoundError, match="no fusion head checkpoint"):
    call(draft=draft, verifier="learned", verifier_path=tmp_path)
  with pytest.raises(ValueError, match="alpha"):
    call(draft=draft, alpha=-1.0)
  with pytest.raises(ValueError, match="bonus must be True or False"):
    call(draft=draft, bonus="yes")
  with pytest.raises(ValueError, match="unknown options for method 'cosd': \\['window'\\]"):
    call(draft=draft, window=3)
