"""Teacher-forced harvesting for cross-tokenizer CoSD (docs/algorithms.md §4): two models with
different tokenizers read the same reference text, aligned by byte offsets.

Each reference text is tokenized by both tokenizers (`TokenText`, as `cosd_text` tokenizes a
prompt) and each model reads its own tokenization in one forward pass. Draft token j is
*verifiable* where its start offset is a character boundary and the start of assistant token i
(`aligned_positions`), as at decode time. There, as `cosd_text` computes them:

    x~    the draft's top token after tokens < j         (its logits at j - 1)
    x^    the assistant's top token after tokens < i     (its logits at i - 1)
    x^ in the draft's vocabulary   `cross_rows.carry`: the draft's first token of x^'s text
    x~ in the assistant's vocabulary   the assistant's token i when x~'s text continues the
          reference (what decoding sees when the draft writes the reference), else `carry` of x~
    agree   x^ is x~ in the assistant's vocabulary

and the features are `model_features` of each model joined by `assemble_features` (the functions
the decoding loop uses). Labels: 0 keep (x~ is the reference's draft token j), 1 replace (x^ is
the reference's assistant token i and x~ is not), -1 neither. `ref_logprobs` holds
log p_d(reference token j) and log p_a(reference token i).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jax_specens.fusion.cross_rows import Side, carry
from jax_specens.fusion.cross_steps import bucket
from jax_specens.fusion.features import assemble_features, model_features
from jax_specens.fusion.harvest import IGNORE, Harvest
from jax_specens.fusion.token_text import TokenText, is_char_boundary
from jax_specens.models.model import Model
from jax_specens.step import forward
from jax_specens.text import pad


@dataclasses.dataclass(frozen=True)
class CrossHarvest:
  """`harvest` (features, labels, ref_logprobs, docs) at every verifiable position `[N]`, and per
  position: `offset` (byte offset of draft token j in its document), `draft_ok` / `assistant_ok`
  (x~ / x^ is the reference's token), `replaceable` (x^ can be carried into the draft's
  vocabulary and the candidates differ: where decoding may replace)."""

  harvest: Harvest
  offset: np.ndarray
  draft_ok: np.ndarray
  assistant_ok: np.ndarray
  replaceable: np.ndarray

  def __len__(self) -> int:
    return len(self.harvest)

  def take(self, index) -> "CrossHarvest":
    return CrossHarvest(self.harvest.take(index), *(getattr(self, f.name)[index] for f in
                                                    dataclasses.fields(self)[1:]))

  def choose(self, verifier) -> tuple[np.ndarray, np.ndarray]:
    """The fused choice at every position: (correct [N], replaced [N]) where CoSD with
    `verifier` takes x^ iff it marks a replaceable position, else x~."""
    marks = np.asarray(verifier(jnp.asarray(self.harvest.features))) & self.replaceable
    return np.where(marks, self.assistant_ok, self.draft_ok), marks


def aligned_positions(d: TokenText, a: TokenText, scored_from: int = 0) -> list[tuple[int, int]]:
  """(j, i) for each draft token j >= 1 with text that starts at a character boundary at or
  after byte `scored_from`, where assistant token i >= 1 starts too (`cosd_text`'s verifiable
  positions; both models then have a prediction for it)."""
  out = []
  for j in range(1, len(d.ids)):
    at = d.start(j)
    if at < scored_from or not d.table[d.ids[j]] or not is_char_boundary(d.text, at):
      continue
    i = a.index_at(at)
    if i is not None and i >= 1:
      out.append((j, i))
  return out


def segments(text: str, max_bytes: int) -> list[tuple[str, int]]:
  """`text` cut at line ends into pieces of at most `max_bytes` UTF-8 bytes (a longer line is
  cut at a space, else at a character): [(piece, its byte offset in text)]."""
  out, start, piece = [], 0, b""
  for line in text.encode().splitlines(keepends=True):
    while len(line) > max_bytes:  # cut a long line at its last space before max_bytes
      cut = line.rfind(b" ", 1, max_bytes) + 1 or max_bytes
      while not is_char_boundary(line, cut):
        cut -= 1
      line_head, line = line[:cut], line[cut:]
      if piece:
        out.append((piece, start))
        start, piece = start + len(piece), b""
      out.append((line_head, start))
      start += len(line_head)
    if len(piece) + len(line) > max_bytes:
      out.append((piece, start))
      start, piece = start + len(piece), b""
    piece += line
  if piece:
    out.append((piece, start))
  return [(p.decode(), s) for p, s in out if p.strip()]


@jax.jit
def _pass(model: Model, tokens: Int[Array, "B W"]) -> tuple[Float[Array, "B W V"], Int[Array, "B W"]]:
  """Logits after every token of each row and their argmax (one forward pass from position 0)."""
  b, w = tokens.shape
  logits, _ = forward(model, model.init_cache(b, w), tokens,
                      jnp.zeros((b,), jnp.int32))
  return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.jit
def _part(logits: Float[Array, "B W V"], own: Int[Array, "B W"], other: Int[Array, "B W"],
          ref: Int[Array, "B W"]):
  """One model's features at every position, candidates (own, other), plus log p(ref)."""
  probs, entropy, margin = model_features(logits, [own, other, ref])
  return probs[..., :2], entropy, margin, jnp.log(jnp.maximum(probs[..., 2], 1e-30))


