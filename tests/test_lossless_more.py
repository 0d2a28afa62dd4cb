"""Losslessness beyond the first two tokens at temperature 1 (docs/algorithms.md §2-3): sd follows the target and
se the ensemble's `r` over K = 3 generated tokens, with temperature != 1, top-k / top-p / min-p,
wlogit, a custom callable, a learned-weights ensemble, a batch mixing greedy and sampled rows, and a
sliding-window soft-capped gemma2 model in bfloat16.

Reference: the exact joint P(x1, x2, x3 | prefix) of `r`, by enumerating every prefix (V = 8: 1 + 8
+ 64 prefixes, 512 cells), each model run over the whole prefix from scratch (no cache) and `r`
taken from the ensemble's own definition (`Ensemble.target`: what decode is lossless *to*; the
filters and ensemble kinds themselves are specified in tests/test_sampling.py and
tests/test_ensemble_fns.py). Draws: one decode call over DRAWS identical prompts per case.

Negative control: `JAX_SPECENS_WRONG_RULE=accept_all` (or `resample_from_target`) swaps in a wrong
acceptance rule of tests/wrong_rules.py; every test here must then fail:
    JAX_SPECENS_WRONG_RULE=accept_all python -m pytest tests/test_lossless_more.py
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jax_specens import ModelConfig, create_model, sampling
from jax_specens.decoding.api import decode, prepare
from jax_specens.fusion.head import HeadConfig, init_head
from jax_specens.fusion.learned import LearnedEnsemble
from tests import wrong_rules
from tests.decode_models import _last_logits, models, scaled

V, K, DRAWS = 8, 3, 4000
PREFIX = np.array([3, 5], np.int32)
WRONG = os.environ.get("JAX_SPECENS_WRONG_RULE")
RULE = {"accept_all": wrong_rules.verify_accept_all,
        "resample_from_target": wrong_rules.verify_resample_from_target}.get(WRONG)


def vocab8():
  return models(vocab=V, scale=4.0)


@functools.cache
def gemma2_bf16():
  """Two tiny gemma2 models: a sliding window of 2 on layer 0 (the 5-token contexts here are
  longer), attention and final logit soft-capping, (1 + w) norms, bfloat16 parameters."""
  cfg = ModelConfig(family="gemma2", vocab_size=V, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=64, norm_plus_one=True, post_norms=True,
                    activation="gelu_tanh", layer_types=("sliding", "full"), sliding_window=2,
                    attn_softcap=5.0, final_softcap=3.0, embed_scale=True)
  return tuple(scaled(create_model(cfg, seed=s, dtype=jnp.bfloat16), 4.0) for s in (0, 1))


def exact_joint(ms, method, **kw) -> np.ndarray:
  """P(x1..xK | PREFIX) of decode's target `r` for these arguments, `[V] * K`."""
  args, kwargs = _args(ms, method, 1, **kw)
  ordered, req, _, _ = prepare(*args, **kwargs)
  ens, sp = req.ensemble, req.sampling
  joint = np.ones(())
  for j in range(K):
    tails = np.stack(np.meshgrid(*[np.arange(V)] * j, indexing="ij"), -1).reshape(-1, j) if j \
        else np.zeros((1, 0), np.int32)
    seqs = np.concatenate([np.tile(PREFIX, (len(tails), 1)), tails], 1).astype(np.int32)
    lens = jnp.full((len(seqs),), seqs.shape[1], jnp.int32)
    logits = jnp.stack([_last_logits(m, jnp.asarray(seqs), lens, len(PREFIX) + K)
                        for m in ordered]).astype(jnp.float32)
    rows = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[:1], (len(seqs),)), sp)
    r = np.exp(np.asarray(ens.target(logits, rows), np.float64))
    r = r / r.sum(-1, keepdims=True)
    joint = joint[..., None] * r.reshape((V,) * j + (V,))
  return joint


def _args(ms, method, n, **kw):
  prompts = np.tile(PREFIX, (n, 1))
  lens = np.full((n,), len(PREFIX), np.int32)
  if method == "sd":
    return (ms[1], prompts, lens), dict(method="sd", draft=ms[0], max_new_tokens=K, **kw)
  return (list(ms), prompts, lens), dict(method=method, max_new_tokens=K, **kw)


