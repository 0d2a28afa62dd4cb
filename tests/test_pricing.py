"""The priced speed-up model (jax_specens.pricing) against the closed forms and the real loop.

The loop checks run sd / se on tiny models with an acceptance rule that accepts each proposal with
probability alpha whatever the distributions (the target's own bonus token, q == r, is always
accepted, as the lossless rule does): the step counts the loop reports must then be the ones the
Markov chain of `pricing` predicts.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import pricing as P
from jax_specens.acceptance import _first_rejection
from jax_specens.decoding.api import decode
from tests import decode_models as dm


@functools.cache  # one rule object per alpha: the rule is static, a new one would recompile
def bernoulli_rule(alpha: float | tuple[float, ...]):
  """Accepts each proposal with probability alpha, or `alpha[b]` in row b (a tuple: rows that
  accept at different rates)."""
  a = jnp.asarray(alpha)[:, None] if isinstance(alpha, tuple) else alpha

  def rule(key, tokens, logq, logr, num_valid):
    k_u, k_res = jax.random.split(key)
    same = jnp.all(logq == logr, axis=-1)  # sd's bonus: the target's proposal checked against itself
    ok = (jax.random.uniform(k_u, tokens.shape) < a) | same
    return _first_rejection(k_res, ok, logq, logr, num_valid)
  return rule


def _prompts(batch):
  rng = np.random.default_rng(0)
  return rng.integers(1, dm.VOCAB, (batch, 4)).astype(np.int32), np.full((batch,), 4, np.int32)


def _run(method, gammas, alpha, batch, n, seed=0):
  a, b, _ = dm.models()
  prompts, lengths = _prompts(batch)
  kw = dict(draft=a, gamma=gammas[0]) if method == "sd" else dict(gamma=tuple(gammas))
  models = b if method == "sd" else [a, b]
  return decode(models, prompts, lengths, method=method, max_new_tokens=n, temperature=1.0,
                key=jax.random.key(seed), acceptance_rule=bernoulli_rule(alpha), **kw)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
@pytest.mark.parametrize("c", [0.05, 0.5, 1.0])
def test_sd_with_every_width_priced_alike_is_the_closed_form(alpha, gamma, c):
  unit = P.PassCosts.unit([c, 1.0])
  chex.assert_trees_all_close(P.speedup(alpha, (gamma, 1), unit, "sd"),
                              P.sd_closed_form(alpha, gamma, c), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.9])
def test_se_one_one_with_equal_costs_is_the_spec_formula(alpha):
  """The only case where the SPEC's restart schedule and the loop's round-robin coincide."""
  chex.assert_trees_all_close(P.speedup(alpha, (1, 1), P.PassCosts.unit([1.0, 1.0]), "se"),
                              P.se_closed_form(alpha, 1, 1, 1.0), rtol=1e-9)


def test_wider_passes_cost_more_and_lower_the_prediction():
  unit = P.PassCosts.unit([0.2, 1.0], max_width=9)
  wide = P.PassCosts((((1, 0.2), (2, 0.25)), tuple((w, 1.0 + 0.1 * (w - 1)) for w in range(1, 10))))
  assert P.step_seconds((4, 1), wide) == pytest.approx(0.25 + 3 * 0.2 + 1.4)
  assert P.speedup(0.8, (4, 1), wide, "sd") < P.speedup(0.8, (4, 1), unit, "sd")


@pytest.mark.parametrize("method,gammas", [("sd", (4, 1)), ("se", (2, 3))])
def test_step_passes_are_the_passes_the_loop_makes(method, gammas):
  out = _run(method, gammas, 0.7, batch=8, n=40)
  steps = int(out.stats.steps)
  per_model = np.bincount([k for k, _ in P.step_passes(gammas)], minlength=2)
  np.testing.assert_array_equal(np.asarray(out.stats.model_calls), steps * per_model)


@pytest.mark.parametrize("method,gammas", [("sd", (4, 1)), ("se", (2, 3))])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_deterministic_acceptance_gives_the_predicted_steps_exactly(method, gammas, alpha):
  n, batch = 40, 8
  out = _run(method, gammas, alpha, batch, n)
  assert int(out.stats.steps) == round(P.expected_steps(alpha, gammas, n, batch, method))
  assert np.all(np.asarray(out.lengths) == n)


@pytest.mark.parametrize("method,gammas,alpha", [("sd", (4, 1), 0.7), ("se", (2, 3), 0.7)])
def test_random_acceptance_gives_the_predicted_steps(method, gammas, alpha):
  """Many rows, several keys: the mean step count of the slowest row within 6% of the chain's."""
  n, batch = 40, 8
  steps = [int(_run(method, gammas, alpha, batch, n, seed=s).stats.steps) for s in range(6)]
  assert np.mean(steps) == pytest.approx(P.expected_steps(alpha, gammas, n, batch, method),
                                         rel=0.06)
  # and per row, over a long run: tokens per step near the stationary mean
  long = _run(method, gammas, alpha, 1, 120, seed=9)
  assert 120 / int(long.stats.steps) == pytest.approx(
      P.tokens_per_step(alpha, gammas, method), rel=0.15)