def _batch(seqs: list[TokenText]) -> Int[Array, "B W"]:
  """Token ids right-padded to a bucketed width (a power of two, at least 64)."""
  rows = [s.ids for s in seqs]
  return jnp.asarray(pad(rows, bucket(max(len(r) for r in rows), 64))[0])


def _groups(lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
  """Consecutive [lo, hi) groups whose padded size (rows x bucketed width) fits `batch_tokens`
  (a longer sequence gets a group of its own)."""
  out, lo = [], 0
  for hi in range(1, len(lengths) + 1):
    if hi == len(lengths) or (hi + 1 - lo) * bucket(max(lengths[lo:hi + 1]), 64) > batch_tokens:
      out.append((lo, hi))
      lo = hi
  return out


def harvest_cross(
    draft: Model, assistant: Model, draft_tokenizer, assistant_tokenizer, texts: Sequence[str], *,
    scored_from: Sequence[int] | None = None, draft_ids: Sequence[Sequence[int]] | None = None,
    max_bytes: int = 600, batch_tokens: int = 512, progress: bool = True,
) -> CrossHarvest:
  """Harvests the verifiable positions of `texts` (one document each; positions before byte
  `scored_from[k]` of text k are context only). Documents longer than `max_bytes` are read in
  pieces cut at line ends (`segments`), each tokenized and read on its own; pieces of similar
  length share a forward pass of about `batch_tokens` (padded) tokens. `draft_ids[k]`: the
  draft's own ids spelling text k (e.g. the tokens it wrote) instead of its tokenizer's; such a
  text is read whole."""
  if not texts or not any(t.strip() for t in texts):
    raise ValueError("the corpus is empty: pass non-empty texts (--data FILE)")
  if max_bytes < 16 or batch_tokens < 64:
    raise ValueError(f"max_bytes must be >= 16 and batch_tokens >= 64; got {max_bytes}, "
                     f"{batch_tokens}")
  d_side = Side(draft, draft_tokenizer, "draft")
  a_side = Side(assistant, assistant_tokenizer, "assistant")
  scored_from = [0] * len(texts) if scored_from is None else list(scored_from)
  for name, per_text in (("scored_from", scored_from), ("draft_ids", draft_ids)):
    if per_text is not None and len(per_text) != len(texts):
      raise ValueError(f"{name} needs one entry per text: got {len(per_text)} for "
                       f"{len(texts)} texts")
  cut = (lambda text: [(text, 0)]) if draft_ids is not None else (
      lambda text: segments(text, max_bytes))
  pieces = [(doc, seg, start, scored_from[doc] - start)
            for doc, text in enumerate(texts) for seg, start in cut(text)]
  pieces.sort(key=lambda p: len(p[1].encode()))  # similar lengths share a batch (less padding)
  own = lambda doc, seg: (TokenText.encode(draft_tokenizer, seg) if draft_ids is None else
                          TokenText(draft_tokenizer, d_side.table, draft_ids[doc], seg.encode()))
  seqs = [(own(doc, seg), TokenText.encode(assistant_tokenizer, seg))
          for doc, seg, _, _ in pieces]
  parts = []
  for lo, hi in tqdm(_groups([max(len(d.ids), len(a.ids)) for d, a in seqs], batch_tokens),
                     desc="cross harvest", unit="batch", disable=not progress):
    batch = pieces[lo:hi]
    d_seq, a_seq = [s[0] for s in seqs[lo:hi]], [s[1] for s in seqs[lo:hi]]
    d_logits, x_d = _pass(draft, _batch(d_seq))
    a_logits, x_a = _pass(assistant, _batch(a_seq))
    parts.append(_harvest_batch(batch, d_seq, a_seq, d_logits, np.asarray(x_d), a_logits,
                                np.asarray(x_a), d_side, a_side))
  parts = [p for p in parts if p is not None]
  if not parts:
    raise ValueError("no verifiable positions in the corpus (no draft token starts where an "
                     "assistant token starts); pass longer texts")
  fields = [f.name for f in dataclasses.fields(CrossHarvest)[1:]]
  return CrossHarvest(Harvest.concat([p.harvest for p in parts]),
                      *(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _harvest_batch(batch, d_seq, a_seq, d_logits, x_d, a_logits, x_a, d_side: Side,
                   a_side: Side) -> CrossHarvest | None:
  """Host alignment and translation of one batch, then each model's features on device."""
  shape_d, shape_a = x_d.shape, x_a.shape
  c = {k: np.zeros(shape_d, np.int32) for k in ("xd", "xa_d", "ref_d")}
  c |= {k: np.zeros(shape_a, np.int32) for k in ("xa", "xd_a", "ref_a")}
  rows, meta = [], []
  for r, ((doc, _, start, scored), d, a) in enumerate(zip(batch, d_seq, a_seq)):
    for j, i in aligned_positions(d, a, max(scored, 0)):
      xd, xa = int(x_d[r, j - 1]), int(x_a[r, i - 1])
      d_ok = xd == d.ids[j]
      on_path = bool(d_side.table[xd]) and d.text.startswith(d_side.table[xd], d.start(j))
      xd_a = a.ids[i] if on_path else carry(d_side, a_side, xd)
      xa_d = carry(a_side, d_side, xa)
      agree = xd_a is not None and xa == xd_a
      c["xd"][r, j - 1], c["xa_d"][r, j - 1], c["ref_d"][r, j - 1] = xd, xa_d or 0, d.ids[j]
      c["xa"][r, i - 1], c["xd_a"][r, i - 1], c["ref_a"][r, i - 1] = xa, xd_a or 0, a.ids[i]
      rows.append((r, j - 1, i - 1))
      meta.append((doc, start + d.start(j), d_ok, xa == a.ids[i], xa_d is not None and not agree,
                   agree))
  if not rows:
    return None
  pd, ed, md, lpd = jax.device_get(_part(d_logits, *(jnp.asarray(c[k]) for k in
                                                      ("xd", "xa_d", "ref_d"))))
  pa, ea, ma, lpa = jax.device_get(_part(a_logits, *(jnp.asarray(c[k]) for k in
                                                      ("xd_a", "xa", "ref_a"))))
  r, jd, ia = (np.asarray(x) for x in zip(*rows))
  doc, offset, d_ok, a_ok, replaceable, agree = (np.asarray(x) for x in zip(*meta))
  feats = np.asarray(assemble_features([(pd[r, jd], ed[r, jd], md[r, jd]),
                                        (pa[r, ia], ea[r, ia], ma[r, ia])], agree))
  labels = np.where(d_ok, 0, np.where(a_ok, 1, IGNORE)).astype(np.int8)
  ref_lp = np.stack([lpd[r, jd], lpa[r, ia]], -1).astype(np.float32)
  return CrossHarvest(Harvest(feats.astype(np.float32), labels, ref_lp, doc.astype(np.int32)),
                      offset.astype(np.int64), d_ok, a_ok, replaceable)
