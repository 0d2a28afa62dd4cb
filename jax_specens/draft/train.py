"""Distilling the draft: KL to the target's teacher-forced distribution, with optax.

The loss at every position is the cross-entropy `-sum_t p(t) log q(t)` over the target's top-T
tokens t (= KL(p || q) up to the target's entropy); tokens outside the draft's K ids cannot be
proposed and only cost their mass. Reported on the held-out split:
- `agree`: the draft's argmax equals the target's (the greedy acceptance rate per token);
- `alpha`: sum_t min(p(t), q(t)) over the top-T, a lower bound of 1 - TV(p, q), the T = 1
  acceptance rate (docs/algorithms.md §2).
The embedding stays the target's (frozen); the layers, final norm and head are trained. Minibatches
are a pure function of (seed, step), so a run resumed from its orbax checkpoint continues exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jax_specens import resume
from jax_specens.cache import init_cache
from jax_specens.draft.data import Harvest
from jax_specens.draft.model import SHARED
from jax_specens.models.model import Model


KEEP = ("best", "last")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation of the draft (the data and the draft's shape are set in `pipeline`)."""

  batch_size: int = 16
  learning_rate: float = 1e-3
  warmup_steps: int = 30
  max_steps: int = 1500
  eval_every: int = 100
  weight_decay: float = 0.0
  seed: int = 0
  unroll: int = 1  # feature-input drafts: passes along their own chain (`distill_metrics`)
  time_budget_s: float | None = None  # the cosine schedule follows the elapsed time when set
  # the draft returned: "best" (lowest held-out loss, the start included) or "last" (the final
  # weights: a phase on prompts unlike the held-out ones, whose loss may not show what it learnt)
  keep: str = "best"

  def __post_init__(self):
    if self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1:
      raise ValueError("batch_size, max_steps and eval_every must be >= 1")
    if self.keep not in KEEP:
      raise ValueError(f"keep must be one of {KEEP}, got {self.keep!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def subset_index(top_ids: np.ndarray, vocab_subset, vocab_size: int) -> np.ndarray:
  """Maps target ids to their row in the draft's head; -1 for ids outside the subset."""
  lut = np.full((vocab_size,), -1, np.int32)
  lut[np.asarray(vocab_subset)] = np.arange(len(vocab_subset), dtype=np.int32)
  return lut[top_ids]


def split_trainable(draft: Model):
  """(graphdef, trainable State, frozen State): the shared embedding is frozen."""
  module = draft.module()
  frozen = lambda path, _: path[0] in SHARED  # noqa: E731
  return nnx.split(module, nnx.All(nnx.Param, nnx.Not(frozen)), ...)


def distill_metrics(
    module, tokens: Int[Array, "B L"], mask: Float[Array, "B L"], idx: Int[Array, "B L T"],
    logp: Float[Array, "B L T"], features: Float[Array, "B L D"] | None = None,
    unroll: int = 1,
) -> dict[str, Array]:
  """Mean loss, agreement and alpha (see the module docstring) over the masked positions.

  A feature-input draft reads `features` (the target's final-normed hidden states at every
  position) shifted by one: position i gets f_{i-1}, as when it catches up on committed tokens.
  unroll > 1 also trains it along its chain of proposals: pass k reads the draft's own outputs
  of pass k - 1 instead (its k-th proposal after a committed token; EAGLE-3's training-time test,
  without its attention masks: earlier positions also see pass-k states). The loss is the mean
  over the passes; `agree_k` / `alpha_k` report pass k (`agree` = pass 1).
  """
  b, l = tokens.shape
  cache = init_cache(module.config, b, l, module.embed.embedding[...].dtype, grad=True)
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  inside = idx >= 0
  p = jnp.exp(logp) * inside
  n = jnp.maximum(mask.sum(), 1.0)
  mean = lambda x: (x * mask).sum() / n  # noqa: E731
  shift = lambda f: jnp.pad(f, ((0, 0), (1, 0), (0, 0)))[:, :l]  # noqa: E731
  feed = shift(features) if module.config.feature_input else None
  out, losses = {}, []
  for k in range(1, (unroll if feed is not None else 1) + 1):
    x, _ = module.hidden(tokens, positions, cache, features=feed)
    feed = shift(x) if feed is not None else None
    logits = module.head(x, full=False)  # B L K
    lq = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.maximum(idx, 0), -1)
    ce = -(p * jnp.where(inside, lq, 0.0)).sum(-1)
    agree = (jnp.argmax(logits, -1) == idx[..., 0]) & inside[..., 0]
    losses.append(mean(ce))
    suffix = "" if k == 1 else f"_{k}"
    out.update({f"loss{suffix}": losses[-1], f"agree{suffix}": mean(agree),
                f"alpha{suffix}": mean(jnp.minimum(p, jnp.exp(lq)).sum(-1))})
  out["loss"] = sum(losses) / len(losses)
  return out


