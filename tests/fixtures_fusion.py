"""Session fixtures for the CoSD / fusion tests: two tiny models that genuinely differ.

Vocabulary of 48 tokens in three regions of 16; a sequence stays in its region and each next token
follows a per-region successor table with some probability, else is uniform in the region:

  region   reference corpus      draft trained on         assistant trained on
  A 0-15   f_A w.p. 0.9          f_A w.p. 0.9 (knows)     uniform (clueless)
  B 16-31  f_B w.p. 0.9          uniform (clueless)       f_B w.p. 0.9 (knows)
  C 32-47  f_C w.p. 0.9          f_C w.p. 0.4 (unsure,    g_C w.p. 0.9 (confident
                                 but right)               and wrong)

So the right keep/replace decision depends on more than the CoSD rule (docs/algorithms.md §4) sees: in region C the rule
replaces the draft's correct but unconfident token by the assistant's confident wrong one.
Both models are 1-layer Llamas trained a few hundred AdamW steps with teacher forcing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_specens.cache import init_cache
from jax_specens.models.config import ModelConfig
from jax_specens.models.model import create_model
from jax_specens.step import forward

VOCAB = 48
REGION = 16
SEQ = 16
_perm = np.random.default_rng(7)
SUCC = {name: _perm.permutation(REGION) for name in ("f_A", "f_B", "f_C", "g_C")}

# region -> (successor table or None for uniform, probability of following it)
DRAFT_GRAMMAR = {0: ("f_A", 0.9), 1: (None, 0.0), 2: ("f_C", 0.4)}
ASSIST_GRAMMAR = {0: (None, 0.0), 1: ("f_B", 0.9), 2: ("g_C", 0.9)}
REFERENCE_GRAMMAR = {0: ("f_A", 0.9), 1: ("f_B", 0.9), 2: ("f_C", 0.9)}


def sample_sequences(grammar: dict, n: int, length: int, seed: int) -> np.ndarray:
  """n sequences (row i in region i % 3) of `length` tokens drawn from `grammar`."""
  rng = np.random.default_rng(seed)
  region = np.arange(n) % 3
  t = rng.integers(REGION, size=n)
  out = np.zeros((n, length), np.int32)
  for j in range(length):
    out[:, j] = region * REGION + t
    nxt = rng.integers(REGION, size=n)
    for r, (table, p) in grammar.items():
      if table is not None:
        follow = (region == r) & (rng.random(n) < p)
        nxt = np.where(follow, SUCC[table][t], nxt)
    t = nxt
  return out


def tiny_config(vocab: int = VOCAB, **kw) -> ModelConfig:
  base = dict(family="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
              num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
              max_position_embeddings=256, eos_token_ids=())
  base.update(kw)
  return ModelConfig(**base)


_LM_TX = optax.adamw(2e-2, weight_decay=0.0)


@jax.jit
def _lm_step(model, opt_state, tokens):
  def loss_fn(params):
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1])
    logits, _ = forward(model.replace(params=params), cache, tokens,
                        jnp.zeros((tokens.shape[0],), jnp.int32))
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  loss, g = jax.value_and_grad(loss_fn)(model.params)
  updates, opt_state = _LM_TX.update(g, opt_state, model.params)
  return model.replace(params=optax.apply_updates(model.params, updates)), opt_state, loss


def train_lm(config: ModelConfig, data: np.ndarray, steps: int, seed: int):
  """Teacher-forced next-token training of a tiny model (AdamW, lr 2e-2, batch 48)."""
  model = create_model(config, seed=seed)
  opt_state = _LM_TX.init(model.params)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    model, opt_state, _ = _lm_step(model, opt_state, data[rng.integers(0, len(data), 48)])
  return model


@pytest.fixture(scope="session")
def grammar_models():
  """(draft, assistant): models trained on the draft and assistant grammars above."""
  cfg = tiny_config()
  draft = train_lm(cfg, sample_sequences(DRAFT_GRAMMAR, 1200, SEQ, seed=1), 120, seed=1)
  assistant = train_lm(cfg, sample_sequences(ASSIST_GRAMMAR, 1200, SEQ, seed=2), 120, seed=2)
  return draft, assistant


@pytest.fixture(scope="session")
def reference_corpus():
  """(fit, held_out) reference sequences of the mixed grammar; disjoint seeds."""
  return (sample_sequences(REFERENCE_GRAMMAR, 240, 33, seed=11),
          sample_sequences(REFERENCE_GRAMMAR, 120, 33, seed=12))


@pytest.fixture(scope="session")
def fusion_harvests(grammar_models, reference_corpus):
  """(fit, held_out) teacher-forced harvests of (draft, assistant) over the reference corpus."""
  from jax_specens.fusion import harvest_tokens
  fit, held_out = reference_corpus
  return tuple(harvest_tokens(grammar_models, seqs, seq_len=33, batch_size=64, progress=False)
               for seqs in (fit, held_out))


def save_word_tokenizer(directory, words) -> None:
  """A word-level tokenizer (id i <-> words[i], split on whitespace): tokenizer.json + config."""
  import json
  from pathlib import Path

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast"}))  # no special tokens: decode keeps all


def grammar_text(sequences: np.ndarray) -> str:
  """Grammar sequences as text documents ("t3 t7 ..."), separated by blank lines."""
  return "\n\n".join(" ".join(f"t{t}" for t in row) for row in sequences)


@pytest.fixture(scope="session")
def grammar_model_dirs(grammar_models, tmp_path_factory):
  """(draft_dir, assistant_dir, corpus_file): the grammar models saved with a word tokenizer."""
  from jax_specens.checkpoint import save_model
  root = tmp_path_factory.mktemp("grammar")
  save_word_tokenizer(root / "tok", [f"t{i}" for i in range(VOCAB)])
  dirs = [save_model(m, root / name, tokenizer_dir=root / "tok")
          for m, name in zip(grammar_models, ("draft", "assistant"))]
  corpus = root / "corpus.txt"
  corpus.write_text(grammar_text(sample_sequences(REFERENCE_GRAMMAR, 150, 33, seed=13)))
  return dirs[0], dirs[1], corpus
