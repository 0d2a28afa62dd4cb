"""What speculation is worth: the docs/algorithms.md §3 speed-ups priced with measured pass costs.

    costs = measure_pass_costs([draft, target], widths=[(1, 2), (1, 5)], batch=1, cache_len=256)
    speedup(alpha=0.8, gammas=(4, 1), costs=costs, method="sd")   # sd over ar, this machine

One loop step of `sd` / `se` (two models, `jax_specens.decoding.se.step`) is a fixed round-robin
cycle: model k makes one scoring pass of width `1 + sum(gammas) - gammas[k]`, then `gammas[k] - 1`
drafting passes of width 1 (`step_passes`); a draft that reads the target's features
(`decoding/sd_features.py`) feeds up to gamma + 1 tokens in its first pass instead of 2 (what the
last verification committed), the rest alike. A W-token pass is not free on a CPU (1.4-1.8x a
1-token pass), so every pass is priced at its own measured width. The sampling and verification
around the passes (`measure_math_costs`, `PassCosts.math`) is priced per step and per baseline
token when measured: at 262,144 ids and batch 8 it is 10-40 ms a step even on the greedy ids-only
path (benchmarks/README.md).

Tokens per step follow from a per-token acceptance `alpha` (each proposal accepted independently):
model k's scoring pass verifies the m pending proposals of the other model, emits
`sum_{i<m} alpha^i` tokens on average, and proposes `gammas[k]` tokens when all m were accepted,
`gammas[k] - 1` after a rejection (its first drafting pass then feeds the residual token). That is a
Markov chain over the pending count; `tokens_per_step` is its stationary mean and
`expected_steps` the mean number of steps the slowest of B rows needs for N tokens (the loop runs
until every row is done). sd is the pair (draft, target) with gammas (gamma, 1) whose target
proposal (the bonus token) is always accepted: alpha = (alpha_draft, 1).

With every width priced 1 per model the sd speed-up is the closed form
`(1 - a^(g+1)) / ((1 - a)(g c + 1))` (`sd_closed_form`). The SPEC §3 se formula
(`se_closed_form`) describes a schedule in which the default proposer restarts after a rejection;
the loop here keeps the round-robin, so the two agree only where the schedules coincide
(gammas (1, 1), equal costs).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens.cache import ring_slack
from jax_specens.decoding.se import passes


@dataclasses.dataclass(frozen=True)
class PassCosts:
  """Median seconds of one jitted pass of W tokens, per model, at one batch and cache length.

  seconds[k] maps width -> seconds for model k (method order: sd draft first); widths not measured
  are interpolated linearly between the nearest measured ones. feature_draft: model 0 reads the
  target's hidden states (`ModelConfig.feature_input`), which sets the widths of its passes
  (`step_passes`). math: (gamma, seconds) of the sampling and verification outside the passes
  (`measure_math_costs`): gamma 0 the baseline's draw of a token, gamma >= 1 one sd step's; empty:
  unpriced (the closed forms' assumption).
  """

  seconds: tuple[tuple[tuple[int, float], ...], ...]
  batch: int = 1
  cache_len: int = 0
  feature_draft: bool = False
  math: tuple[tuple[int, float], ...] = ()

  @classmethod
  def unit(cls, per_model: Sequence[float], max_width: int = 64) -> "PassCosts":
    """Every width of model k costs `per_model[k]` (the closed forms' assumption)."""
    return cls(tuple(((1, float(c)), (max_width, float(c))) for c in per_model))

  @classmethod
  def fastest(cls, runs: Sequence["PassCosts"]) -> "PassCosts":
    """Per model and width, the least seconds over several measurements of the same passes
    (e.g. one per round of a benchmark, interleaved with the decodes it prices)."""
    seconds = tuple(
        tuple((w, min(dict(r.seconds[k])[w] for r in runs)) for w, _ in runs[0].seconds[k])
        for k in range(len(runs[0].seconds)))
    common = set.intersection(*(set(dict(r.math)) for r in runs))  # gammas every run measured
    math = tuple((g, min(dict(r.math)[g] for r in runs)) for g, _ in runs[0].math if g in common)
    return dataclasses.replace(runs[0], seconds=seconds, math=math)

  def of(self, k: int, width: int) -> float:
    ws, ss = zip(*self.seconds[k])
    if not ws[0] <= width <= ws[-1]:
      raise ValueError(f"no cost measured for model {k} at width {width} (measured {list(ws)}); "
                       "measure_pass_costs(..., widths=) must cover it")
    return float(np.interp(width, ws, ss))

  def math_of(self, gamma: int) -> float:
    """Seconds of the math of one step at this gamma (0: the baseline's token; gammas between
    measured ones interpolated linearly); 0 if unpriced."""
    if not self.math:
      return 0.0
    table = dict(self.math)
    if gamma in table:
      return table[gamma]
    steps = sorted(g for g in table if g > 0)
    if not (gamma > 0 and steps and steps[0] <= gamma <= steps[-1]):
      raise ValueError(f"no math cost measured for gamma {gamma} (measured {sorted(table)}); "
                       "measure_math_costs(..., gammas=) must cover it")
    return float(np.interp(gamma, steps, [table[g] for g in steps]))

  def to_dict(self) -> dict:
    return {"batch": self.batch, "cache_len": self.cache_len, "feature_draft": self.feature_draft,
            "seconds": [{str(w): s for w, s in m} for m in self.seconds],
            "math": {str(g): s for g, s in self.math}}


def measure_pass_costs(models, widths: Sequence[Sequence[int]], batch: int, cache_len: int,
                       repeats: int = 5, context: int | None = None) -> PassCosts:
  """Times `jax_specens.step.step` (one jitted forward, cache donated) of W tokens for each model
  and each of its `widths[k]`, `batch` rows, a cache of `cache_len` slots written from position
  `context` (default half the cache; clipped so W tokens fit), sliding layers as rings as in
  `decode`. Repeats are interleaved across widths, so a busy machine slows all alike; a model
  object given twice is measured once."""
  from jax_specens.step import step
  wanted: dict[int, tuple] = {}  # id -> (model, widths): one object given twice is timed once
  for m, ws in zip(models, widths):
    wanted[id(m)] = (m, wanted.get(id(m), (m, set()))[1] | {int(w) for w in ws})
  done: dict[int, dict[int, float]] = {i: {} for i in wanted}
  jobs = [(m, w) for m, ws in wanted.values() for w in sorted(ws)]
  context = cache_len // 2 if context is None else context
  # the caches `decode` builds: sliding layers as rings wide enough for the widest pass
  slack = ring_slack(max(w for _, w in jobs) - 1)
  caches = {id(m): m.init_cache(batch, cache_len, ring_slack=slack) for m, _ in jobs}
  times: dict[tuple[int, int], list[float]] = {}
  for rep in range(repeats + 1):  # the first round compiles and warms up
    for m, w in jobs:
      tokens = jnp.ones((batch, w), jnp.int32)
      start = jnp.full((batch,), max(min(context, cache_len - w), 0), jnp.int32)
      # a feature draft's pass as its catch-up runs it: on the target's features (and taps)
      features = (jnp.zeros((batch, w, m.config.feature_width), jnp.float32)
                  if m.config.feature_input else None)
      t0 = time.perf_counter()
      logits, caches[id(m)] = step(m, caches[id(m)], tokens, start, features)
      jax.block_until_ready(logits)
      if rep:
        times.setdefault((id(m), w), []).append(time.perf_counter() - t0)
  for (i, w), ts in times.items():
    done[i][w] = statistics.median(ts)
  per_model = tuple(tuple(sorted(done[id(m)].items())) for m in models)
  return PassCosts(per_model, batch=batch, cache_len=cache_len,
                   feature_draft=models[0].config.feature_input)


def measure_math_costs(vocab_size: int, batch: int, gammas: Sequence[int],
                       temperature: float = 0.0, repeats: int = 5
                       ) -> tuple[tuple[int, float], ...]:
  """Median seconds, jitted, on random logits of `vocab_size` ids, of the math around the model
  passes (for `PassCosts.math`): gamma 0, the baseline's draw of a token from `[B, V]` logits
  (`sampling.draw`); gamma >= 1, an sd step's gamma draws of the draft (`sampling.draw_with_dist`)
  and the verification of `[B, gamma + 1, V]` target logits (`acceptance.verify_logits`). Greedy
  (temperature 0) takes the ids-only paths the loops take. The se loop verifies position by
  position with the same functions; it is priced alike."""
  from jax_specens import acceptance
  from jax_specens.sampling import SamplingParams, draw, draw_with_dist
  params = SamplingParams.make(batch, temperature=temperature)

  @jax.jit  # params traced, as in the loops: the greedy test stays a run-time `lax.cond`
  def base(key, logits, params):
    return draw(key, logits[0], params)

  @jax.jit
  def sd(key, logits, params):
    *drafts, target = logits
    keys = jax.random.split(key, len(drafts) + 1)
    toks, dists = zip(*[draw_with_dist(k, d, params) for k, d in zip(keys, drafts)])
    v, bonus = acceptance.verify_logits(keys[-1], jnp.stack(toks, 1), jnp.stack(dists, 1),
                                        target, jnp.full((batch,), len(drafts), jnp.int32),
                                        params)
    return v.num_accepted, v.token, bonus

  key = jax.random.key(0)
  out = []
  for g in sorted({0, *gammas}):
    logits = [jax.random.normal(jax.random.fold_in(key, i), (batch, vocab_size))
              for i in range(max(g, 1))]
    if g:
      logits.append(jax.random.normal(key, (batch, g + 1, vocab_size)))
    f = sd if g else base
    ts = []
    for rep in range(repeats + 1):  # the first compiles
      t0 = time.perf_counter()
      jax.block_until_ready(f(key, logits, params))
      ts += [time.perf_counter() - t0] if rep else []
    out.append((g, statistics.median(ts)))
  return tuple(out)


def step_passes(gammas: Sequence[int], feature_draft: bool = False) -> list[tuple[int, int]]:
  """(model, width) of every pass of one loop step, in order (`decoding.se.passes`; a feature
  draft's first pass feeds up to gamma + 1 tokens, `decoding.sd_features`)."""
  out = [(p.k, p.width) for p in passes(gammas)]
  return [(0, gammas[0] + 1)] + out[1:] if feature_draft else out


def step_seconds(gammas: Sequence[int], costs: PassCosts) -> float:
  """Seconds of one loop step: every pass priced at its width, plus the step's math if measured
  (`PassCosts.math`)."""
  return (sum(costs.of(k, w) for k, w in step_passes(gammas, costs.feature_draft))
          + costs.math_of(gammas[0]))


def _turn(m: int, a: float) -> list[tuple[float, int, bool]]:
  """Outcomes (probability, tokens emitted, all accepted) of verifying m proposals."""
  out = [(a ** i * (1 - a), i + 1, False) for i in range(m)]
  return [o for o in out if o[0] > 0] + [(a ** m, m, True)]


def _step_outcomes(alpha: Sequence[float], gammas: Sequence[int]):
  """Per start state m0 (pending proposals of model 1 at model 0's turn, 0..gammas[1]): a list of
  (probability, tokens emitted in the step, next m0)."""
  if len(gammas) != 2 or len(alpha) != 2:
    raise ValueError(f"pricing covers two models (sd, or se of two); got gammas {tuple(gammas)}")
  g0, g1 = gammas
  table = []
  for m0 in range(g1 + 1):
    outs = []
    for p0, t0, full0 in _turn(m0, alpha[1]):
      for p1, t1, full1 in _turn(g0 if full0 else g0 - 1, alpha[0]):
        outs.append((p0 * p1, t0 + t1, g1 if full1 else g1 - 1))
    table.append(outs)
  return table


def _alphas(alpha, method: str) -> tuple[float, float]:
  a = tuple(float(x) for x in np.broadcast_to(np.asarray(alpha, float), (2,)))
  if not all(0.0 <= x <= 1.0 for x in a):
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
  return (a[0], 1.0) if method == "sd" else a


def tokens_per_step(alpha, gammas: Sequence[int], method: str = "se") -> float:
  """Stationary mean tokens emitted per loop step (alpha: one value, or one per model)."""
  table = _step_outcomes(_alphas(alpha, method), gammas)
  n = len(table)
  trans = np.zeros((n, n))
  reward = np.zeros(n)
  for s, outs in enumerate(table):
    for p, t, nxt in outs:
      trans[s, nxt] += p
      reward[s] += p * t
  # stationary distribution: pi (T - I) = 0, sum pi = 1 (least squares over the states reached)
  a = np.vstack([trans.T - np.eye(n), np.ones((1, n))])
  pi = np.linalg.lstsq(a, np.r_[np.zeros(n), 1.0], rcond=None)[0]
  return float(pi @ reward)


def _done_by_step(alpha, gammas: Sequence[int], new_tokens: int, method: str) -> np.ndarray:
  """`[new_tokens + 1]`: P(a row has `new_tokens` tokens after s steps), s = 0..new_tokens (every
  step emits at least one token, so the last entry is 1)."""
  table = _step_outcomes(_alphas(alpha, method), gammas)
  dist = np.zeros((len(table), new_tokens + 1))  # [start state, tokens so far (capped)]
  dist[0, 0] = 1.0
  done = np.zeros(new_tokens + 1)
  for step in range(1, new_tokens + 1):
    nxt = np.zeros_like(dist)
    for s, outs in enumerate(table):
      for p, t, s2 in outs:
        moved = np.zeros(new_tokens + 1)
        if t < new_tokens:
          moved[t:new_tokens] = dist[s, :new_tokens - t]
        moved[new_tokens] = dist[s, max(new_tokens - t, 0):].sum()
        nxt[s2] += p * moved
    dist = nxt
    done[step] = dist[:, -1].sum()
    if done[step] >= 1.0 - 1e-12:
      done[step:] = 1.0
      break
  return done


def expected_steps(alpha, gammas: Sequence[int], new_tokens: int, batch: int = 1,
                   method: str = "se", row_alphas: Sequence[float] | None = None) -> float:
  """Mean loop steps until every one of `batch` independent rows has `new_tokens` tokens, from
  the loop's first step (nothing pending).

  row_alphas: one per-token acceptance per row (`DecodeStats.row_accepted` / `row_rejections`),
  replacing `alpha` and `batch`: the rows of a batch are different texts and accept at different
  rates, and the loop waits for the slowest, so a batch's mean alpha under-prices its steps."""
  rows = [alpha] * batch if row_alphas is None else list(row_alphas)
  cdfs: dict = {}  # one chain per distinct alpha
  all_done = np.ones(new_tokens + 1)
  for a in rows:
    key = tuple(np.broadcast_to(np.asarray(a, float), (2,)))
    if key not in cdfs:
      cdfs[key] = _done_by_step(a, gammas, new_tokens, method)
    all_done = all_done * cdfs[key]
  return float(np.sum(1.0 - all_done[:-1]))  # P(some row still running before step s + 1)


def baseline_seconds(costs: PassCosts, method: str) -> float:
  """Seconds per token of the method sd / se accelerates: ar of the target (the last model), or the
  plain ensemble (one width-1 pass of every model)."""
  n = len(costs.seconds)
  passes = costs.of(n - 1, 1) if method == "sd" else sum(costs.of(k, 1) for k in range(n))
  return passes + costs.math_of(0)


def baseline_prefill(prefill: Sequence[float], method: str) -> float:
  """Prefill seconds of the baseline (ar: the target's, the last model; ensemble: every model's)
  from each model's prefill seconds in method order."""
  return prefill[-1] if method == "sd" else sum(prefill)


def speedup(alpha, gammas: Sequence[int], costs: PassCosts, method: str) -> float:
  """SPEC §3 expected speed-up of sd over ar / se over ensemble: tokens per step over the priced
  step, against the baseline's seconds per token."""
  return (tokens_per_step(alpha, gammas, method) * baseline_seconds(costs, method)
          / step_seconds(gammas, costs))


def run_seconds(alpha, gammas: Sequence[int], costs: PassCosts, method: str, new_tokens: int,
                batch: int, prefill: Sequence[float] = (0.0, 0.0),
                row_alphas: Sequence[float] | None = None) -> float:
  """Priced seconds of one sd / se call: the expected steps of its slowest row
  (`expected_steps`, per-row alphas if given) at the priced step, plus each model's prefill."""
  steps = expected_steps(alpha, gammas, new_tokens, batch, method, row_alphas)
  return steps * step_seconds(gammas, costs) + sum(prefill)


def run_speedup(alpha, gammas: Sequence[int], costs: PassCosts, method: str, new_tokens: int,
                batch: int, prefill: Sequence[float] = (0.0, 0.0),
                row_alphas: Sequence[float] | None = None) -> float:
  """The speed-up one call should show: `batch` rows of `new_tokens` each (the loop waits for the
  slowest row; ar / ensemble need exactly new_tokens steps), plus each model's prefill seconds
  (sd: the draft's prefill is extra; ensemble and se prefill the same models)."""
  base = new_tokens * baseline_seconds(costs, method) + baseline_prefill(prefill, method)
  return base / run_seconds(alpha, gammas, costs, method, new_tokens, batch, prefill, row_alphas)


def best_gammas(alpha, costs: PassCosts, method: str, max_gamma: int = 8, margin: float = 0.0
                ) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], float]]]:
  """The gammas in 1..max_gamma (sd: (g, 1); se: one per model) with the highest `speedup`, and
  every candidate with its prediction.

  margin: take instead the shortest schedule (least total gamma, then the highest prediction)
  priced within `margin` of the best: a per-token alpha prices every proposal of a chain alike,
  where a draft's later proposals are accepted less (the shipped feature drafts' held-out
  agreement falls 0.49 / 0.46 / 0.44 along a chain), so a near-tie is a win for the shorter one."""
  grid = ([(g, 1) for g in range(1, max_gamma + 1)] if method == "sd"
          else list(itertools.product(range(1, max_gamma + 1), repeat=2)))
  scored = [(g, speedup(alpha, g, costs, method)) for g in grid]
  top = max(s for _, s in scored)
  near = [(g, s) for g, s in scored if s >= top * (1.0 - margin)]
  return min(near, key=lambda x: (sum(x[0]), -x[1]))[0], scored


