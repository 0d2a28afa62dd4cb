"""Greedy decoding is lossless: every speculative method reproduces its non-speculative twin token
for token (docs/algorithms.md §2-3), and both match a from-scratch reference decoder.

- ar == reference greedy of one model; sd(draft, target) == ar(target) for several gamma;
- ensemble == reference greedy of the ensemble target (wprob: argmax of sum_k w_k softmax(l_k) at
  T=1, never one model's argmax; wlogit; contrastive);
- se == ensemble for 2 and 3 models, scalar and per-model gamma;
all on one ragged batch (prompt lengths 5, 2, 1).
"""

import functools

import numpy as np
import pytest

from jax_specens.decoding.api import decode
from tests.decode_models import LENGTHS, PROMPTS, models, reference_greedy

N = 10


@functools.cache
def run(method, n_models, **kw):
  ms = models()[:n_models] if n_models else None
  if method in ("ar", "sd"):
    target = models()[0]
    draft = models()[1] if method == "sd" else None
    out = decode(target, PROMPTS, LENGTHS, method=method, draft=draft, max_new_tokens=N,
                 temperature=0.0, **kw)
  else:
    out = decode(ms, PROMPTS, LENGTHS, method=method, max_new_tokens=N, temperature=0.0, **kw)
  assert out.finish_reasons() == ["length"] * 3
  np.testing.assert_array_equal(out.lengths, [N] * 3)
  return np.asarray(out.tokens)


def test_ar_matches_reference():
  ref = reference_greedy(models()[:1], PROMPTS, LENGTHS, N, "select")
  np.testing.assert_array_equal(run("ar", 0), ref)


@pytest.mark.parametrize("gamma", [1, 3])
def test_sd_equals_ar(gamma):
  np.testing.assert_array_equal(run("sd", 0, gamma=gamma), run("ar", 0))


CASES = [  # (ensemble, models, gammas to try, ensemble kwargs)
    ("wprob", 2, (1, 3), dict(weights=(0.7, 0.3))),
    ("wprob", 3, ((2, 1, 3),), {}),
    ("wlogit", 3, (1,), {}),
    ("contrastive", 2, (2,), dict(mu=0.5)),
]


@pytest.mark.parametrize("kind,n,gammas,kw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_ensemble_matches_reference(kind, n, gammas, kw):
  ref = reference_greedy(models()[:n], PROMPTS, LENGTHS, N, kind, kw.get("weights"),
                         kw.get("mu", 0.1))
  got = run("ensemble", n, ensemble=kind, **kw)
  np.testing.assert_array_equal(got, ref)
  # the ensemble differs from each member's own greedy output (so the test is not vacuous)
  for i in range(n):
    single = reference_greedy(models()[i:i + 1], PROMPTS, LENGTHS, N, "select")
    assert not np.array_equal(single, ref)


@pytest.mark.parametrize("kind,n,gammas,kw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_se_equals_ensemble(kind, n, gammas, kw):
  want = run("ensemble", n, ensemble=kind, **kw)
  for gamma in gammas:
    np.testing.assert_array_equal(run("se", n, ensemble=kind, gamma=gamma, **kw), want,
                                  err_msg=f"gamma={gamma}")