def draw(ms, method, seed=0, **kw) -> np.ndarray:
  args, kwargs = _args(ms, method, DRAWS, key=jax.random.key(seed), **kw)
  if RULE is not None:
    kwargs["acceptance_rule"] = RULE
  out = decode(*args, **kwargs)
  np.testing.assert_array_equal(out.lengths, K)
  if RULE is None:  # speculation was exercised: some proposals accepted, some not
    assert 0 < int(np.sum(out.stats.accepted)) < int(np.sum(out.stats.proposed))
  return np.asarray(out.tokens)


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square of `samples [n, K]` against the joint `probs [V]*K`; cells expected < 5
  times are pooled into one."""
  counts = np.zeros(probs.shape)
  np.add.at(counts, tuple(samples.T), 1)
  exp, obs = probs.reshape(-1) * len(samples), counts.reshape(-1)
  assert obs[exp == 0].sum() == 0, "a token of probability 0 was drawn"
  small = exp < 5
  pooled = exp[small].sum()
  exp, obs = exp[~small], obs[~small]
  if pooled > 0:
    exp, obs = np.append(exp, pooled), np.append(obs, counts.reshape(-1)[small].sum())
  return float(stats.chisquare(obs, exp).pvalue)


def custom_fn(logits, params):
  """A user ensemble: the sampling distribution of (l_0 + 2 l_1) / 3."""
  return sampling.log_probs((logits[0] + 2.0 * logits[1]) / 3.0, params)


CASES = {  # name: (models, method, decode kwargs)
    "sd-T0.7": (lambda: vocab8()[:2], "sd", dict(gamma=2, temperature=0.7)),
    "sd-topk3-T1.5": (lambda: vocab8()[:2], "sd", dict(gamma=3, temperature=1.5, top_k=3)),
    "se-wprob-topp0.8": (lambda: vocab8()[:2], "se",
                         dict(gamma=2, ensemble="wprob", weights=(0.3, 0.7), top_p=0.8)),
    "se-wlogit-minp0.15-T0.8": (lambda: vocab8()[:2], "se",
                                dict(gamma=(1, 2), ensemble="wlogit", temperature=0.8,
                                     min_p=0.15)),
    "se-custom-callable": (lambda: vocab8()[:2], "se", dict(gamma=2, ensemble=custom_fn)),
    "se-learned-weights-3": (lambda: vocab8(), "se", dict(
        gamma=(1, 2, 1), ensemble=LearnedEnsemble(init_head(
            HeadConfig(kind="weights", num_models=3, hidden_size=8), seed=3)))),
    "sd-gemma2-bf16": (gemma2_bf16, "sd", dict(gamma=2, temperature=0.9)),
    # (no top-k here: bf16 rounding may order near-tied logits differently in the cached decode
    # and the from-scratch reference; filters are covered in float32 above)
    "se-gemma2-bf16": (gemma2_bf16, "se", dict(gamma=2, ensemble="wprob", temperature=1.1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_three_tokens_follow_the_target(name):
  ms_fn, method, kw = CASES[name]
  ms = ms_fn()
  probs = exact_joint(ms, method, **kw)
  assert probs.max() < 0.5  # spread out: the test has power
  samples = draw(ms, method, **kw)
  p = chi2_pvalue(samples, probs)
  assert p > 1e-3, f"{name}: p = {p:.2e}"


def test_batch_mixing_greedy_and_sampled_rows():
  """Per-row temperature: rows 0, 2, 4, ... greedy (equal to the greedy reference, every one),
  rows 1, 3, ... sampled at temperature 1.2 (chi-square against the joint)."""
  ms = vocab8()[:2]
  kw = dict(gamma=2, ensemble="wprob", weights=(0.4, 0.6))
  temps = np.where(np.arange(DRAWS) % 2 == 0, 0.0, 1.2).astype(np.float32)
  samples = draw(ms, "se", temperature=temps, **kw)
  greedy = exact_joint(ms, "se", temperature=0.0, **kw)  # one-hot at the greedy sequence
  expected = np.unravel_index(np.argmax(greedy), greedy.shape)
  assert greedy.max() == pytest.approx(1.0)
  np.testing.assert_array_equal(samples[0::2], np.tile(expected, (DRAWS // 2, 1)))
  p = chi2_pvalue(samples[1::2], exact_joint(ms, "se", temperature=1.2, **kw))
  assert p > 1e-3, f"p = {p:.2e}"
