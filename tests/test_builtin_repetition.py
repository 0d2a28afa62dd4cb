"""The distinct 3-gram share that `eval-fusion` reports for greedy text of the built-in models."""

import pytest

from jax_specens.builtin import builtin_model, builtin_tokenizer
from jax_specens.builtin.repetition import distinct_ngram_share, greedy_repetition
from jax_specens.cli.eval_fusion import repetition_table


def test_share_of_distinct_trigrams():
  assert distinct_ngram_share([1, 2, 3, 4, 5]) == 1.0
  assert distinct_ngram_share([7] * 32) == pytest.approx(1 / 30)
  assert distinct_ngram_share([1, 2, 3, 1, 2, 3, 1]) == pytest.approx(3 / 5)
  assert distinct_ngram_share([1, 2]) == 1.0


def test_greedy_repetition_of_builtin_models():
  tok = builtin_tokenizer()
  models = {"draft": builtin_model("draft")}
  rep = greedy_repetition({**models, "pair": [builtin_model("code"), builtin_model("prose")]},
                          tok, ["Return the number of", "import os\n"], max_new_tokens=12)
  for r in rep.values():
    assert len(r["per_prompt"]) == 2 and len(r["texts"]) == 2
    assert 0 < r["min"] <= r["mean"] <= 1
    # every share is the function applied to the decoded tokens
    for ids, share in zip(r["tokens"], r["per_prompt"]):
      assert len(ids) == 12
      assert share == distinct_ngram_share(ids)
  md = repetition_table(rep, 12)
  assert "| draft |" in md and "| pair |" in md