def evaluate(draft: Model, data: Harvest, batch_size: int = 16, unroll: int = 1
             ) -> dict[str, float]:
  """Held-out loss / agree / alpha of `draft` on `data` (token-weighted means)."""
  idx = subset_index(data.top_ids, draft.config.vocab_subset, draft.config.vocab_size)
  fn = jax.jit(lambda m, *a: distill_metrics(m.module(), *a, unroll=unroll))
  sums, total = {}, 0.0
  for s in range(0, data.tokens.shape[0], batch_size):
    sl = slice(s, s + batch_size)
    n = float(data.mask[sl].sum())
    out = fn(draft, data.tokens[sl], data.mask[sl], idx[sl], data.top_logp[sl],
             _features(draft, data, sl))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v) * n
    total += n
  return {k: v / max(total, 1.0) for k, v in sums.items()}


def _features(draft: Model, data: Harvest, rows):
  """The target's features of `rows` as float32, for a feature-input draft (None otherwise)."""
  if not draft.config.feature_input:
    return None
  if data.features is None:
    raise ValueError("a feature-input draft trains on the target's hidden states: the labels "
                     "need `features` (`data.target_features`)")
  return jnp.asarray(data.features[rows], jnp.float32)


def _batch(seed: int, step: int, n: int, batch: int) -> np.ndarray:
  return np.random.default_rng([seed, step]).integers(0, n, batch)


def train(
    draft: Model, train_data: Harvest, eval_data: Harvest, config: TrainConfig = TrainConfig(),
    *, checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> tuple[Model, dict]:
  """Trains `draft` (initialised by `model.init_from_target`); returns the draft with the best
  held-out loss (`config.keep` "best") or the last weights ("last"), and a history.
  checkpoint_dir: orbax CheckpointManager dir; resumes from it."""
  graphdef, params, frozen = split_trainable(draft)
  idx = subset_index(train_data.top_ids, draft.config.vocab_subset, draft.config.vocab_size)
  steps = config.max_steps
  warm = min(config.warmup_steps, steps // 2)

  def lr_at(step: int, frac: float) -> float:
    if step < warm:
      return config.learning_rate * (step + 1) / max(warm, 1)
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))

  tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(learning_rate, b1=0.9, b2=0.98, weight_decay=config.weight_decay)))(
          learning_rate=config.learning_rate)

  def loss_of(p, *batch):
    m = distill_metrics(nnx.merge(graphdef, p, frozen), *batch, unroll=config.unroll)
    return m["loss"], m

  @jax.jit
  def train_step(p, opt_state, *batch):
    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(p, *batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, metrics

  def as_model(p) -> Model:
    g, st = nnx.split(nnx.merge(graphdef, p, frozen))
    return draft.replace(graphdef=g, params=st)

  initial = evaluate(draft, eval_data, config.batch_size, config.unroll)
  state = {"params": params, "opt_state": tx.init(params), "best_params": params, "step": 0,
           "best_loss": initial["loss"], "elapsed": 0.0}
  history = {"initial_eval": initial, "evals": []}
  manager = resume.open_manager(checkpoint_dir)
  state, resumed = resume.resume(manager, state)
  if resumed is not None:
    history["resumed_from"] = resumed
  p, opt_state, step = state["params"], state["opt_state"], state["step"]
  bar = tqdm(total=steps, initial=step, desc="distil draft", disable=not progress,
             mininterval=2.0)
  t0 = time.time() - state["elapsed"]
  n = train_data.tokens.shape[0]
  while step < steps:
    frac = step / steps
    if config.time_budget_s is not None:
      frac = max(frac, (time.time() - t0) / config.time_budget_s)
      if frac >= 1.0 and step > state["step"]:
        break
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr_at(step, frac), jnp.float32)
    b = _batch(config.seed, step, n, config.batch_size)
    p, opt_state, metrics = train_step(p, opt_state, train_data.tokens[b], train_data.mask[b],
                                       idx[b], train_data.top_logp[b],
                                       _features(draft, train_data, b))
    step += 1
    bar.update(1)
    if step % config.eval_every == 0 or step == steps:
      ev = evaluate(as_model(p), eval_data, config.batch_size, config.unroll)
      better = ev["loss"] < state["best_loss"]
      state = {"params": p, "opt_state": opt_state, "step": step,
               "best_params": p if better else state["best_params"],
               "best_loss": ev["loss"] if better else state["best_loss"],
               "elapsed": time.time() - t0}
      record = {"step": step, "train_loss": float(metrics["loss"]),
                **{f"eval_{k}": v for k, v in ev.items()}}
      history["evals"].append(record)
      bar.set_postfix(eval_loss=f"{ev['loss']:.3f}", agree=f"{ev['agree']:.3f}")
      resume.save(manager, step, state)
      if callback is not None:
        callback(step, record)
  bar.close()
  if not history["evals"] or history["evals"][-1]["step"] != step:  # stopped by the budget
    ev = evaluate(as_model(p), eval_data, config.batch_size, config.unroll)
    if ev["loss"] < state["best_loss"]:
      state = {**state, "best_params": p, "best_loss": ev["loss"]}
    history["evals"].append({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
  if manager is not None:
    manager.close()
  history.update(steps=step, seconds=round(time.time() - t0, 1), best_eval_loss=state["best_loss"],
                 kept=config.keep)
  return as_model(state["best_params"] if config.keep == "best" else p), history

