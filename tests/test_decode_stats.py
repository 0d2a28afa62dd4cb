"""What a decode reports (docs/algorithms.md §6): finish reasons, stop ids, model calls, proposed / accepted.

Shapes and static arguments match tests/test_decode_greedy.py, so a full run reuses its programs.
"""

import jax
import numpy as np
import pytest

from jax_specens.decoding.api import decode
from tests.decode_models import LENGTHS, PROMPTS, models

N = 10


def test_identical_models_accept_every_proposal():
  a = models()[0]
  out = decode([a, a], PROMPTS, LENGTHS, method="se", gamma=1, max_new_tokens=N,
               temperature=1.0, key=jax.random.key(1))
  st = out.stats
  assert int(np.sum(st.proposed)) > 0
  np.testing.assert_array_equal(st.accepted, st.proposed)
  assert out.stats.acceptance_rate == 1.0
  assert int(st.rejections) == 0
  # every pass verifies the other model's proposal and proposes one: ~N/2 calls per model
  assert max(np.asarray(st.model_calls)) <= N // 2 + 1
  np.testing.assert_array_equal(out.lengths, N)


def test_sd_identical_draft_gets_bonus_tokens():
  a = models()[0]
  out = decode(a, PROMPTS, LENGTHS, method="sd", draft=a, gamma=3, max_new_tokens=N,
               temperature=0.0)
  st = out.stats
  np.testing.assert_array_equal(st.accepted, st.proposed)
  # each target pass accepts gamma draft tokens and adds its bonus token: gamma + 1 per call
  assert int(st.model_calls[1]) <= -(-N // 4) + 1
  assert st.mean_accepted_length == pytest.approx(int(st.accepted[0]) / int(st.rounds))


@pytest.mark.parametrize("n,kind", [(2, "wprob"), (3, "wlogit")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_se_gamma1_never_more_calls_than_ensemble(n, kind, temperature):
  ms = models()[:n]
  kw = dict(ensemble=kind, max_new_tokens=N, temperature=temperature, key=jax.random.key(2))
  ens = decode(ms, PROMPTS, LENGTHS, method="ensemble", **kw)
  se = decode(ms, PROMPTS, LENGTHS, method="se", gamma=1, **kw)
  np.testing.assert_array_equal(ens.stats.model_calls, N)  # the baseline: one call per token
  np.testing.assert_array_equal(se.lengths, N)
  # every scoring pass emits a token per row: at worst (all rejected) one call per model per token
  assert np.all(np.asarray(se.stats.model_calls) <= np.asarray(ens.stats.model_calls))
  # proposals are lost only through rejections, and each rejection loses at least the rejected one
  lost = int(np.sum(se.stats.proposed) - np.sum(se.stats.accepted))
  assert (int(se.stats.rejections) > 0) == (lost > 0)
  assert int(se.stats.rejections) <= min(lost, int(se.stats.rounds))


def test_stop_ids_per_row_and_finish_reasons():
  a = models()[0]
  free = decode(a, PROMPTS, LENGTHS, method="ar", max_new_tokens=N, temperature=0.0).to_lists()
  # row 0 stops at its 4th token, row 1 at its 1st; row 2's stop id never occurs
  never = next(t for t in range(64) if t not in free[2])
  stop_ids = np.array([[-1, free[0][3]], [free[1][0], -1], [never, -1]], np.int32)
  out = decode(a, PROMPTS, LENGTHS, method="ar", max_new_tokens=N, temperature=0.0,
               stop_ids=stop_ids)
  first0 = free[0].index(free[0][3]) + 1
  assert out.to_lists() == [free[0][:first0], free[1][:1], free[2]]
  assert out.finish_reasons() == ["stop", "stop", "length"]
  np.testing.assert_array_equal(np.asarray(out.tokens)[1, 1:], 0)  # past the length: zeros
  d = out.to_dict()
  assert d["lengths"] == [first0, 1, N] and d["stats"]["wall_time_s"] > 0


def test_stop_inside_a_speculated_window():
  """A stop id among several accepted tokens ends the row there: sd == ar and se == ensemble with
  the same stop ids (the tokens accepted after it are dropped)."""
  ms = models()[:2]
  greedy = dict(max_new_tokens=N, temperature=0.0)
  free = decode(ms[0], PROMPTS, LENGTHS, method="ar", **greedy).to_lists()
  stops = [[free[0][4]], [free[1][1]], [-1]]
  ar = decode(ms[0], PROMPTS, LENGTHS, method="ar", stop_ids=stops, **greedy)
  sd = decode(ms[0], PROMPTS, LENGTHS, method="sd", draft=ms[1], gamma=3, stop_ids=stops,
              **greedy)
  assert sd.to_lists() == ar.to_lists()
  assert sd.finish_reasons() == ar.finish_reasons() == ["stop", "stop", "length"]
  free = decode(ms, PROMPTS, LENGTHS, method="ensemble", **greedy).to_lists()
  stops = [[free[0][2]], [free[1][5]], [-1]]
  ens = decode(ms, PROMPTS, LENGTHS, method="ensemble", stop_ids=stops, **greedy)
  se = decode(ms, PROMPTS, LENGTHS, method="se", gamma=1, stop_ids=stops, **greedy)
  assert se.to_lists() == ens.to_lists()
  assert se.finish_reasons() == ens.finish_reasons()
  assert ens.finish_reasons()[0] == "stop"
