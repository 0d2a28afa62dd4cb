"""Teacher-forced harvesting of fusion features and labels over a corpus (docs/algorithms.md §4-5).

Every model reads the same reference windows in one forward pass each; at every position t the
features compare the models' next-token distributions with their argmax candidates, and the labels
say which candidate the reference agrees with:

    label 1 "replace"  the assistant's (model 1) top token is the reference and the draft's is not
    label 0 "keep"     the draft's (model 0) top token is the reference
    label -1           neither matches (left out of verifier training, docs/algorithms.md §4)

`ref_logprobs[:, k]` is log p_k(reference token): what the ensemble-weights head is trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jax_specens.fusion import features as F
from jax_specens.models.model import Model
from jax_specens.step import forward

IGNORE = -1


@dataclasses.dataclass(frozen=True)
class Harvest:
  """features [N, F] float32, labels [N] int8 (1 replace, 0 keep, -1 neither), ref_logprobs
  [N, n], docs [N] int32 (the document each position comes from: splits keep documents whole)."""

  features: np.ndarray
  labels: np.ndarray
  ref_logprobs: np.ndarray
  docs: np.ndarray | None = None  # None: one document

  def __post_init__(self):
    if self.docs is None:
      object.__setattr__(self, "docs", np.zeros(self.labels.shape, np.int32))

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def labelled(self) -> "Harvest":
    """Only the positions with a keep/replace label."""
    return self.take(self.labels != IGNORE)

  def take(self, index) -> "Harvest":
    return Harvest(self.features[index], self.labels[index], self.ref_logprobs[index],
                   self.docs[index])

  def split(self, eval_fraction: float, seed: int = 0) -> tuple["Harvest", "Harvest"]:
    """A seeded random (train, eval) split by document: every position of a document lands on
    the same side (neighbouring positions of one text would otherwise leak across)."""
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    docs = np.unique(self.docs)
    if len(docs) < 2:
      raise ValueError(f"splitting by document needs at least 2 documents; the harvest has "
                       f"{len(docs)}. Pass more texts (each blank-line separated paragraph of "
                       "--data is one document)")
    perm = np.random.default_rng(seed).permutation(docs)
    n_eval = min(len(docs) - 1, max(1, int(round(len(docs) * eval_fraction))))
    held = np.isin(self.docs, perm[:n_eval])
    return self.take(~held), self.take(held)

  @staticmethod
  def concat(parts: Sequence["Harvest"]) -> "Harvest":
    return Harvest(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(Harvest)))


def windows(sequences: Iterable[Sequence[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts token sequences into right-padded windows `[N, seq_len]` with lengths `[N]`.

  Consecutive windows of one sequence overlap by one token, so every next-token pair of every
  sequence is scored exactly once. Sequences shorter than 2 tokens contribute nothing.
  """
  tokens, lengths, _ = windows_by_document(sequences, seq_len)
  return tokens, lengths


def windows_by_document(sequences: Iterable[Sequence[int]], seq_len: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`windows`, plus the index of the sequence (document) each window comes from `[N]`."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2; got {seq_len}")
  rows, lengths, docs = [], [], []
  for doc, seq in enumerate(sequences):
    seq = np.asarray(seq, np.int32).reshape(-1)
    for start in range(0, max(len(seq) - 1, 0), seq_len - 1):
      chunk = seq[start:start + seq_len]
      rows.append(np.pad(chunk, (0, seq_len - len(chunk))))
      lengths.append(len(chunk))
      docs.append(doc)
  if not rows:
    return np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.int32)
  return np.stack(rows), np.asarray(lengths, np.int32), np.asarray(docs, np.int32)