def needed_widths(method: str, max_gamma: int = 8, feature_draft: bool = False
                  ) -> list[list[int]]:
  """Widths per model that pricing every gamma in 1..max_gamma needs."""
  if method == "sd":
    return [list(range(1, max_gamma + 2)) if feature_draft else [1, 2],
            list(range(1, max_gamma + 2))]
  return [list(range(1, max_gamma + 2))] * 2


def alpha_from_stats(accepted: int, rejections: int) -> float:
  """Per-token acceptance from a decode's stats: each verified proposal is a trial, accepted ones
  succeed, each rejection is the one failure of its round (tokens discarded after it were never
  tried; rounds cut by the output's end end without a failure)."""
  trials = accepted + rejections
  return accepted / trials if trials else float("nan")


def row_alphas_from_stats(stats: dict) -> list[float]:
  """Each row's per-token acceptance (`alpha_from_stats` of `row_accepted`, `row_rejections` in
  `DecodeStats.to_dict()`); a row with no verified proposal takes the batch's."""
  batch = alpha_from_stats(stats["accepted"], stats["rejections"])
  rows = [alpha_from_stats(a, r) for a, r in zip(stats["row_accepted"], stats["row_rejections"])]
  return [batch if np.isnan(a) else a for a in rows]


def alpha_from_rounds(mean_accepted: float, gamma: int) -> float:
  """Solves E[accepted of gamma] = a (1 - a^g) / (1 - a) for a (bisection); rounds of gamma."""
  f = lambda a: sum(a ** k for k in range(1, gamma + 1))  # noqa: E731
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) < mean_accepted else (lo, mid)
  return (lo + hi) / 2


def sd_closed_form(alpha: float, gamma: int, c: float) -> float:
  """sd over ar with every pass costing 1 (target) or c (draft): (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
  if alpha >= 1.0:
    return (gamma + 1) / (gamma * c + 1)
  return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def se_closed_form(alpha: float, gamma_q: int, gamma_p: int, c: float) -> float:
  """The SPEC §3 formula, c = cost(M_q) / cost(M_p): (1 - a^gq)(1 + c) / ((1 - a)(1 + c gq - a^gp c))."""
  alpha = min(alpha, 1.0 - 1e-9)
  return ((1 - alpha ** gamma_q) * (1 + c)
          / ((1 - alpha) * (1 + c * gamma_q - alpha ** gamma_p * c)))
