"""decode_stream: one jitted loop step per iteration, yielding each row's newly accepted tokens;
the stream reassembles exactly what decode() returns."""

import numpy as np

from jax_specens.decoding.api import decode, decode_stream
from tests.decode_models import LENGTHS, PROMPTS, models

N = 10


def test_stream_reassembles_decode():
  ms = models()[:2]
  kw = dict(method="se", gamma=1, max_new_tokens=N, temperature=0.0)
  stream = decode_stream(ms, PROMPTS, LENGTHS, **kw)
  rows = [[] for _ in range(3)]
  steps = 0
  for new in stream:
    assert len(new) == 3 and any(new)
    for r, toks in zip(rows, new):
      r.extend(toks)
    steps += 1
  full = decode(ms, PROMPTS, LENGTHS, **kw)
  assert rows == full.to_lists()
  assert stream.output.to_lists() == rows
  assert stream.output.finish_reasons() == full.finish_reasons()
  np.testing.assert_array_equal(stream.output.stats.model_calls, full.stats.model_calls)
  assert steps == int(full.stats.steps) and steps <= N