def test_the_slowest_row_sets_the_step_count():
  one = P.expected_steps(0.6, (4, 1), 64, 1, "sd")
  eight = P.expected_steps(0.6, (4, 1), 64, 8, "sd")
  assert eight > one * 1.05
  assert P.expected_steps(1.0, (4, 1), 64, 8, "sd") == P.expected_steps(1.0, (4, 1), 64, 1, "sd")


@pytest.mark.parametrize("method,gammas", [("sd", (4, 1)), ("se", (2, 3))])
def test_each_rows_acceptance_is_counted_and_the_slowest_row_prices_the_steps(method, gammas):
  """Rows that never / always accept: the stats say so row by row, and the steps are those of the
  never-accepting rows, which the batch's mean alpha (0.5) under-prices."""
  alphas = (0.0, 1.0) * 4
  out = _run(method, gammas, alphas, 8, 40)
  st = out.stats.to_dict()
  assert sum(st["row_accepted"]) == st["accepted"] and sum(st["row_rejections"]) == st["rejections"]
  np.testing.assert_array_equal(P.row_alphas_from_stats(st), alphas)
  steps = P.expected_steps(None, gammas, 40, method=method, row_alphas=alphas)
  assert int(out.stats.steps) == round(steps) == round(P.expected_steps(0.0, gammas, 40, 8, method))
  assert P.expected_steps(0.5, gammas, 40, 8, method) < 0.85 * steps


def test_random_per_row_acceptance_gives_the_steps_priced_per_row():
  alphas = (0.3,) * 4 + (0.9,) * 4
  steps = [int(_run("sd", (4, 1), alphas, 8, 40, seed=s).stats.steps) for s in range(6)]
  per_row = P.expected_steps(None, (4, 1), 40, method="sd", row_alphas=alphas)
  assert np.mean(steps) == pytest.approx(per_row, rel=0.06)
  assert P.expected_steps(0.6, (4, 1), 40, 8, "sd") < 0.85 * per_row  # the mean alpha's price


def test_alpha_from_a_decodes_stats():
  out = _run("sd", (4, 1), 0.7, batch=8, n=40)
  st = out.stats.to_dict()
  a = P.alpha_from_stats(st["accepted"], st["rejections"])
  assert a == pytest.approx(0.7, abs=0.05)
  # sd rounds all have gamma proposals: the bisection on accepted / rounds agrees
  assert P.alpha_from_rounds(st["accepted"] / st["rounds"], 4) == pytest.approx(a, abs=0.05)
  assert np.isnan(P.alpha_from_stats(0, 0))


def test_best_gammas_follow_acceptance_and_cost():
  unit = P.PassCosts.unit([0.1, 1.0])
  assert P.best_gammas(0.0, unit, "sd")[0] == (1, 1)
  assert P.best_gammas(0.99, unit, "sd")[0][0] >= 6
  best, grid = P.best_gammas(0.9, P.PassCosts.unit([1.0, 1.0]), "se", max_gamma=4)
  assert len(grid) == 16 and best == max(grid, key=lambda x: x[1])[0]


