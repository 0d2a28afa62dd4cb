"""Deliberately WRONG acceptance rules (same signature as `jax_specens.acceptance.verify`).

The distribution tests run these through `decode(..., acceptance_rule=...)` to show that they detect
a broken rule: a test that passes for these would be a test that cannot fail.
"""

import jax
import jax.numpy as jnp

from jax_specens.acceptance import Verdict, _first_rejection, verify
from jax_specens.sampling import sample


def verify_accept_all(key, tokens, logq, logr, num_valid) -> Verdict:
  """A deliberately WRONG rule (accepts every proposal): the output then follows q, not r.
  Exists so tests can show that the distribution tests detect a broken acceptance rule."""
  ok = jnp.ones(tokens.shape, bool)
  return _first_rejection(key, ok, logq, logr, num_valid)


def verify_resample_from_target(key, tokens, logq, logr, num_valid) -> Verdict:
  """A deliberately WRONG rule: correct acceptance test, but the replacement is drawn from r
  instead of the residual, which over-weights tokens q already favours."""
  v = verify(key, tokens, logq, logr, num_valid)
  g = tokens.shape[1]
  at = jnp.minimum(v.num_accepted, g - 1)[:, None, None]
  r_at = jnp.take_along_axis(logr, at, axis=1)[:, 0]
  return v.replace(token=sample(jax.random.fold_in(key, 7), r_at))
