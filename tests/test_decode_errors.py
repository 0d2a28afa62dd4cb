"""Bad arguments to decode() raise a ValueError that names the problem and the fix, before anything
is traced or compiled (the jitted loop is replaced by a function that fails if reached)."""

import numpy as np
import pytest

from jax_specens.decoding.api import decode
from jax_specens.decoding import api as decoding_api
from tests.decode_models import LENGTHS, PROMPTS, models


@pytest.fixture(autouse=True)
def no_tracing(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("decode reached the jitted loop with bad arguments")
  monkeypatch.setattr(decoding_api, "_generate", fail)


def a():
  return models()[0]


def b():
  return models()[1]


CASES = {
    "vocab": (lambda: decode([a(), models(vocab=8)[0]], PROMPTS % 8, LENGTHS, method="se",
                             max_new_tokens=4), "use cross-tokenizer CoSD: jax_specens.fusion.cosd_text"),
    "gamma0": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="se", gamma=0,
                              max_new_tokens=4), "gamma must be >= 1"),
    "gamma_count": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="se", gamma=(1, 2, 3),
                                   max_new_tokens=4), "one speculation length per model"),
    "sd_gamma_seq": (lambda: decode(a(), PROMPTS, LENGTHS, method="sd", draft=b(),
                                    gamma=(1, 2), max_new_tokens=4), "sd takes one gamma"),
    "negative_weight": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="se",
                                       weights=(1.5, -0.5), max_new_tokens=4), ">= 0 and sum to 1"),
    "weights_sum": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="ensemble",
                                   weights=(0.5, 0.2), max_new_tokens=4), "w / sum(w)"),
    "weights_count": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="ensemble",
                                     weights=(1.0,), max_new_tokens=4), "one weight per model"),
    "temperature": (lambda: decode(a(), PROMPTS, LENGTHS, temperature=-0.5, max_new_tokens=4),
                    "temperature must be >= 0"),
    "temperature_row": (lambda: decode(a(), PROMPTS, LENGTHS, temperature=[1.0, -1.0, 0.0],
                                       max_new_tokens=4), "temperature must be >= 0"),
    "top_p0": (lambda: decode(a(), PROMPTS, LENGTHS, top_p=0.0, max_new_tokens=4),
               "top_p must be in (0, 1]"),
    "top_p_big": (lambda: decode(a(), PROMPTS, LENGTHS, top_p=1.5, max_new_tokens=4),
                  "top_p must be in (0, 1]"),
    "top_k": (lambda: decode(a(), PROMPTS, LENGTHS, top_k=-1, max_new_tokens=4), "top_k"),
    "empty_prompt": (lambda: decode(a(), PROMPTS, [5, 0, 1], max_new_tokens=4),
                     "empty prompt in rows [1]"),
    "length_too_long": (lambda: decode(a(), PROMPTS, [6, 2, 1], max_new_tokens=4),
                        "exceed the padded width"),
    "cache": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="se", gamma=2,
                             max_new_tokens=8, cache_len=16), "cache_len >= 17"),
    "prompt_rank": (lambda: decode(a(), PROMPTS[0], LENGTHS, max_new_tokens=4),
                    "[batch, length]"),
    "token_range": (lambda: decode(a(), PROMPTS + 60, LENGTHS, max_new_tokens=4),
                    "token ids must be in [0, 64)"),
    "max_new": (lambda: decode(a(), PROMPTS, LENGTHS, max_new_tokens=0),
                "max_new_tokens must be a positive int"),
    "method": (lambda: decode(a(), PROMPTS, LENGTHS, method="beam", max_new_tokens=4),
               "unknown method 'beam'"),
    "sd_no_draft": (lambda: decode(a(), PROMPTS, LENGTHS, method="sd", max_new_tokens=4),
                    "needs a draft model"),
    "se_one_model": (lambda: decode([a()], PROMPTS, LENGTHS, method="se", max_new_tokens=4),
                     "at least 2 models"),
    "ensemble_kind": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="ensemble",
                                     ensemble="median", max_new_tokens=4), "unknown ensemble"),
    "ar_weights": (lambda: decode(a(), PROMPTS, LENGTHS, weights=(1.0,), max_new_tokens=4),
                   "do not apply"),
    "stop_shape": (lambda: decode(a(), PROMPTS, LENGTHS, stop_ids=np.zeros((2, 1)),
                                  max_new_tokens=4), "stop_ids must be"),
    "option": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="se", beam=3,
                              max_new_tokens=4), "unknown options for method 'se'"),
    "plausibility": (lambda: decode([a(), b()], PROMPTS, LENGTHS, method="ensemble",
                                    ensemble="contrastive", plausibility=2.0, max_new_tokens=4),
                     "plausibility must be in [0, 1]"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_raises_before_tracing(name):
  call, message = CASES[name]
  with pytest.raises(ValueError) as e:
    call()
  assert message in str(e.value)
