"""Ensemble functions: n models' logits at one position -> one target distribution `r` (docs/algorithms.md §1).

An ensemble function has the signature

    fn(logits: Float[Array, "N B ... V"], params: SamplingParams) -> Float[Array, "B ... V"]

and returns log-weights of `r` (normalised afterwards, so unnormalised is fine). It sees only the
models' logits at positions conditioned on the same prefix, so every method that verifies against
it (SE) stays lossless. Built-ins, all computed in log space:

- `wprob`:       r = sum_k w_k p_k, with p_k each model's sampling distribution (temperature, top-k,
                 top-p, min-p applied per model);
- `wlogit`:      r = sampling distribution of sum_k w_k log_softmax(l_k);
- `contrastive`: r = sampling distribution of log p_e - mu * sum_{k>=1} w_k log p_k (expert = model 0,
                 amateurs = the others, w uniform over them; two models is the usual case), with the
                 optional plausibility mask keeping tokens with `p_e(x) >= beta * max p_e`;
- `select`:      r = p_i of one model (plain speculative decoding: the target).

`Ensemble` is a pytree: weights, mu and beta are traced (changing them does not recompile); the
kind, and a user callable that is not itself a pytree, are static.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jax_specens.sampling import (NEG_INF, SamplingParams, argmax, concrete, log_probs,
                                  normalize, one_hot_log, sample)

EnsembleFn = Callable[[Float[Array, "N B ... V"], SamplingParams], Float[Array, "B ... V"]]
KINDS = ("wprob", "wlogit", "contrastive", "select")


def sum_models(x: Float[Array, "N ..."]) -> Float[Array, "..."]:
  """`jnp.sum(x, axis=0)` over the (short) model axis as N - 1 elementwise adds: XLA's CPU
  backend reduces a leading axis of 2 through a slow kernel (`[2, 8, 49152]`: 4.1 ms against
  0.1 ms), and these sums run at every verified position."""
  return functools.reduce(jnp.add, [x[k] for k in range(x.shape[0])])


def logsumexp_models(x: Float[Array, "N ..."]) -> Float[Array, "..."]:
  """`jax.nn.logsumexp(x, axis=0)` elementwise over the model axis (see `sum_models`; `[2, 8,
  49152]`: 7.3 ms against 0.7 ms). All `-inf` gives `-inf`."""
  top = functools.reduce(jnp.maximum, [x[k] for k in range(x.shape[0])])
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  return jnp.log(sum_models(jnp.exp(x - top))) + top


def weighted_probs(logits, params: SamplingParams, weights):
  """log sum_k w_k p_k."""
  logp = jax.vmap(log_probs, in_axes=(0, None))(logits, params)
  logw = jnp.log(weights).reshape((-1,) + (1,) * (logits.ndim - 1))
  return logsumexp_models(logp + logw)


def weighted_logits(logits, params: SamplingParams, weights):
  """Sampling distribution of sum_k w_k log_softmax(l_k) (softmax(sum_k w_k l_k / T))."""
  ls = jax.nn.log_softmax(logits, axis=-1)
  w = weights.reshape((-1,) + (1,) * (logits.ndim - 1))
  return log_probs(sum_models(jnp.where(w > 0, w * ls, 0.0)), params)


def contrastive(logits, params: SamplingParams, mu, beta):
  """Sampling distribution of log p_e - mu * mean_amateurs log p_a, plausibility-masked by beta."""
  ls = jax.nn.log_softmax(logits, axis=-1)
  ls = jnp.where(jnp.isnan(ls), NEG_INF, ls)
  expert, amateurs = ls[0], ls[1:]
  finite_min = jnp.finfo(ls.dtype).min
  # the mean, each term divided first: a -inf (or a sum of clamped minima) would make z +inf
  amateur = sum_models(jnp.maximum(amateurs, finite_min) / amateurs.shape[0])
  z = expert - mu * amateur
  plausible = expert >= jnp.max(expert, axis=-1, keepdims=True) + jnp.log(
      jnp.maximum(beta, 1e-38))
  z = jnp.where(plausible | (beta <= 0), z, NEG_INF)
  return log_probs(z, params)


@flax.struct.dataclass
class Ensemble:
  """An ensemble function bound to its parameters. Call `target(logits, params)`.

  kind: one of KINDS, or "custom" for `fn`. weights: `[N]`. mu, beta: scalars (contrastive).
  index: the selected model for "select". fn / fn_tree: a user callable, static or a pytree.
  """

  weights: Float[Array, "N"]
  mu: Float[Array, ""]
  beta: Float[Array, ""]
  fn_tree: Any = None
  kind: str = flax.struct.field(pytree_node=False, default="wprob")
  index: int = flax.struct.field(pytree_node=False, default=0)
  fn: Any = flax.struct.field(pytree_node=False, default=None)

  def combine(self, logits: Float[Array, "N B ... V"], params: SamplingParams
              ) -> Float[Array, "B ... V"]:
    """Normalised log r, for rows whose params are not greedy (see `target`)."""
    if self.kind == "wprob":
      out = weighted_probs(logits, params, self.weights)
    elif self.kind == "wlogit":
      out = weighted_logits(logits, params, self.weights)
    elif self.kind == "contrastive":
      out = contrastive(logits, params, self.mu, self.beta)
    elif self.kind == "select":
      out = log_probs(logits[self.index], params)
    else:
      fn = self.fn_tree if self.fn_tree is not None else self.fn
      out = fn(logits, params)
    out = jnp.where(jnp.isnan(out), NEG_INF, out)
    return normalize(out)

  def target(self, logits: Float[Array, "N B ... V"], params: SamplingParams
             ) -> Float[Array, "B ... V"]:
    """log r. Greedy rows (temperature 0) get one-hot at the argmax of r computed at temperature 1
    without filtering (docs/algorithms.md §2: for wprob that is argmax sum_k w_k softmax(l_k))."""
    r = self.combine(logits, params.unfiltered_when_greedy())
    hard = one_hot_log(self._argmax(logits, r), r.shape[-1])
    greedy = params.greedy.reshape(params.greedy.shape + (1,) * (r.ndim - 1))
    return jnp.where(greedy, hard, r)

  def greedy_token(self, logits: Float[Array, "N B ... V"]) -> Int[Array, "B ..."]:
    """The token a greedy row emits: where `target` puts its one-hot mass, without building it
    (for `select`, one argmax over the selected model's logits)."""
    if self.kind == "select":
      return self._argmax(logits, None)
    ones = SamplingParams.make(logits.shape[1], temperature=1.0)
    return self._argmax(logits, self.combine(logits, ones))

  def draw(self, key: Array, logits: Float[Array, "N B ... V"], params: SamplingParams
           ) -> Int[Array, "B ..."]:
    """`sample(key, target(logits, params))`, token for token; `greedy_token` at run time when
    every row is greedy."""
    return jax.lax.cond(jnp.all(params.greedy), lambda: self.greedy_token(logits),
                        lambda: sample(key, self.target(logits, params)))

  def _argmax(self, logits, r) -> Int[Array, "B ..."]:
    """argmax of r; for `select` of the raw logits (the same order up to rounding, and what
    `sampling.log_probs` does for greedy rows, so ar, sd and the draft all break ties alike)."""
    return argmax(logits[self.index] if self.kind == "select" else r).astype(jnp.int32)


def make_ensemble(kind: str | EnsembleFn, num_models: int, weights=None, mu=0.1,
                  plausibility=None, index: int = 0) -> Ensemble:
  """Builds an `Ensemble`, validating its parameters (ValueError with the fix)."""
  if not callable(kind) and kind not in KINDS:
    raise ValueError(f"unknown ensemble {kind!r}; use one of {', '.join(KINDS[:3])} or a callable "
                     "fn(logits[N,B,...,V], SamplingParams) -> log r[B,...,V]")
  if kind == "contrastive" and num_models < 2:
    raise ValueError("contrastive decoding needs at least 2 models (expert first, then amateur)")
  if weights is None:
    w = np.full((num_models,), 1.0 / num_models, np.float32)
  else:
    if kind == "contrastive":
      raise ValueError("weights do not apply to the contrastive ensemble (it uses mu and "
                       "plausibility); drop weights= or use ensemble='wprob'/'wlogit'")
    w = concrete(weights)
    if w is not None:
      w = np.asarray(w, np.float32).reshape(-1)
      if w.shape != (num_models,):
        raise ValueError(f"got {w.shape[0]} ensemble weights for {num_models} models; pass one "
                         "weight per model")
      if np.any(w < 0) or not np.isclose(w.sum(), 1.0, atol=1e-4):
        raise ValueError(f"ensemble weights must be >= 0 and sum to 1, got {w.tolist()}; "
                         "normalise them, e.g. w / sum(w)")
    else:
      w = weights
  m = concrete(mu)
  if m is not None and (not np.isfinite(m) or m < 0):
    raise ValueError(f"mu must be a finite number >= 0, got {m}")
  beta = 0.0 if plausibility is None else plausibility
  b = concrete(beta)
  if b is not None and not 0.0 <= float(b) <= 1.0:
    raise ValueError(f"plausibility must be in [0, 1] (a fraction of the expert's top "
                     f"probability), got {b}")
  common = dict(weights=jnp.asarray(w, jnp.float32), mu=jnp.asarray(mu, jnp.float32),
                beta=jnp.asarray(beta, jnp.float32))
  if callable(kind):
    if jax.tree_util.tree_leaves(kind) != [kind]:  # a pytree carrying arrays: trace them
      return Ensemble(**common, fn_tree=kind, kind="custom")
    return Ensemble(**common, kind="custom", fn=kind)
  return Ensemble(**common, kind=kind, index=index)
