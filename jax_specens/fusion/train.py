"""Training the fusion head with optax, checkpointed with orbax, and held-out metrics.

`train_head` fits a `FusionHead` on a `Harvest` (see harvest.py):
  - kind "verifier": binary cross-entropy of keep (0) / replace (1) on the labelled positions;
  - kind "weights":  negative log-likelihood of the reference token under the mixture
    `sum_k lambda_k p_k` (lambda from the head), on every position.
AdamW with linear warm-up and cosine decay; evaluation on a held-out split every `eval_every`
steps; early stopping after `patience` evaluations without improvement (the best head is kept).
Minibatches are a pure function of (seed, step), so a run resumed from its orbax
`CheckpointManager` directory reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jax_specens import resume
from jax_specens.fusion import features as F
from jax_specens.fusion.harvest import Harvest
from jax_specens.fusion.head import FusionHead, FusionHeadFn, HeadConfig, Stat


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  kind: Literal["verifier", "weights"] = "verifier"
  hidden_size: int = 32
  num_layers: int = 2
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  warmup_steps: int = 20
  max_steps: int = 400
  batch_size: int = 256
  eval_every: int = 25
  patience: int = 6
  seed: int = 0

  def __post_init__(self):
    for name in ("max_steps", "batch_size", "eval_every", "patience"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1; got {getattr(self, name)}")


def training_data(data: Harvest, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(features, targets) for a head kind: labels of labelled positions, or reference log-probs."""
  if kind == "verifier":
    data = data.labelled()
    x, y = data.features, data.labels.astype(np.float32)
  else:
    x, y = data.features, data.ref_logprobs
  if x.shape[0] == 0:
    what = "labelled (keep/replace)" if kind == "verifier" else ""
    raise ValueError(f"no {what} positions to train the {kind} head on; use a larger corpus or "
                     "models that predict it better")
  return x, y


def head_loss(logits: jax.Array, targets: jax.Array, kind: str) -> jax.Array:
  """Mean loss of head logits `[N, O]` against targets `[N]` (verifier) or `[N, n]` (weights)."""
  if kind == "verifier":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], targets))
  return -jnp.mean(jax.nn.logsumexp(jax.nn.log_softmax(logits, -1) + targets, axis=-1))


def _batch_index(seed: int, step: int, n: int, batch: int) -> np.ndarray:
  return np.random.default_rng([seed, step]).integers(0, n, size=min(batch, n))


