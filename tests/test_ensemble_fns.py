"""Ensemble functions (docs/algorithms.md §1) against numpy, the greedy target (docs/algorithms.md §2), NaN-freedom, and user
callables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.ensemble_fns import make_ensemble
from jax_specens.sampling import SamplingParams

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=(3, 2, 7)).astype(np.float32) * 2  # [N, B, V]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def target(kind, logits=LOGITS, temperature=1.0, top_k=0, **kw):
  n, b = logits.shape[:2]
  ens = make_ensemble(kind, n, **kw)
  params = SamplingParams.make(b, temperature, top_k=top_k)
  return np.asarray(ens.target(jnp.asarray(logits), params))


def test_wprob():
  w = np.array([0.5, 0.3, 0.2])
  want = np.log(np.einsum("n,nbv->bv", w, np.exp(log_softmax(LOGITS))))
  np.testing.assert_allclose(target("wprob", weights=w), want, rtol=1e-5, atol=1e-5)


def test_wlogit_with_temperature():
  w = np.array([0.2, 0.2, 0.6])
  want = log_softmax(np.einsum("n,nbv->bv", w, log_softmax(LOGITS)) / 0.7)
  np.testing.assert_allclose(target("wlogit", weights=w, temperature=0.7), want, rtol=1e-5,
                             atol=1e-5)


def test_contrastive_and_plausibility():
  ls = log_softmax(LOGITS[:2])
  z = ls[0] - 0.5 * ls[1]
  np.testing.assert_allclose(target("contrastive", LOGITS[:2], mu=0.5), log_softmax(z),
                             rtol=1e-5, atol=1e-5)
  keep = np.exp(ls[0]) >= 0.3 * np.exp(ls[0]).max(-1, keepdims=True)
  got = target("contrastive", LOGITS[:2], mu=0.5, plausibility=0.3)
  assert np.all(np.isneginf(got[~keep]))
  np.testing.assert_allclose(got[keep], log_softmax(np.where(keep, z, -np.inf))[keep], rtol=1e-5)


def test_greedy_wprob_is_argmax_of_mixture_not_of_a_member():
  p = np.array([[[0.5, 0.45, 0.05]], [[0.05, 0.45, 0.5]]])  # members prefer 0 and 2; mix: 1
  got = target("wprob", np.log(p).astype(np.float32), temperature=0.0, top_k=1)
  np.testing.assert_array_equal(np.exp(got), [[0.0, 1.0, 0.0]])


def test_no_nan_when_all_mass_removed():
  dead = np.full((2, 2, 7), -np.inf, np.float32)
  dead[1, 0, 3] = 0.0  # one member has one live token in row 0
  for kind in ("wprob", "wlogit", "contrastive"):
    for t in (0.0, 1.0):
      assert not np.any(np.isnan(target(kind, dead, temperature=t))), (kind, t)
  everything_removed = make_ensemble(lambda logits, params: jnp.full(logits.shape[1:], -jnp.inf),
                                     2)
  out = everything_removed.target(jnp.asarray(dead), SamplingParams.make(2))
  assert not np.any(np.isnan(np.asarray(out)))


def test_user_callable_and_pytree_callable():
  def first_model(logits, params):
    return jax.nn.log_softmax(logits[0], axis=-1)

  np.testing.assert_allclose(target(first_model), log_softmax(LOGITS[0]), rtol=1e-5, atol=1e-5)

  class Scaled:  # a pytree ensemble function: its array is traced, not baked into the program
    def __init__(self, scale):
      self.scale = scale

    def __call__(self, logits, params):
      return jax.nn.log_softmax(self.scale * logits[1], axis=-1)

  jax.tree_util.register_pytree_node(Scaled, lambda s: ((s.scale,), None),
                                     lambda _, c: Scaled(*c))
  ens = make_ensemble(Scaled(jnp.float32(2.0)), 3)
  assert ens.kind == "custom" and ens.fn_tree is not None
  got = np.asarray(jax.jit(lambda e: e.target(jnp.asarray(LOGITS), SamplingParams.make(2)))(ens))
  np.testing.assert_allclose(got, log_softmax(2 * LOGITS[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,message", [
    (dict(kind="max"), "unknown ensemble"), (dict(weights=[0.5, 0.6, -0.1]), "sum to 1"),
    (dict(weights=[1.0]), "one weight per model"), (dict(kind="contrastive", mu=-1), "mu"),
    (dict(kind="contrastive", weights=[0.5, 0.5, 0.0]), "do not apply")])
def test_invalid(kw, message):
  kw = dict(kw)
  with pytest.raises(ValueError, match=message):
    make_ensemble(kw.pop("kind", "wprob"), 3, **kw)


def test_the_model_axis_reductions_equal_jax_s():
  from jax_specens.ensemble_fns import logsumexp_models, sum_models
  x = jax.random.normal(jax.random.key(0), (3, 4, 11)) * 5
  x = x.at[:, 0, :3].set(-jnp.inf).at[0, 1, 2].set(-jnp.inf)  # all -inf, and one -inf term
  np.testing.assert_allclose(logsumexp_models(x), jax.nn.logsumexp(x, axis=0), rtol=1e-6)
  assert np.all(np.isneginf(np.asarray(logsumexp_models(x))[0, :3]))
  np.testing.assert_allclose(sum_models(jnp.nan_to_num(x, neginf=0.0)),
                             jnp.sum(jnp.nan_to_num(x, neginf=0.0), axis=0), rtol=1e-6)


def test_contrastive_with_two_amateurs_that_rule_a_token_out_gives_no_nan():
  """Both amateurs give token 0 probability 0: the mean of their clamped log-probs stays finite,
  so z at token 0 is large and finite (not +inf, whose normalisation is NaN)."""
  logits = jnp.asarray([[[1.0, 2.0, 0.5]], [[-jnp.inf, 1.0, 1.0]], [[-jnp.inf, 1.0, 1.0]]])
  r = np.asarray(target("contrastive", logits, mu=0.1))
  assert not np.any(np.isnan(r))
  np.testing.assert_allclose(r[0, 0], 0.0, atol=1e-6)  # all the mass on token 0 (not a row of -inf)


@pytest.mark.parametrize("kind", ["wprob", "wlogit", "contrastive", "select"])
def test_greedy_token_and_draw_follow_the_greedy_target(kind):
  """`greedy_token` is where the greedy target puts its mass, and `Ensemble.draw` is
  `sample(target)` with the same key, greedy or not."""
  from jax_specens.sampling import sample
  x = jnp.asarray(rng.normal(size=(2, 6, 40)).astype(np.float32))
  ens = make_ensemble(kind, 2, **({"index": 1} if kind == "select" else {}))
  greedy = SamplingParams.make(6, temperature=0.0, top_k=2)
  hot = np.asarray(ens.target(x, greedy))
  np.testing.assert_array_equal(ens.greedy_token(x), np.argmax(hot, -1))
  assert np.all(np.isneginf(hot).sum(-1) == 39)
  for params in (greedy, SamplingParams.make(6, temperature=jnp.asarray([0.0, 1.0] * 3))):
    key = jax.random.key(4)
    np.testing.assert_array_equal(jax.jit(ens.draw)(key, x, params),
                                  sample(key, ens.target(x, params)))
