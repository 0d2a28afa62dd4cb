"""End to end fusion training (what `jax-specens train-fusion` runs).

    harvest (teacher-forced, both models) -> seeded split into fit / held-out positions
    -> decision tree (scikit-learn) -> verifier head and/or weights head (optax, early stopping)
    -> held-out metrics of rule, tree and learned verifier -> OUT/

OUT holds `tree.json`, `head/` (verifier head), `weights_head/` (ensemble weights head) and
`metrics.json`; it is written through a temporary directory and appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from jax_specens.checkpoint import atomic_dir
from jax_specens.fusion.harvest import Harvest, harvest_tokens
from jax_specens.fusion.head import save_head
from jax_specens.fusion.train import TrainConfig, train_head, verifier_metrics, weights_metrics
from jax_specens.fusion.tree import fit_tree
from jax_specens.fusion.verifier import load_verifier

HEADS = ("verifier", "weights", "both")


@dataclasses.dataclass(frozen=True)
class FusionRecipe:
  """heads: which heads to train; eval_fraction: held-out share of positions; alpha, beta: the
  rule the metrics compare against; tree_depth / tree_min_leaf: the decision tree."""

  heads: str = "both"
  eval_fraction: float = 0.2
  seq_len: int = 128
  batch_size: int = 16
  tree_depth: int = 4
  tree_min_leaf: int = 20
  alpha: float = 0.5
  beta: float = 0.5
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    if self.heads not in HEADS:
      raise ValueError(f"unknown head choice {self.heads!r}; use one of {', '.join(HEADS)}")


def train_fusion(models: Sequence, sequences, out_dir: str | os.PathLike,
                 recipe: FusionRecipe = FusionRecipe(), *, overwrite: bool = False,
                 checkpoint_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
  """Harvests `sequences` (token ids of the shared tokenizer) with (draft, assistant) = `models`,
  fits every verifier and writes OUT. Returns the metrics (also in OUT/metrics.json).

  checkpoint_dir: orbax directory for resumable head training (a `verifier/` and a `weights/`
  sub-directory); a rerun with the same arguments resumes where it stopped.
  """
  _check_out(out_dir, overwrite)
  data = harvest_tokens(models, sequences, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                        progress=progress)
  return train_on_harvest(data, out_dir, recipe, overwrite=overwrite,
                          checkpoint_dir=checkpoint_dir, progress=progress)


def train_on_harvest(data: Harvest, out_dir: str | os.PathLike,
                     recipe: FusionRecipe = FusionRecipe(), *, overwrite: bool = False,
                     checkpoint_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> dict:
  """`train_fusion` from a harvest already made (e.g. `cross_harvest.harvest_cross` for two
  tokenizers): split by document, fit every verifier, write OUT, return the metrics."""
  out = _check_out(out_dir, overwrite)
  fit, held_out = data.split(recipe.eval_fraction, seed=recipe.train.seed)
  train, evals = fit.split(recipe.eval_fraction, seed=recipe.train.seed + 1)
  metrics: dict = {"positions": {"total": len(data), "labelled": len(data.labelled()),
                                 "held_out": len(held_out)}}
  labelled = fit.labelled()
  _need_labels(labelled, "fit the tree verifier")
  _need_labels(held_out.labelled(), "evaluate the verifiers", both=False)
  tree = fit_tree(labelled.features, labelled.labels, max_depth=recipe.tree_depth,
                  min_samples_leaf=recipe.tree_min_leaf, seed=recipe.train.seed)
  verifiers = {"rule": load_verifier("rule", alpha=recipe.alpha, beta=recipe.beta), "tree": tree}
  heads = {}
  for kind in ("verifier", "weights"):
    if recipe.heads not in (kind, "both"):
      continue
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / kind
    head, history = train_head(train, evals, dataclasses.replace(recipe.train, kind=kind),
                               checkpoint_dir=ckpt, progress=progress)
    heads[kind] = head
    metrics[f"{kind}_training"] = {k: v for k, v in history.items() if k != "evals"}
  if "verifier" in heads:
    verifiers["learned"] = heads["verifier"]
  metrics["verifiers"] = verifier_metrics(verifiers, held_out)
  if "weights" in heads:
    metrics["ensemble_nll"] = weights_metrics(heads["weights"], held_out)
  with atomic_dir(out, overwrite) as tmp:
    tree.save(tmp / "tree.json")
    for kind, sub in (("verifier", "head"), ("weights", "weights_head")):
      if kind in heads:
        save_head(heads[kind], tmp / sub, extra={"recipe": _jsonable(recipe)})
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
  return metrics


def _check_out(out_dir, overwrite: bool) -> Path:
  out = Path(out_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it")
  return out


def read_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
  """The texts of `paths` (UTF-8); blank-line separated paragraphs become separate texts."""
  if not paths:
    raise ValueError("no corpus given: pass one or more text files with --data FILE")
  texts = []
  for p in paths:
    p = Path(p)
    if not p.is_file():
      raise FileNotFoundError(f"corpus file {p} does not exist (--data FILE takes UTF-8 text files)")
    texts += [t for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
  if not texts:
    raise ValueError(f"the corpus is empty: {', '.join(map(str, paths))} hold no text")
  return texts


def _need_labels(data: Harvest, what: str, both: bool = True) -> None:
  if len(data) == 0 or (both and len(set(data.labels.tolist())) < 2):
    raise ValueError(f"too few keep/replace labels to {what} (need both kinds among the positions "
                     "where a model predicts the reference); use a larger --data corpus")


def _jsonable(recipe: FusionRecipe) -> dict:
  return dataclasses.asdict(recipe)
