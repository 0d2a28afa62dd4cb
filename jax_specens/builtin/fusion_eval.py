"""Teacher-forced comparison of single models, ensembles and CoSD on held-out text (eval-fusion).

At every position of held-out windows each method gives a next-token distribution and a predicted
token; we report accuracy (prediction == reference) and perplexity (exp mean NLL of the reference):

- `code`, `prose`, `draft`: each built-in model alone;
- `ensemble wprob` / `ensemble wlogit`: the two specialists, uniform weights, through
  `jax_specens.ensemble_fns` (at temperature 1); `ensemble learned`: weighted probabilities with
  per-position weights from a fusion head of kind "weights" (docs/algorithms.md §5);
- `cosd rule` / `cosd tree` / `cosd learned`: CoSD with the code specialist as draft and the prose
  specialist as assistant (docs/algorithms.md §4): where the verifier replaces (and the candidates differ) the
  assistant's argmax and distribution are used, else the draft's.

The tree, the learned verifier head and the weights head are trained with
`jax_specens.fusion.pipeline.train_fusion` (what `jax-specens train-fusion` runs) on the separate
`fusion` split of both domains; everything is scored on the `test` split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jax_specens import fusion
from jax_specens.builtin import data, evaluate
from jax_specens.builtin import tokenizer as tokenizer_lib
from jax_specens.ensemble_fns import make_ensemble
from jax_specens.fusion.learned import LearnedEnsemble, learned_ensemble
from jax_specens.fusion.pipeline import FusionRecipe, train_fusion
from jax_specens.fusion.train import TrainConfig
from jax_specens.sampling import SamplingParams
from jax_specens.models.model import Model

SINGLE = ("code", "prose", "draft")
ENSEMBLES = ("ensemble wprob", "ensemble wlogit", "ensemble learned")
COSD = ("cosd rule", "cosd tree", "cosd learned")
METHODS = SINGLE + ENSEMBLES + COSD
GROUPS = data.DOMAINS + ("mixed",)


@dataclasses.dataclass(frozen=True)
class Settings:
  """seq_len: window length; test/fusion_windows: windows per domain scored / harvested."""

  seq_len: int = 256
  test_windows: int = 48
  fusion_windows: int = 48
  batch_size: int = 8
  head_steps: int = 300
  progress: bool = True


def domain_tokens(tokenizer, split: str, max_tokens: int | None = None
                  ) -> dict[str, np.ndarray]:
  """Each domain's documents of `split` (in key order) as one token stream, each document
  followed by EOS; only as many documents as it takes to reach `max_tokens` are encoded."""
  backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
  out = {}
  for domain in data.DOMAINS:
    parts, total = [], 0
    for doc in data.documents(domain, split):
      parts.append(tokenizer_lib.encode_documents(backend, [doc.text]))
      total += len(parts[-1])
      if max_tokens is not None and total >= max_tokens:
        break
    out[domain] = np.concatenate(parts)
  return out


def train_fusers(models: dict[str, Model], streams: dict[str, np.ndarray], settings: Settings,
                 out_dir) -> tuple[dict, LearnedEnsemble, dict]:
  """Trains the tree, the verifier head and the weights head for (draft code, assistant prose)
  on `streams` with `jax_specens.fusion.pipeline.train_fusion`, written to `out_dir`.

  Returns (verifiers by name, the learned ensemble function, the training metrics).
  """
  sequences = [w for d in data.DOMAINS
               for w in evaluate.windows(streams[d], settings.seq_len, settings.fusion_windows)]
  recipe = FusionRecipe(seq_len=settings.seq_len + 1, batch_size=settings.batch_size,
                        train=TrainConfig(max_steps=settings.head_steps))
  metrics = train_fusion((models["code"], models["prose"]), sequences, out_dir, recipe,
                         overwrite=True, progress=settings.progress)
  verifiers = {"rule": fusion.load_verifier("rule"),
               "tree": fusion.load_verifier("tree", Path(out_dir) / "tree.json"),
               "learned": fusion.load_verifier("learned", out_dir)}
  return verifiers, learned_ensemble(out_dir), metrics


def score_batch(models: tuple[Model, Model, Model], verifiers: dict, learned: LearnedEnsemble,
                tokens: Int[Array, "B T1"]) -> tuple[Float[Array, "B T M"], Bool[Array, "B T M"]]:
  """NLL of the reference and whether the argmax is the reference, per method (METHODS order).

  models: (code, prose, draft). tokens: windows whose last T tokens are the references. Each
  model's forward pass is compiled once per shape, whatever the verifiers.
  """
  logits = [evaluate.teacher_forced_logits(m, tokens[:, :-1]) for m in models]
  return fuse(jnp.stack(logits), tokens[:, 1:], verifiers, learned)


@jax.jit
def fuse(logits: Float[Array, "3 B T V"], ref: Int[Array, "B T"], verifiers: dict,
         learned: LearnedEnsemble) -> tuple[Float[Array, "B T M"], Bool[Array, "B T M"]]:
  """Every method's NLL of `ref` and hit, from the (code, prose, draft) logits."""
  b = ref.shape[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  dists = [logp[0], logp[1], logp[2]]
  pair = logits[:2]
  params = SamplingParams.make(b, 1.0)
  for kind in ("wprob", "wlogit", learned):
    dists.append(make_ensemble(kind, 2).combine(pair, params))
  cands = [jnp.argmax(pair[0], -1), jnp.argmax(pair[1], -1)]
  feats = fusion.position_features([pair[0], pair[1]], cands)
  preds = [jnp.argmax(d, -1) for d in dists]
  for name in ("rule", "tree", "learned"):
    replace = verifiers[name](feats) & (cands[0] != cands[1])
    dists.append(jnp.where(replace[..., None], logp[1], logp[0]))
    preds.append(jnp.where(replace, cands[1], cands[0]))
  nll = jnp.stack([-jnp.take_along_axis(d, ref[..., None], -1)[..., 0] for d in dists], -1)
  correct = jnp.stack([p == ref for p in preds], -1)
  return nll, correct


def evaluate_methods(models: dict[str, Model], verifiers: dict, learned: LearnedEnsemble,
                     streams: dict[str, np.ndarray], settings: Settings) -> dict:
  """{group: {method: {"accuracy", "perplexity", "nll"}}, "positions": {group: n}}."""
  ordered = tuple(models[n] for n in SINGLE)
  sums = {}
  for domain in data.DOMAINS:
    wins = evaluate.windows(streams[domain], settings.seq_len, settings.test_windows)
    nll_sum, hit_sum, count = np.zeros(len(METHODS)), np.zeros(len(METHODS)), 0
    for chunk, real in evaluate.padded_chunks(wins, settings.batch_size):
      nll, hit = jax.device_get(score_batch(ordered, verifiers, learned, jnp.asarray(chunk)))
      nll_sum += nll[:real].reshape(-1, len(METHODS)).sum(0)
      hit_sum += hit[:real].reshape(-1, len(METHODS)).sum(0)
      count += real * settings.seq_len
    sums[domain] = (nll_sum, hit_sum, count)
  sums["mixed"] = tuple(sum(sums[d][i] for d in data.DOMAINS) for i in range(3))
  table = {}
  for group, (nll_sum, hit_sum, count) in sums.items():
    table[group] = {m: {"nll": float(nll_sum[i] / count), "perplexity": float(np.exp(nll_sum[i] /
                                                                                     count)),
                        "accuracy": float(hit_sum[i] / count)} for i, m in enumerate(METHODS)}
  table["positions"] = {g: int(sums[g][2]) for g in sums}
  return table


def markdown_table(table: dict, methods: Sequence[str] = METHODS) -> str:
  """Perplexity and accuracy per method (rows) and group (columns); the best of each in bold."""
  head = "| method | " + " | ".join(f"{g} ppl | {g} acc" for g in GROUPS) + " |"
  lines = [head, "|" + "---|" * (1 + 2 * len(GROUPS))]
  best = {g: (min(table[g][m]["perplexity"] for m in methods),
              max(table[g][m]["accuracy"] for m in methods)) for g in GROUPS}
  for m in methods:
    cells = []
    for g in GROUPS:
      ppl, acc = table[g][m]["perplexity"], table[g][m]["accuracy"]
      cells.append(f"**{ppl:.1f}**" if ppl == best[g][0] else f"{ppl:.1f}")
      cells.append(f"**{acc:.3f}**" if acc == best[g][1] else f"{acc:.3f}")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(table: dict, path) -> None:
  """Grouped bars of perplexity and accuracy per method and group, saved as a PNG."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise ImportError("the eval-fusion plot needs matplotlib: pip install 'jax_specens[plot]' "
                      "(or pass --no-plot)") from e
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  x = np.arange(len(METHODS))
  width = 0.8 / len(GROUPS)
  for ax, key, label in ((axes[0], "perplexity", "perplexity (lower is better)"),
                         (axes[1], "accuracy", "next-token accuracy (higher is better)")):
    for i, g in enumerate(GROUPS):
      ax.bar(x + (i - (len(GROUPS) - 1) / 2) * width, [table[g][m][key] for m in METHODS], width,
             label=g)
    ax.set_xticks(x, METHODS, rotation=35, ha="right")
    ax.set_title(label)
    if key == "perplexity":
      ax.set_yscale("log")
  axes[0].legend(title="held-out text")
  fig.suptitle("Built-in models on held-out standard-library text (teacher-forced)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