def train_head(
    train: Harvest, held_out: Harvest, config: TrainConfig = TrainConfig(), *,
    num_models: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
    callback: Callable[[int, dict], None] | None = None, progress: bool = True,
) -> tuple[FusionHeadFn, dict]:
  """Trains a head; returns the best head (lowest held-out loss) and a history dict.

  checkpoint_dir: an orbax CheckpointManager directory; the run resumes from its latest step.
  callback(step, record): called after each evaluation (and its checkpoint).
  """
  num_models = num_models or train.ref_logprobs.shape[1]
  x_tr, y_tr = training_data(train, config.kind)
  x_ev, y_ev = training_data(held_out, config.kind)
  F.check_features(x_tr, num_models, "training features")
  head_config = HeadConfig(config.kind, num_models, config.hidden_size, config.num_layers)
  module = FusionHead(head_config, rngs=nnx.Rngs(config.seed))
  module.mean[...] = jnp.asarray(x_tr.mean(0))
  module.std[...] = jnp.maximum(jnp.asarray(x_tr.std(0)), 1e-6)
  graphdef, params, stats = nnx.split(module, nnx.Param, Stat)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, config.max_steps - 1) or 1,
      config.max_steps, end_value=config.learning_rate * 0.05)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)

  def loss_of(p, x, y):
    return head_loss(nnx.merge(graphdef, p, stats)(x), y, config.kind)

  @jax.jit
  def train_step(p, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_of)(p, x, y)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  eval_loss = jax.jit(loss_of)
  state = {"params": params, "opt_state": tx.init(params), "best_params": params,
           "step": 0, "best_loss": float(eval_loss(params, x_ev, y_ev)), "bad_evals": 0}
  history = {"initial_eval_loss": state["best_loss"], "evals": []}
  manager = resume.open_manager(checkpoint_dir)
  state, resumed = resume.resume(manager, state)
  if resumed is not None:
    history["resumed_from"] = resumed

  bar = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {config.kind} head",
             disable=not progress)
  p, opt_state = state["params"], state["opt_state"]
  step = state["step"]
  while step < config.max_steps and state["bad_evals"] < config.patience:
    idx = _batch_index(config.seed, step, x_tr.shape[0], config.batch_size)
    p, opt_state, loss = train_step(p, opt_state, x_tr[idx], y_tr[idx])
    step += 1
    bar.update(1)
    if step % config.eval_every == 0 or step == config.max_steps:
      ev = float(eval_loss(p, x_ev, y_ev))
      better = ev < state["best_loss"] - 1e-6
      state = {"params": p, "opt_state": opt_state, "step": step,
               "best_params": p if better else state["best_params"],
               "best_loss": ev if better else state["best_loss"],
               "bad_evals": 0 if better else state["bad_evals"] + 1}
      record = {"step": step, "train_loss": float(loss), "eval_loss": ev}
      history["evals"].append(record)
      bar.set_postfix(eval_loss=f"{ev:.4f}")
      resume.save(manager, step, state)
      if callback is not None:
        callback(step, record)
  bar.close()
  if manager is not None:
    manager.close()
  history.update(steps=step, best_eval_loss=state["best_loss"],
                 early_stopped=state["bad_evals"] >= config.patience)
  best = nnx.merge(graphdef, state["best_params"], stats)
  return FusionHeadFn.from_module(best), history



# ---- held-out metrics ------------------------------------------------------------------------

def verifier_metrics(verifiers: dict, held_out: Harvest) -> dict[str, dict[str, float]]:
  """Accuracy and ROC AUC of each verifier's keep/replace decision on the labelled positions
  where the two candidates disagree: where they agree every verifier keeps (the decoding loop
  keeps agreement whatever it says) and the label is always keep, so counting those positions
  only inflates every accuracy alike (`accuracy_all` still reports it)."""
  from sklearn.metrics import roc_auc_score
  labelled = held_out.labelled()
  data = labelled.take(labelled.features[:, F.AGREE] < 0.5)
  if len(data) == 0:
    raise ValueError("no labelled held-out positions where the models disagree to evaluate the "
                     "verifiers on; harvest more text")
  x = jnp.asarray(data.features)
  y = data.labels.astype(np.int32)
  y_all = labelled.labels == 1
  out = {}
  for name, verifier in verifiers.items():
    scores = np.asarray(verifier.scores(x))
    decision = np.asarray(verifier(x))
    auc = float(roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else math.nan
    agree_all = labelled.features[:, F.AGREE] >= 0.5
    decision_all = np.asarray(verifier(jnp.asarray(labelled.features))) & ~agree_all
    out[name] = {"accuracy": float(np.mean(decision == (y == 1))), "auc": auc,
                 "replace_rate": float(np.mean(decision)),
                 "accuracy_all": float(np.mean(decision_all == y_all))}
  out["_positions"] = {"labelled": len(labelled), "disagreement": len(data),
                       "replace_fraction": float(np.mean(y == 1))}
  return out


def weights_metrics(head: FusionHeadFn, held_out: Harvest) -> dict[str, float]:
  """Held-out NLL of the learned mixture vs. each model alone and the uniform mixture."""
  lam = np.asarray(head.weights(jnp.asarray(held_out.features)))
  lp = held_out.ref_logprobs
  n = lp.shape[1]

  def nll(w):
    return float(-np.mean(np.log(np.maximum(np.sum(w * np.exp(lp), -1), 1e-30))))

  out = {"learned": nll(lam), "uniform": nll(np.full_like(lp, 1.0 / n))}
  out.update({f"model_{k}": float(-np.mean(lp[:, k])) for k in range(n)})
  return out
