"""The speculative acceptance rule (docs/algorithms.md §2) on one position, vectorised over many rows: the
emitted token follows r exactly; deliberately wrong rules do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jax_specens import acceptance
from tests import wrong_rules

Q = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
R = np.array([0.1, 0.2, 0.3, 0.1, 0.25, 0.05])
ROWS = 40000


def emitted(rule, seed=0):
  """Each row proposes x ~ q, then the rule emits x (accepted) or its replacement."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  logq = jnp.log(jnp.tile(jnp.asarray(Q, jnp.float32), (ROWS, 1, 1)))
  logr = jnp.log(jnp.tile(jnp.asarray(R, jnp.float32), (ROWS, 1, 1)))
  x = jax.random.categorical(k1, logq, axis=-1).astype(jnp.int32)
  v = jax.jit(rule)(k2, x, logq, logr, jnp.ones((ROWS,), jnp.int32))
  return np.asarray(jnp.where(v.num_accepted > 0, x[:, 0], v.token)), v


def pvalue(tokens, p):
  return stats.chisquare(np.bincount(tokens, minlength=len(p)), p * len(tokens)).pvalue


def test_residual():
  got = np.exp(np.asarray(acceptance.residual(jnp.log(jnp.asarray(R)), jnp.log(jnp.asarray(Q)))))
  want = np.maximum(R - Q, 0)
  np.testing.assert_allclose(got, want / want.sum(), atol=1e-6)
  same = np.exp(np.asarray(acceptance.residual(jnp.log(jnp.asarray(R)), jnp.log(jnp.asarray(R)))))
  np.testing.assert_allclose(same, R, atol=1e-6)  # no residual mass: falls back to r


def test_lossless_rule_emits_r_with_rate_one_minus_tv():
  tokens, v = emitted(acceptance.verify)
  assert pvalue(tokens, R) > 1e-3
  rate = float(np.mean(np.asarray(v.num_accepted)))
  assert rate == pytest.approx(1 - 0.5 * np.abs(Q - R).sum(), abs=0.01)


@pytest.mark.parametrize("rule", [wrong_rules.verify_accept_all,
                                  wrong_rules.verify_resample_from_target])
def test_wrong_rules_fail(rule):
  tokens, _ = emitted(rule)
  assert pvalue(tokens, R) < 1e-6


def test_greedy_one_hot_and_num_valid():
  v = 4
  logq = jnp.log(jnp.eye(v)[jnp.array([[1, 2, 3], [1, 2, 3]])])  # q proposes 1, 2, 3
  logr = jnp.log(jnp.eye(v)[jnp.array([[1, 2, 0], [1, 2, 0]])])  # r's argmax: 1, 2, 0
  toks = jnp.array([[1, 2, 3], [1, 2, 3]], jnp.int32)
  out = acceptance.verify(jax.random.key(0), toks, logq, logr, jnp.array([3, 1], jnp.int32))
  np.testing.assert_array_equal(out.num_accepted, [2, 1])
  np.testing.assert_array_equal(out.rejected, [True, False])
  assert int(out.token[0]) == 0  # the replacement is r's argmax


def test_greedy_verdict_is_verify_on_one_hot_distributions():
  """The ids-only path the loops take when every row is greedy gives `verify`'s verdict on the
  one-hot q (at the proposals) and r (at the target's argmax), over every accept/reject pattern
  and every count of valid proposals."""
  b, g, v = 512, 4, 5
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  toks = jax.random.randint(k1, (b, g), 0, v)
  other = jax.random.randint(k3, (b, g), 0, v)
  best = jnp.where(jax.random.bernoulli(k2, 0.6, (b, g)), toks, other)
  num_valid = jnp.arange(b, dtype=jnp.int32) % (g + 1)
  want = acceptance.verify(jax.random.key(2), toks, jnp.log(jnp.eye(v)[toks]),
                           jnp.log(jnp.eye(v)[best]), num_valid)
  got = acceptance.greedy_verdict(toks, best, num_valid)
  assert len(set(np.asarray(want.num_accepted).tolist())) == g + 1  # every count occurs
  np.testing.assert_array_equal(got.num_accepted, want.num_accepted)
  np.testing.assert_array_equal(got.rejected, want.rejected)
  rej = np.asarray(want.rejected)
  assert rej.any() and (~rej).any()
  np.testing.assert_array_equal(np.asarray(got.token)[rej], np.asarray(want.token)[rej])
