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


def test_shipped_models_do_not_loop_on_the_demo_prompts():
  """Issue 14: greedy text on the demo prompts must not collapse into repetition within 32 tokens.

  Held to: at least half of the 3-grams of every continuation are distinct, for each model and
  for the ensemble of the two specialists (cross-entropy alone gave 0.07-0.43 at the worst prompt).
  """
  from jax_specens.cli.demo import PROMPTS
  tok = builtin_tokenizer()
  models = {name: builtin_model(name) for name in ("code", "prose", "draft")}
  rep = greedy_repetition({**models, "pair": [models["code"], models["prose"]]}, tok,
                          [p for _, p in PROMPTS], max_new_tokens=32)
  for name, r in rep.items():
    assert len(r["per_prompt"]) == len(PROMPTS) and len(r["texts"]) == len(PROMPTS)
    # every share is the function applied to the decoded tokens
    for ids, share in zip(r["tokens"], r["per_prompt"]):
      assert len(ids) == 32
      assert share == distinct_ngram_share(ids)
    assert r["min"] >= 0.5, (name, r["per_prompt"], r["texts"])
  md = repetition_table(rep, 32)
  assert "| draft |" in md and "| pair |" in md