def test_a_near_tie_goes_to_the_shorter_schedule():
  costs = P.PassCosts.unit([0.1, 1.0])
  best, grid = P.best_gammas(0.9, costs, "sd")
  prices = dict(grid)
  assert best[0] > 1
  shorter, _ = P.best_gammas(0.9, costs, "sd", margin=0.05)
  # the least gamma priced within 5% of the best, and no shorter one is
  assert shorter[0] < best[0] and prices[shorter] >= 0.95 * prices[best]
  assert all(prices[(g, 1)] < 0.95 * prices[best] for g in range(1, shorter[0]))
  assert P.best_gammas(0.9, costs, "sd", margin=0.0)[0] == best


def test_fastest_of_several_measurements_takes_each_widths_least():
  a = P.PassCosts((((1, 0.2), (2, 0.3)), ((1, 1.0), (5, 2.0))), batch=8, cache_len=64)
  b = P.PassCosts((((1, 0.1), (2, 0.4)), ((1, 1.5), (5, 1.0))), batch=8, cache_len=64)
  f = P.PassCosts.fastest([a, b])
  assert f.seconds == (((1, 0.1), (2, 0.3)), ((1, 1.0), (5, 1.0)))
  assert (f.batch, f.cache_len) == (8, 64)
  m = P.PassCosts.fastest([dataclasses.replace(a, math=((0, 0.05), (2, 0.3))),
                           dataclasses.replace(b, math=((0, 0.04), (2, 0.4)))])
  assert m.math == ((0, 0.04), (2, 0.3))


def test_the_math_outside_the_passes_is_priced_in_the_step_and_the_baseline_token():
  """`PassCosts.math` (sampling and verification, `measure_math_costs`) adds its gamma's seconds
  to every priced step and gamma 0's to the baseline's token; without it nothing changes."""
  costs = P.PassCosts((((1, 0.1), (2, 0.1)), ((1, 1.0), (3, 1.5), (5, 2.0))))
  with_math = dataclasses.replace(costs, math=((0, 0.2), (2, 0.5)))
  assert P.step_seconds((2, 1), costs) == pytest.approx(0.1 + 0.1 + 1.5)
  assert P.step_seconds((2, 1), with_math) == pytest.approx(0.1 + 0.1 + 1.5 + 0.5)
  assert P.baseline_seconds(with_math, "sd") == pytest.approx(1.2)
  assert P.speedup(0.6, (2, 1), with_math, "sd") == pytest.approx(
      P.tokens_per_step(0.6, (2, 1), "sd") * 1.2 / 2.2)
  with pytest.raises(ValueError, match="gamma 3.*measure_math_costs"):
    P.step_seconds((3, 1), with_math)
  between = dataclasses.replace(costs, math=((0, 0.2), (1, 0.4), (3, 0.8)))
  assert between.math_of(2) == pytest.approx(0.6)  # interpolated, as pass widths are
  assert with_math.to_dict()["math"] == {"0": 0.2, "2": 0.5}


def test_measured_math_costs_cover_the_baseline_and_each_gamma():
  greedy = dict(P.measure_math_costs(256, 2, [1, 2], repeats=2))
  sampled = dict(P.measure_math_costs(300, 3, [3], temperature=1.0, repeats=2))
  assert sorted(greedy) == [0, 1, 2] and sorted(sampled) == [0, 3]
  assert all(s > 0 for s in [*greedy.values(), *sampled.values()])


def test_measured_pass_costs():
  a, b, _ = dm.models()
  costs = P.measure_pass_costs([a, b, a], widths=[[1, 3], [1, 2, 4], [1, 2]], batch=2,
                               cache_len=32, repeats=2)
  assert costs.seconds[0] == costs.seconds[2]  # one object, measured once, at every width asked
  assert [w for w, _ in costs.seconds[0]] == [1, 2, 3]
  assert [w for w, _ in costs.seconds[1]] == [1, 2, 4]
  assert all(s > 0 for m in costs.seconds for _, s in m)
  w3 = costs.of(1, 3)
  assert min(costs.of(1, 2), costs.of(1, 4)) <= w3 <= max(costs.of(1, 2), costs.of(1, 4))
  with pytest.raises(ValueError, match="width 5.*widths="):
    costs.of(1, 5)
  assert P.needed_widths("sd", 3) == [[1, 2], [1, 2, 3, 4]]


def test_pricing_refuses_what_it_does_not_model():
  unit = P.PassCosts.unit([1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="two models"):
    P.tokens_per_step(0.5, (1, 1, 1))
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    P.speedup(1.5, (1, 1), unit, "se")
