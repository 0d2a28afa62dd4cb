"""Sampling is lossless: sd's output follows the target's distribution and se's the ensemble's
(docs/algorithms.md §2-3), tested with a chi-square test on the joint distribution of two generated tokens.

The reference joint distribution is computed exactly by enumerating every first token with the
models (V = 8, so 64 cells). Draws are vectorised: one decode call over a batch of identical
prompts. The same test must FAIL for deliberately wrong acceptance rules (accept every proposal;
replace a rejected token with a draw from r instead of the residual), which shows it can fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jax_specens.decoding.api import decode
from tests import wrong_rules
from tests.decode_models import _combine, _last_logits, models

V = 8
DRAWS = 3000
PREFIX = np.array([3, 5], np.int32)


def vocab8():
  return models(vocab=V, scale=4.0)


def exact_joint(ms, kind, weights=None, mu=0.1) -> np.ndarray:
  """P(x1, x2 | PREFIX) of the target r, `[V, V]`, by enumerating x1."""
  weights = [1.0 / len(ms)] * len(ms) if weights is None else weights

  def r(seqs):
    seqs = jnp.asarray(seqs, jnp.int32)
    lens = jnp.full((seqs.shape[0],), seqs.shape[1], jnp.int32)
    logr = _combine([np.asarray(_last_logits(m, seqs, lens, 4)) for m in ms], kind, weights, mu)
    p = np.exp(logr - logr.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)

  r1 = r(PREFIX[None, :])[0]
  seqs = np.concatenate([np.tile(PREFIX, (V, 1)), np.arange(V)[:, None]], axis=1)
  return r1[:, None] * r(seqs)


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square p-value of `samples [n, 2]` against the joint `probs [V, V]`; cells with
  expected count < 5 are pooled into one."""
  counts = np.zeros((V, V))
  np.add.at(counts, (samples[:, 0], samples[:, 1]), 1)
  exp = probs.reshape(-1) * len(samples)
  obs = counts.reshape(-1)
  small = exp < 5
  if np.any(small):
    exp = np.append(exp[~small], exp[small].sum())
    obs = np.append(obs[~small], obs[small].sum())
  return float(stats.chisquare(obs, exp).pvalue)


def draw(ms, method, seed=0, **kw) -> np.ndarray:
  prompts = np.tile(PREFIX, (DRAWS, 1))
  lens = np.full((DRAWS,), 2, np.int32)
  if method == "sd":
    out = decode(ms[1], prompts, lens, method="sd", draft=ms[0], max_new_tokens=2,
                 temperature=1.0, key=jax.random.key(seed), **kw)
  else:
    out = decode(list(ms), prompts, lens, method=method, max_new_tokens=2, temperature=1.0,
                 key=jax.random.key(seed), **kw)
  np.testing.assert_array_equal(out.lengths, 2)
  if "acceptance_rule" not in kw:  # speculation was exercised: some proposals accepted, some not
    assert 0 < int(np.sum(out.stats.accepted)) < int(np.sum(out.stats.proposed))
  return np.asarray(out.tokens)


def test_reference_is_not_trivial():
  """The joint distributions are spread out and differ between models, so the tests have power."""
  ms = vocab8()
  p0, p1 = exact_joint(ms[:1], "select"), exact_joint(ms[1:2], "select")
  assert p0.max() < 0.5 and p1.max() < 0.5
  assert 0.5 * np.abs(p0 - p1).sum() > 0.2  # total variation between two members


@pytest.mark.parametrize("gamma", [2])
def test_sd_follows_target(gamma):
  ms = vocab8()
  samples = draw(ms[:2], "sd", gamma=gamma)
  assert chi2_pvalue(samples, exact_joint(ms[1:2], "select")) > 1e-3
  # and not the draft's
  assert chi2_pvalue(samples, exact_joint(ms[:1], "select")) < 1e-6


SE_CASES = [  # (kind, number of models, gamma, kwargs)
    ("wprob", 2, 2, dict(weights=(0.3, 0.7))),
    ("wprob", 3, (1, 2, 1), {}),
    ("contrastive", 2, 2, dict(mu=0.5)),
]


@pytest.mark.parametrize("kind,n,gamma,kw", SE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SE_CASES])
def test_se_follows_ensemble(kind, n, gamma, kw):
  ms = vocab8()[:n]
  samples = draw(ms, "se", ensemble=kind, gamma=gamma, **kw)
  assert chi2_pvalue(samples, exact_joint(ms, kind, kw.get("weights"), kw.get("mu", 0.1))) > 1e-3


@pytest.mark.parametrize("rule", [wrong_rules.verify_accept_all,
                                  wrong_rules.verify_resample_from_target])
def test_wrong_acceptance_rule_fails_the_same_test(rule):
  ms = vocab8()[:2]
  kw = dict(weights=(0.3, 0.7))
  samples = draw(ms, "se", ensemble="wprob", gamma=2, acceptance_rule=rule, **kw)
  assert chi2_pvalue(samples, exact_joint(ms, "wprob", kw["weights"])) < 1e-6
