"""The CoSD rule (docs/algorithms.md §4) and the features it reads, on hand-made distributions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.fusion import features as F
from jax_specens.fusion import RuleVerifier, load_verifier, position_features, rule_replace


def case(p_d, p_a, x_d, x_a):
  """Logits of two hand-made distributions over 4 tokens plus both candidates."""
  return np.log(np.asarray(p_d, np.float32)), np.log(np.asarray(p_a, np.float32)), x_d, x_a


# draft puts p on token 0, assistant q on token 1 (they disagree) unless said otherwise
def disagree(p, q):
  rest_d, rest_a = (1 - p) / 3, (1 - q) / 3
  return case([p, rest_d, rest_d, rest_d], [rest_a, q, rest_a, rest_a], 0, 1)


CASES = {
    # name: (case, alpha, beta, expected replace)
    "all clauses hold -> replace": (disagree(0.3, 0.6), 0.5, 0.5, True),
    "agreement is kept even when unconfident": (
        case([0.3, 0.3, 0.2, 0.2], [0.9, 0.05, 0.03, 0.02], 0, 0), 0.5, 0.5, False),
    "agreement is kept for any alpha, beta": (
        case([0.1, 0.3, 0.3, 0.3], [0.97, 0.01, 0.01, 0.01], 0, 0), 1.0, 0.0, False),
    "p_d(x~) < alpha fails -> keep": (disagree(0.6, 0.9), 0.5, 0.5, False),
    "p_d(x~) < alpha holds with a larger alpha": (disagree(0.6, 0.9), 0.7, 0.5, True),
    "p_d(x~) == alpha is not below it": (disagree(0.5, 0.9), 0.5, 0.5, False),
    "p_a(x^) > beta p_d(x~) fails -> keep": (disagree(0.4, 0.3), 0.5, 1.0, False),
    "p_a(x^) > beta p_d(x~) holds with a smaller beta": (disagree(0.4, 0.3), 0.5, 0.5, True),
    "unconfident assistant below beta p_d": (disagree(0.45, 0.2), 0.5, 0.5, False),
}


def stack_cases(cases):
  ld, la, xd, xa, alpha, beta, want = zip(*[(*c, a, b, w) for c, a, b, w in cases])
  return (jnp.asarray(np.stack(ld)), jnp.asarray(np.stack(la)), jnp.asarray(xd),
          jnp.asarray(xa), jnp.asarray(alpha), jnp.asarray(beta), np.asarray(want))


def test_rule_clauses_each_way():
  ld, la, xd, xa, alpha, beta, want = stack_cases(CASES.values())
  feats = jax.jit(position_features)([ld, la], [xd, xa])
  got = np.asarray(jax.jit(rule_replace)(feats, alpha, beta))
  for name, g, w in zip(CASES, got, want):
    assert g == w, name


def test_features_of_hand_made_distributions():
  ld, la, xd, xa, *_ = stack_cases([CASES["all clauses hold -> replace"]])
  f = np.asarray(position_features([ld, la], [xd, xa]))[0]
  assert f.shape == (F.num_features(2),) == (len(F.feature_names(2)),)
  names = dict(zip(F.feature_names(2), f))
  np.testing.assert_allclose([names["p_d(x~)"], names["p_d(x^)"], names["p_a(x~)"],
                              names["p_a(x^)"]], [0.3, 0.7 / 3, 0.4 / 3, 0.6], rtol=1e-5)
  p = np.array([0.3] + [0.7 / 3] * 3)
  np.testing.assert_allclose(names["entropy_d"], -(p * np.log(p)).sum(), rtol=1e-5)
  np.testing.assert_allclose(names["margin_d"], 0.3 - 0.7 / 3, rtol=1e-5)
  np.testing.assert_allclose(names["margin_a"], 0.6 - 0.4 / 3, rtol=1e-5)
  assert names["agree"] == 0.0
  assert f[F.P_D_XD] == names["p_d(x~)"] and f[F.P_A_XA] == names["p_a(x^)"]


def test_features_are_nan_free_on_one_hot_and_masked_logits():
  v = 8
  one_hot = jnp.where(jnp.arange(v) == 3, 0.0, -1e30)[None]
  masked = jnp.where(jnp.arange(v) < 2, 0.0, -jnp.inf)[None]
  f = position_features([one_hot, masked], [jnp.array([3]), jnp.array([5])])
  assert np.all(np.isfinite(np.asarray(f)))
  np.testing.assert_allclose(np.asarray(f)[0, :4], [1.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_rule_parameters_are_traced_no_recompile():
  ld, la, xd, xa, *_ = stack_cases(CASES.values())
  feats = position_features([ld, la], [xd, xa])
  fn = jax.jit(lambda v, f: v(f))
  a = fn(RuleVerifier(jnp.float32(0.5), jnp.float32(0.5)), feats)
  b = fn(RuleVerifier(jnp.float32(0.7), jnp.float32(0.1)), feats)
  assert fn._cache_size() == 1
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  chex.assert_trees_all_equal(np.asarray(load_verifier("rule", alpha=0.7, beta=0.1)(feats)),
                              np.asarray(b))


def test_bad_verifier_inputs():
  with pytest.raises(ValueError, match="unknown verifier 'oracle'.*rule, tree, learned"):
    load_verifier("oracle")
  with pytest.raises(ValueError, match="alpha"):
    load_verifier("rule", alpha=1.5)
  with pytest.raises(ValueError, match="needs a trained checkpoint.*--verifier-path"):
    load_verifier("learned")
  with pytest.raises(FileNotFoundError, match="does not exist.*train-fusion"):
    load_verifier("tree", "/nonexistent/fusion")
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 9\].*got shape \(3, 7\)"):
    F.check_features(np.zeros((3, 7)))
