"""`jax_specens.check_fits`: a prompt plus its new tokens must fit the cache, checked up front."""

import numpy as np
import pytest

from jax_specens import check_fits


def test_exact_fit_passes():
  check_fits(prompt_len=10, max_new_tokens=6, cache_len=16)
  check_fits(np.array([3, 10, 7]), max_new_tokens=2, cache_len=16, slack=4)


def test_one_token_too_many_names_the_numbers_and_the_fix():
  with pytest.raises(ValueError) as info:
    check_fits(prompt_len=10, max_new_tokens=7, cache_len=16)
  message = str(info.value)
  assert "prompt of 10 tokens + max_new_tokens=7 = 17 tokens" in message
  assert "cache of 16 slots" in message and "cache_len >= 17" in message


def test_longest_row_and_speculation_slack_count():
  with pytest.raises(ValueError, match="prompt of 12 tokens"):
    check_fits(np.array([3, 12, 7]), max_new_tokens=5, cache_len=16)
  with pytest.raises(ValueError, match=r"\+ 5 slots of speculation slack = 17"):
    check_fits(prompt_len=10, max_new_tokens=2, cache_len=16, slack=5)
