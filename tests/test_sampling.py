"""Sampling distributions (log space, per-row traced parameters), checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import sampling
from jax_specens.sampling import SamplingParams, log_probs, sample

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def probs(logits, **kw):
  params = SamplingParams.make(1, **kw)
  return np.exp(np.asarray(log_probs(jnp.asarray(logits)[None], params))[0])


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_temperature():
  np.testing.assert_allclose(probs(LOGITS, temperature=0.5), softmax(LOGITS / 0.5), rtol=1e-5)


def test_greedy_is_one_hot_at_argmax():
  np.testing.assert_array_equal(probs(LOGITS, temperature=0.0, top_k=3), np.eye(6)[0])


def test_top_k_top_p_min_p():
  p = softmax(LOGITS)
  np.testing.assert_allclose(probs(LOGITS, top_k=2), np.r_[p[:2] / p[:2].sum(), [0] * 4],
                             rtol=1e-5)
  # smallest prefix whose mass reaches top_p (p[0] < 0.6 <= p[0] + p[1])
  assert p[0] < 0.6 <= p[0] + p[1]
  np.testing.assert_allclose(probs(LOGITS, top_p=0.6), np.r_[p[:2] / p[:2].sum(), [0] * 4],
                             rtol=1e-5)
  keep = p >= 0.2 * p.max()
  np.testing.assert_allclose(probs(LOGITS, min_p=0.2), np.where(keep, p, 0) / p[keep].sum(),
                             rtol=1e-5)


def sorted_filter_reference(logp: np.ndarray, k: int, p: float, m: float) -> np.ndarray:
  """The filters' definition on one row, by sorting (float64): top-k keeps the first k sorted
  tokens and every tie of the k-th; top-p keeps the sorted prefix whose preceding mass (over the
  top-k tokens, renormalised) is < p, and every tie of its last value; min-p; the argmax always."""
  srt = np.sort(logp)[::-1].astype(np.float64)
  n = srt.size
  in_k = np.arange(n) < (k if 0 < k < n else n)
  pk = np.where(in_k, np.exp(srt - srt[0]) if np.isfinite(srt[0]) else 0.0, 0.0)
  pk = pk / pk.sum() if pk.sum() > 0 else pk
  kept = in_k & ((p >= 1.0) | (np.cumsum(pk) - pk < p))
  kept[0] = True
  keep = logp >= srt[kept].min()
  if m > 0:
    keep &= logp >= logp.max() + np.log(m)
  return (keep | (logp == logp.max())) & np.isfinite(logp)


FILTER = jax.jit(sampling._filter)  # one program per vocabulary size


def test_filters_equal_the_sorted_definition_with_ties_and_removed_tokens():
  """The filter finds its cut-offs without sorting (bisection over the values' order); on rows
  with tied values, removed (-inf) tokens and every parameter mix it keeps exactly the tokens the
  sorted definition keeps."""
  rs = np.random.RandomState(0)
  for trial in range(60):
    v = int(rs.choice([5, 8, 64, 700]))
    x = rs.randn(6, v) * rs.choice([0.1, 1.0, 5.0])
    if trial % 2 == 0:
      x = np.round(x, 1)  # many ties
    x[0, : v // 2] = -np.inf
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32)))
    k = rs.randint(0, v + 2, 6)
    p = rs.choice([1.0, 0.9, 0.5, 0.3, 0.01], 6)
    m = rs.choice([0.0, 0.0, 0.05], 6)
    out = FILTER(jnp.asarray(logp), SamplingParams.make(6, 1.0, k, p, m))
    for r in range(6):
      np.testing.assert_array_equal(np.isfinite(np.asarray(out[r])),
                                    sorted_filter_reference(logp[r], k[r], p[r], m[r]),
                                    err_msg=f"trial {trial} row {r}: k {k[r]} p {p[r]} m {m[r]}")


def test_per_row_parameters_in_one_call():
  logits = jnp.tile(jnp.asarray(LOGITS), (3, 1))
  params = SamplingParams.make(3, temperature=[0.0, 1.0, 2.0], top_k=[0, 2, 0])
  got = np.exp(np.asarray(log_probs(logits, params)))
  np.testing.assert_allclose(got[0], np.eye(6)[0])
  p = softmax(LOGITS)
  np.testing.assert_allclose(got[1], np.r_[p[:2] / p[:2].sum(), [0] * 4], rtol=1e-5)
  np.testing.assert_allclose(got[2], softmax(LOGITS / 2), rtol=1e-5)


def test_no_nan_when_all_mass_removed():
  dead = jnp.full((2, 6), -jnp.inf)
  lp = log_probs(dead, SamplingParams.make(2, temperature=[1.0, 0.0], top_p=0.5))
  assert not np.any(np.isnan(np.asarray(lp)))
  np.testing.assert_array_equal(sample(jax.random.key(0), lp), [0, 0])
  assert not np.any(np.isnan(np.asarray(sampling.normalize(dead))))


def test_sampling_frequencies():
  lp = log_probs(jnp.tile(jnp.asarray(LOGITS), (20000, 1)), SamplingParams.make(20000))
  counts = np.bincount(np.asarray(sample(jax.random.key(1), lp)), minlength=6) / 20000
  np.testing.assert_allclose(counts, softmax(LOGITS), atol=0.015)


def test_new_parameter_values_do_not_recompile():
  f = jax.jit(log_probs)
  x = jnp.asarray(LOGITS)[None]
  f(x, SamplingParams.make(1))
  for kw in (dict(temperature=0.3), dict(top_k=2, top_p=0.5), dict(temperature=0.0, min_p=0.1)):
    f(x, SamplingParams.make(1, **kw))
  assert f._cache_size() == 1


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(min_p=1.5), "min_p")])
def test_check_params(kw, message):
  with pytest.raises(ValueError, match=message):
    sampling.check_params(**kw)


def nan_out(x):
  return np.where(np.isnan(x), -np.inf, x)


def test_argmax_is_jnp_argmax_first_maximum_nan_ignored_and_empty_rows_included():
  x = np.array([[0.0, 3.0, 3.0, 1.0],            # ties: the first
                [-np.inf] * 4,                    # no mass: 0
                [1.0, np.nan, 5.0, np.nan],       # a NaN is a removed token, as in log_probs
                [np.nan] * 4,                     # no number: 0
                [-1.0, -2.0, -0.5, -np.inf]], np.float32)
  np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x)), [1, 0, 2, 0, 2])
  np.testing.assert_array_equal(jax.jit(sampling.argmax)(x), jnp.argmax(nan_out(x), axis=-1))
  above = jnp.asarray([[False, True, True], [False, False, False]])
  np.testing.assert_array_equal(sampling.argmax(above), jnp.argmax(above, axis=-1))
  r = jax.random.normal(jax.random.key(0), (3, 5, 97))
  np.testing.assert_array_equal(jax.jit(sampling.argmax)(r), jnp.argmax(r, axis=-1))


@pytest.mark.parametrize("v", [1024, 3 * 512, 4099])  # blocks of 512 / 768; a prime: one stage
def test_argmax_in_blocks_is_jnp_argmax(v):
  """The two-stage argmax over large vocabularies: ties across and inside blocks, NaN before and
  after the maximum's block, rows with no mass, booleans."""
  rng = np.random.default_rng(v)
  x = rng.normal(size=(7, v)).astype(np.float32)
  x[0, [5, v - 3]] = 9.0           # a tie across blocks: the first
  x[1, [v - 9, v - 8]] = 9.0       # a tie inside the last block
  x[2, 3], x[2, v - 1], x[2, 1] = 9.0, np.nan, np.nan  # NaN ignored, before or after the maximum
  x[3] = -np.inf
  x[4, :] = 2.0                    # all equal: 0
  x[5, v // 2 + 1] = np.inf
  x[6, : v // 2] = np.nan          # whole blocks of NaN
  np.testing.assert_array_equal(jax.jit(sampling.argmax)(x), jnp.argmax(nan_out(x), axis=-1))
  assert int(sampling.argmax(x)[2]) == 3
  hits = jnp.asarray(x > 1.5)
  np.testing.assert_array_equal(sampling.argmax(hits), jnp.argmax(hits, axis=-1))
  r = jax.random.normal(jax.random.key(v), (2, 3, v))
  np.testing.assert_array_equal(sampling.argmax(r), jnp.argmax(r, axis=-1))


@pytest.mark.parametrize("temperature", [[0.0, 0.0, 0.0], [0.0, 0.8, 0.0], [1.0, 0.5, 2.0]])
def test_draw_is_sample_of_log_probs_token_for_token(temperature):
  """`draw` (argmax at run time when every row is greedy) equals `sample(log_probs)` with the
  same key, in all-greedy, mixed and sampled batches, ties and NaN rows included; the
  distribution `draw_with_dist` returns is `log_probs`' unless every row is greedy."""
  x = jax.random.normal(jax.random.key(3), (3, 4, 50))
  x = x.at[0, 1, 7].set(x[0, 1].max() + 1).at[0, 1, 9].set(x[0, 1].max() + 1)  # a tie
  x = x.at[2, 3].set(jnp.nan)
  params = SamplingParams.make(3, temperature=jnp.asarray(temperature), top_p=0.9)
  for seed in range(5):
    key = jax.random.key(seed)
    want = sample(key, log_probs(x, params))
    np.testing.assert_array_equal(jax.jit(sampling.draw)(key, x, params), want)
    tok, dist = jax.jit(sampling.draw_with_dist, static_argnums=3)(key, x, params, True)
    np.testing.assert_array_equal(tok, want)
    np.testing.assert_allclose(dist, log_probs(x, params), rtol=1e-6)  # other programs: ulps
  if max(temperature) > 0:
    np.testing.assert_allclose(sampling.draw_with_dist(key, x, params)[1], log_probs(x, params),
                               rtol=1e-6)