@jax.jit
def harvest_batch(
    models: tuple[Model, ...], tokens: Int[Array, "B L"], lengths: Int[Array, "B"]
) -> tuple[Float[Array, "B L-1 F"], Int[Array, "B L-1"], Float[Array, "B L-1 n"],
           Int[Array, "B L-1"]]:
  """Features, labels, reference log-probs and a validity mask at positions 0..L-2 of each row."""
  b, length = tokens.shape
  logits = []
  for m in models:
    cache = m.init_cache(b, length)
    out, _ = forward(m, cache, tokens, jnp.zeros((b,), jnp.int32))
    logits.append(out[:, :-1])
  ref = tokens[:, 1:]
  cands = [jnp.argmax(l, axis=-1) for l in logits]
  feats = F.position_features(logits, cands)
  hit_d, hit_a = cands[0] == ref, cands[1] == ref
  labels = jnp.where(hit_d, 0, jnp.where(hit_a, 1, IGNORE))
  ref_logp = jnp.stack([jnp.take_along_axis(jax.nn.log_softmax(l), ref[..., None], -1)[..., 0]
                        for l in logits], axis=-1)
  valid = jnp.arange(length - 1)[None, :] < (lengths[:, None] - 1)
  return feats, labels, ref_logp, valid


def harvest_tokens(
    models: Sequence[Model], sequences: Iterable[Sequence[int]], *, seq_len: int = 128,
    batch_size: int = 16, progress: bool = True,
) -> Harvest:
  """Harvests over token-id sequences (all models must share one vocabulary).

  models[0] is the draft and models[1] the assistant for the keep/replace labels. Windows are
  scored `batch_size` at a time through one compiled program (the last batch is padded).
  """
  models = tuple(models)
  _check_models(models)
  tokens, lengths, docs = windows_by_document(sequences, seq_len)
  if tokens.shape[0] == 0:
    raise ValueError("the corpus is empty: no sequence has 2 or more tokens; pass non-empty text "
                     "files (--data FILE) or token sequences")
  vocab = models[0].config.vocab_size
  if tokens.max() >= vocab or tokens.min() < 0:
    raise ValueError(f"corpus token ids must be in [0, {vocab}); got ids in "
                     f"[{tokens.min()}, {tokens.max()}] — was it tokenized with another tokenizer?")
  pad = -tokens.shape[0] % batch_size
  tokens = np.concatenate([tokens, np.zeros((pad, seq_len), np.int32)])
  lengths = np.concatenate([lengths, np.zeros((pad,), np.int32)])
  docs = np.concatenate([docs, np.zeros((pad,), np.int32)])
  parts = []
  for i in tqdm(range(0, tokens.shape[0], batch_size), desc="harvest", unit="batch",
                disable=not progress):
    feats, labels, ref_logp, valid = jax.device_get(
        harvest_batch(models, tokens[i:i + batch_size], lengths[i:i + batch_size]))
    doc = np.broadcast_to(docs[i:i + batch_size, None], valid.shape)
    parts.append(Harvest(feats[valid].astype(np.float32), labels[valid].astype(np.int8),
                         ref_logp[valid].astype(np.float32), doc[valid].astype(np.int32)))
  return Harvest.concat(parts)


def harvest_texts(
    models: Sequence[Model], tokenizer, texts: Iterable[str], **kwargs
) -> Harvest:
  """Tokenizes `texts` with the models' shared (Hugging Face) tokenizer, then `harvest_tokens`."""
  texts = [t for t in texts if t and t.strip()]
  if not texts:
    raise ValueError("the corpus is empty: every text is empty; pass non-empty text files "
                     "(--data FILE)")
  sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  return harvest_tokens(models, sequences, **kwargs)


def _check_models(models: tuple[Model, ...]) -> None:
  if len(models) < 2:
    raise ValueError(f"harvesting needs at least 2 models (draft, assistant); got {len(models)}")
  vocabs = [m.config.vocab_size for m in models]
  if len(set(vocabs)) != 1:
    raise ValueError(f"the models have different vocabulary sizes {vocabs}; teacher-forced "
                     "harvesting needs one shared tokenizer")
