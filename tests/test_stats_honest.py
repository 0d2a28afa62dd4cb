"""Statistics count only what is emitted (docs/algorithms.md §6): a stop id inside a speculated window, or the
`max_new_tokens` limit, cuts the accepted run, and the tokens after the cut are neither accepted
nor proposed.

Shapes and static arguments (B=3, T=5, N=10, stop ids [3, 1]) match tests/test_decode_stats.py.
"""

import jax
import numpy as np
import pytest

from jax_specens.decoding.api import decode
from tests.decode_models import LENGTHS, PROMPTS, models

N = 10
GREEDY = dict(max_new_tokens=N, temperature=0.0)


def stops_at(free: list[list[int]], where: list[int | None]) -> tuple[np.ndarray, list[int]]:
  """Stop ids `[B, 1]` that end row b at its token `where[b]` (None: no stop), and the lengths the
  rows then have (the first occurrence of the stop id counts)."""
  ids, lengths = [], []
  for row, w in zip(free, where):
    if w is None:
      ids.append([-1])
      lengths.append(N)
    else:
      ids.append([row[w]])
      lengths.append(row.index(row[w]) + 1)
  return np.array(ids, np.int32), lengths


@pytest.mark.parametrize("where", [[None, None, None], [1, 5, None]], ids=["length", "stops"])
def test_sd_counts_only_emitted_draft_tokens(where):
  """Identical draft and target, greedy, gamma 3: every round emits 3 draft tokens and the
  target's bonus token, so the first L tokens of a row hold L - L // 4 draft tokens; max_new_tokens
  (10 = 4 + 4 + 2) and stop ids cut the last window."""
  a = models()[0]
  free = decode(a, PROMPTS, LENGTHS, method="ar", **GREEDY).to_lists()
  stop_ids, lens = stops_at(free, where)
  out = decode(a, PROMPTS, LENGTHS, method="sd", draft=a, gamma=3, stop_ids=stop_ids, **GREEDY)
  assert [len(r) for r in out.to_lists()] == lens
  expected = sum(n - n // 4 for n in lens)
  assert int(out.stats.accepted[0]) == expected
  assert int(out.stats.proposed[0]) == expected  # nothing rejected: nothing lost
  assert int(out.stats.rejections) == 0


@pytest.mark.parametrize("where", [[None, None, None], [2, 4, None]], ids=["length", "stops"])
def test_se_identical_members_accept_exactly_the_emitted_tokens(where):
  a = models()[0]
  free = decode([a, a], PROMPTS, LENGTHS, method="ensemble", **GREEDY).to_lists()
  stop_ids, lens = stops_at(free, where)
  out = decode([a, a], PROMPTS, LENGTHS, method="se", gamma=3, stop_ids=stop_ids, **GREEDY)
  assert [len(r) for r in out.to_lists()] == lens
  assert int(np.sum(out.stats.accepted)) == sum(lens)
  assert int(np.sum(out.stats.proposed)) == sum(lens)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_se_every_emitted_token_is_an_accepted_proposal_or_a_residual(temperature):
  """With different members: sum(accepted) + rejections == emitted tokens, exactly, with stop ids
  inside windows and the last window cut at max_new_tokens."""
  ms = models()[:2]
  kw = dict(max_new_tokens=N, temperature=temperature, key=jax.random.key(3))
  free = decode(ms, PROMPTS, LENGTHS, method="ensemble", **kw).to_lists()
  stop_ids, _ = stops_at(free, [3, 6, None])
  for stops in (None, stop_ids):
    out = decode(ms, PROMPTS, LENGTHS, method="se", gamma=3, stop_ids=stops, **kw)
    st = out.stats
    assert int(np.sum(st.accepted)) + int(st.rejections) == int(np.sum(out.lengths))
    assert np.all(np.asarray(st.accepted) <= np.asarray(st.proposed))


@pytest.mark.parametrize("where", [[None, None, None], [1, 4, None]], ids=["length", "stops"])
def test_cosd_identical_models_propose_only_up_to_the_cut(where):
  """Draft == assistant, greedy: nothing is ever replaced; windows of 3 and N = 10 = 3 + 3 + 3 + 1
  cut the last window (and stop ids cut earlier ones)."""
  a = models()[0]
  free = decode(a, PROMPTS, LENGTHS, method="ar", **GREEDY).to_lists()
  stop_ids, lens = stops_at(free, where)
  out = decode(a, PROMPTS, LENGTHS, method="cosd", draft=a, gamma=3, stop_ids=stop_ids, **GREEDY)
  assert [len(r) for r in out.to_lists()] == lens
  st = out.stats
  assert int(st.accepted[0]) == int(st.proposed[0]) == sum(lens)
  assert int(st.accepted[1]) == int(st.proposed[1]) == 0
  assert int(st.rejections) == 0
