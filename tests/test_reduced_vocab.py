"""A reduced-vocabulary draft (ModelConfig.vocab_subset, EAGLE-3 style) keeps decoding lossless.

The draft's head scores K of the target's ids; its logits are `-inf` elsewhere, so q is zero
outside the subset. Specified here:
- the head: logits over the full vocabulary, `-inf` exactly outside the subset, equal to a full
  head's logits on it; config validation and the saved directory round trip;
- sampling (docs/algorithms.md §2-3): sd with such a draft follows the target, se follows the ensemble — a
  chi-square test on two generated tokens (V = 8, K = 5, many draws in one call), where the target
  puts much of its mass outside the subset; a rule that resamples only inside the draft's support
  fails the same test;
- greedy: sd / se tokens equal ar / ensemble tokens.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import ModelConfig, create_model
from jax_specens.acceptance import Verdict, verify
from jax_specens.checkpoint import load_model, save_model
from jax_specens.decoding.api import decode
from jax_specens.draft.model import init_from_target
from jax_specens.sampling import NEG_INF, sample
from tests.decode_models import LENGTHS, PROMPTS, _last_logits, config, models, scaled
from tests.test_decode_sampling import DRAWS, PREFIX, V, chi2_pvalue, exact_joint

SUBSET = (0, 2, 3, 6, 7)  # leaves out 5, the target's most likely first token


@functools.cache
def reduced_draft(vocab: int = V, subset=SUBSET, scale: float = 4.0):
  cfg = dataclasses.replace(config(vocab), vocab_subset=subset, tie_embeddings=False)
  return scaled(create_model(cfg, seed=5), scale)


def target8():
  return models(vocab=V, scale=4.0)[1]


def test_head_is_minus_inf_outside_the_subset_and_the_full_head_inside():
  target = models()[0]  # VOCAB 64, one layer, tied head
  ids = np.array([1, 4, 9, 16, 25, 36, 49, 63])
  draft = init_from_target(target, [0], ids)  # every weight copied: same network, K = 8 rows
  assert draft.config.vocab_subset == tuple(ids) and not draft.config.tie_embeddings
  full = np.asarray(_last_logits(target, PROMPTS, LENGTHS, 8))
  red = np.asarray(_last_logits(draft, PROMPTS, LENGTHS, 8))
  assert red.shape == full.shape
  outside = np.setdiff1d(np.arange(full.shape[-1]), ids)
  assert np.all(red[:, outside] == -np.inf)
  np.testing.assert_allclose(red[:, ids], full[:, ids], rtol=1e-5, atol=1e-5)


def test_tied_reduced_head_reads_the_embedding_rows():
  target = models()[0]
  ids = (3, 8, 40)
  tied = create_model(dataclasses.replace(target.config, vocab_subset=ids))
  tied = tied.replace(params=target.params)  # same parameters: the tied head has no own rows
  red = np.asarray(_last_logits(tied, PROMPTS, LENGTHS, 8))
  full = np.asarray(_last_logits(target, PROMPTS, LENGTHS, 8))
  np.testing.assert_allclose(red[:, ids], full[:, ids], rtol=1e-5, atol=1e-5)
  assert np.isinf(np.delete(red, ids, axis=1)).all()


@pytest.mark.parametrize("ids,msg", [((1, 1, 2), "1 repeats"), ((0, 64), "in \\[0, 64\\)"),
                                     ((-1, 3), "in \\[0, 64\\)")])
def test_bad_subset_is_rejected(ids, msg):
  with pytest.raises(ValueError, match=msg):
    dataclasses.replace(config(), vocab_subset=ids, tie_embeddings=False)


def test_saved_directory_round_trip(tmp_path):
  draft = reduced_draft()
  save_model(draft, tmp_path / "d")
  back = load_model(tmp_path / "d")
  assert back.config == draft.config
  assert ModelConfig.from_json(draft.config.to_json()).vocab_subset == SUBSET
  np.testing.assert_array_equal(_last_logits(back, PROMPTS % V, LENGTHS, 8),
                                _last_logits(draft, PROMPTS % V, LENGTHS, 8))


def test_the_test_has_power():
  """The target puts much mass outside the subset; the draft none (so q = 0 there)."""
  p = exact_joint([target8()], "select")
  outside = np.setdiff1d(np.arange(V), SUBSET)
  assert p[outside, :].sum() > 0.5
  q = exact_joint([reduced_draft()], "select")
  assert q[outside, :].sum() == 0 and q[:, outside].sum() == 0


def _draw(method, **kw):
  prompts = np.tile(PREFIX, (DRAWS, 1))
  lens = np.full((DRAWS,), 2, np.int32)
  if method == "sd":
    out = decode(target8(), prompts, lens, method="sd", draft=reduced_draft(), max_new_tokens=2,
                 temperature=1.0, key=jax.random.key(1), **kw)
  else:
    out = decode([reduced_draft(), target8()], prompts, lens, method="se", max_new_tokens=2,
                 temperature=1.0, key=jax.random.key(1), **kw)
  np.testing.assert_array_equal(out.lengths, 2)
  assert 0 < int(np.sum(out.stats.accepted)) < int(np.sum(out.stats.proposed))
  return np.asarray(out.tokens)


def test_sd_with_reduced_draft_follows_target():
  samples = _draw("sd", gamma=2)
  assert chi2_pvalue(samples, exact_joint([target8()], "select")) > 1e-3
  outside = ~np.isin(samples, SUBSET)
  assert outside.mean() > 0.2  # tokens the draft can never propose are emitted (by resampling)


def test_se_with_reduced_member_follows_ensemble():
  kw = dict(ensemble="wprob", weights=(0.3, 0.7), gamma=2)
  samples = _draw("se", **kw)
  assert chi2_pvalue(samples, exact_joint([reduced_draft(), target8()], "wprob",
                                          [0.3, 0.7])) > 1e-3


def resample_inside_support(key, tokens, logq, logr, num_valid) -> Verdict:
  """Deliberately WRONG: the replacement is drawn from the residual restricted to q > 0."""
  v = verify(key, tokens, logq, logr, num_valid)
  at = jnp.minimum(v.num_accepted, tokens.shape[1] - 1)[:, None, None]
  q_at = jnp.take_along_axis(logq, at, axis=1)[:, 0]
  r_at = jnp.take_along_axis(logr, at, axis=1)[:, 0]
  inside = jnp.where(jnp.isfinite(q_at), r_at, NEG_INF)
  return v.replace(token=jnp.where(v.num_accepted < tokens.shape[1],
                                   sample(jax.random.fold_in(key, 7), inside), v.token))


def test_a_rule_ignoring_tokens_outside_the_draft_support_fails():
  kw = dict(ensemble="wprob", weights=(0.5, 0.5), gamma=2)
  samples = _draw("se", acceptance_rule=resample_inside_support, **kw)
  assert chi2_pvalue(samples, exact_joint([reduced_draft(), target8()], "wprob",
                                          [0.5, 0.5])) < 1e-6


def test_greedy_sd_and_se_equal_ar_and_ensemble():
  target = models()[1]
  ids = tuple(range(0, 64, 2)) + (63,)
  draft = scaled(create_model(dataclasses.replace(config(), vocab_subset=ids,
                                                  tie_embeddings=False), seed=7), 15.0)
  ar = decode(target, PROMPTS, LENGTHS, method="ar", max_new_tokens=12, temperature=0.0)
  sd = decode(target, PROMPTS, LENGTHS, method="sd", draft=draft, gamma=3, max_new_tokens=12,
              temperature=0.0)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  ens = decode([draft, target], PROMPTS, LENGTHS, method="ensemble", weights=(0.4, 0.6),
               max_new_tokens=12, temperature=0.0)
  se = decode([draft, target], PROMPTS, LENGTHS, method="se", weights=(0.4, 0.6), gamma=2,
              max_new_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(se.tokens, ens.tokens)
  assert np.isin(np.asarray(ar.tokens), ids, invert=True).any()  # target leaves the subset


def test_contrastive_with_a_reduced_vocabulary_amateur_is_refused():
  """log p_amateur = -inf outside its subset: subtracting it would give +inf scores."""
  expert, amateur = target8(), reduced_draft()
  prompts, lengths = jnp.asarray([[1, 2, 3]], jnp.int32), jnp.asarray([3])
  with pytest.raises(ValueError, match="reduced vocabulary.*full-vocabulary amateur"):
    decode([expert, amateur], prompts, lengths, method="ensemble", ensemble="contrastive",
           max_new_tokens=2)
  # the reduced model as the expert is fine: its -inf only removes tokens
  out = decode([amateur, expert], prompts, lengths, method="ensemble", ensemble="contrastive",
               max_new_tokens=2, temperature=0.0)
  assert np.isin(np.asarray(out.tokens)[0, :2], SUBSET).all()
