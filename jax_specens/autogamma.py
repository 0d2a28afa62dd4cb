"""`gamma="auto"`: the speculation length chosen from measurements, before the real decode runs.

    out = decode(target, prompts, lengths, method="sd", draft=draft, gamma="auto", ...)
    out.gamma_choice.gamma, out.gamma_choice.alpha, out.gamma_choice.predicted_speedup

A short calibration on the caller's own prompts (`PROBE_TOKENS` new tokens with a probe gamma, the
caller's sampling parameters, a key folded from the caller's) measures the per-token acceptance
alpha (`pricing.alpha_from_stats`), and one jitted pass of widths `TIMED_WIDTHS` (those between
are interpolated; each timed width compiles a pass) is timed at the caller's batch and cache length
(`pricing.measure_pass_costs`), and so is the step's sampling and verification math at gammas
`MATH_GAMMAS` (`pricing.measure_math_costs`; at 262,144 ids and batch 8, 10-40 ms a step,
and grows with gamma). The gamma in 1..8 (sd: the draft's; se of two models: one per model) with
the highest priced speed-up, or the shortest priced within `TIE_MARGIN` of it
(`pricing.best_gammas`), is then used as if the caller had passed it: the schedule is fixed before
the real decode starts, so the output distribution is exactly that of the explicit gamma (greedy:
the same tokens). The choice is cached in this process per (method, models, batch, cache-length
bucket, greedy or sampled, ensemble kind, whether `JAX_SPECENS_CPU_KERNELS` is on): a second call
with the same models and shapes does not recalibrate (`GammaChoice.cached`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jax_specens import pricing, vocab
from jax_specens.kernels import cpu as cpu_kernels

PROBE_GAMMA = {"sd": 4, "se": (2, 2)}
# 16 put Gemma-3-270M's demo continuation on the wrong side of a near-tie (probe alpha 0.53, gamma
# 2 priced 1.45x against gamma 1's 1.43x; the run then accepted 0.36, gamma 1 0.41); 32 and 48 read
# 0.48 / 0.45 and choose 1. The probe's tokens cost little beside its compile
PROBE_TOKENS = 32
MAX_GAMMA = 8
# the shortest schedule priced within 5% of the best is taken (`pricing.best_gammas`'s margin):
# measured, a chain's later proposals are accepted less than the per-token alpha prices them
# (the demo's sd rows accepted 0.41-0.42 at gamma 1, 0.31-0.36 at gamma 2; Gemma's 2 was chosen on
# a 1.4% price difference), and with identical models gamma 5 measured faster than the 8 priced 4%
# above it (benchmarks/README.md, gamma_auto)
TIE_MARGIN = 0.05
# widths timed (each compiles a pass); the ones between are interpolated (pricing.PassCosts.of)
TIMED_WIDTHS = (1, 2, 3, 5, MAX_GAMMA + 1)
MATH_GAMMAS = (1, MAX_GAMMA)  # the step's sampling and verification, timed at these (about linear)
_CACHE: dict[tuple, tuple[Any, "GammaChoice"]] = {}


@dataclasses.dataclass(frozen=True)
class GammaChoice:
  """What `gamma="auto"` chose and why (hashable: it rides on `DecodeOutput` as static data).

  gamma: the value decode ran with (sd: an int; se: one per model). alpha: per-token acceptance
  measured by the probe (probe_gamma, probe_tokens new tokens; probe_accepted / probe_rejections
  its counts). costs: the measured pass seconds. predicted_speedup: the priced speed-up of `gamma`
  over ar (sd) / ensemble (se); candidates: every gamma tried with its prediction. seconds: wall time
  of the calibration (probe compile and run, pass timings). cached: taken from the in-process
  cache (the numbers are those of the calibration that made it).
  """

  method: str
  gamma: int | tuple[int, ...]
  alpha: float
  predicted_speedup: float
  candidates: tuple[tuple[tuple[int, ...], float], ...]
  costs: pricing.PassCosts
  probe_gamma: int | tuple[int, ...]
  probe_tokens: int
  probe_accepted: int
  probe_rejections: int
  seconds: float
  cached: bool = False

  @property
  def baseline(self) -> str:
    """The method this one speeds up: ar (sd) or ensemble (se)."""
    return "ar" if self.method == "sd" else "ensemble"

  @property
  def baseline_faster(self) -> bool:
    """No gamma is priced faster than the baseline here (the best predicted speed-up < 1): the
    caller is better served by `method=self.baseline` on this machine. Advice only: decode still
    runs the method asked for, with the best gamma."""
    return self.predicted_speedup < 1.0

  def to_dict(self) -> dict:
    g = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    return {"method": self.method, "gamma": g(self.gamma), "alpha": self.alpha,
            "predicted_speedup": self.predicted_speedup, "baseline": self.baseline,
            "baseline_faster": self.baseline_faster,
            "candidates": [{"gamma": g(c if self.method == "se" else c[0]), "predicted": s}
                           for c, s in self.candidates],
            "pass_costs": self.costs.to_dict(), "probe_gamma": g(self.probe_gamma),
            "probe_tokens": self.probe_tokens, "probe_accepted": self.probe_accepted,
            "probe_rejections": self.probe_rejections, "calibration_s": self.seconds,
            "cached": self.cached}


def clear_cache() -> None:
  _CACHE.clear()


def _bucket(n: int) -> int:
  return 1 << max(int(n) - 1, 1).bit_length()


def _check(models, prompts, prompt_lengths, kw: dict) -> tuple:
  """ValueError for everything gamma='auto' cannot do; returns the models in method order."""
  from jax_specens.models.model import Model
  method, gamma = kw.get("method", "ar"), kw["gamma"]
  if gamma != "auto":
    raise ValueError(f"gamma must be an int, a sequence of ints (se: one per model) or 'auto', "
                     f"got {gamma!r}")
  if method not in PROBE_GAMMA:
    raise ValueError(f"gamma='auto' chooses the speculation length of methods 'sd' and 'se', not "
                     f"{method!r}; pass an explicit gamma (e.g. gamma=4), or none for ar / ensemble")
  members = (models,) if isinstance(models, Model) else tuple(models)
  ordered = ((kw["draft"],) if method == "sd" and kw.get("draft") is not None else ()) + members
  if method == "se" and len(ordered) != 2:
    raise ValueError(f"gamma='auto' prices se for two models, got {len(ordered)}; pass one "
                     "explicit gamma per model (e.g. gamma=(2, 1, 1))")
  leaves = jax.tree_util.tree_leaves((ordered, prompts, prompt_lengths, kw.get("temperature")))
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    raise ValueError("gamma='auto' measures acceptance and timings by running the models, which "
                     "cannot happen on traced values (inside jax.jit); call decode(..., "
                     "gamma='auto') once outside jit and pass its out.gamma_choice.gamma inside")
  return ordered


def resolve(models, prompts, prompt_lengths, kw: dict) -> tuple[Any, GammaChoice]:
  """(gamma to decode with, GammaChoice) for `decode(models, prompts, prompt_lengths, **kw)` with
  `kw["gamma"] == "auto"`; calibrates unless the in-process cache has the answer."""
  from jax_specens.decoding.api import decode
  ordered = _check(models, prompts, prompt_lengths, kw)
  method, n = kw.get("method"), int(kw.get("max_new_tokens", 1))
  b, t = np.shape(prompts)
  cache_len = kw.get("cache_len") or t + n + 2 * MAX_GAMMA
  greedy = bool(np.all(np.asarray(kw.get("temperature", 1.0)) == 0))
  ens = kw.get("ensemble", "wprob")
  key = (method, tuple(id(m) for m in ordered), b, _bucket(cache_len), greedy,
         ens if isinstance(ens, str) else id(ens), cpu_kernels.requested())  # pass costs differ
  if key in _CACHE:
    return _CACHE[key][1].gamma, dataclasses.replace(_CACHE[key][1], cached=True)

  t0 = time.perf_counter()
  probe = PROBE_GAMMA[method]
  user_key = kw.get("key")
  user_key = jax.random.key(0) if user_key is None else user_key
  probe_kw = dict(kw, gamma=probe, max_new_tokens=min(PROBE_TOKENS, n), stop_ids=None,
                  cache_len=None, key=jax.random.fold_in(user_key, 0xA070))
  st = decode(models, prompts, prompt_lengths, **probe_kw).stats.to_dict()
  alpha = pricing.alpha_from_stats(st["accepted"], st["rejections"])
  alpha = 0.0 if np.isnan(alpha) else alpha
  widths = [sorted(set(ws) & set(TIMED_WIDTHS) | {max(ws)})
            for ws in pricing.needed_widths(method, MAX_GAMMA, ordered[0].config.feature_input)]
  costs = pricing.measure_pass_costs(ordered, widths, b, int(cache_len), context=t + n // 2)
  math = pricing.measure_math_costs(vocab.shared_size(ordered), b, MATH_GAMMAS,
                                    0.0 if greedy else 1.0, repeats=3)
  costs = dataclasses.replace(costs, math=math)
  best, grid = pricing.best_gammas(alpha, costs, method, MAX_GAMMA, margin=TIE_MARGIN)
  gamma = best[0] if method == "sd" else best
  choice = GammaChoice(method=method, gamma=gamma, alpha=alpha,
                       predicted_speedup=dict(grid)[best], candidates=tuple(grid), costs=costs,
                       probe_gamma=probe, probe_tokens=min(PROBE_TOKENS, n),
                       probe_accepted=st["accepted"], probe_rejections=st["rejections"],
                       seconds=time.perf_counter() - t0)
  _CACHE[key] = (ordered, choice)  # holding the models keeps their ids from being reused
  return gamma, choice
