"""The chat prompts shipped for distillation (`jax_specens.draft.prompts`), as a specification."""

import pytest

from jax_specens.cli.demo_real import CONTINUE, QUESTION
from jax_specens.draft.pipeline import DraftRecipe
from jax_specens.draft.prompts import FAMILIES, all_prompts, held_out_count, prompts


def test_families_partition_the_prompts_and_splits_partition_each_family():
  first, general, openings = (all_prompts(f) for f in ("first", "general", "openings"))
  assert all_prompts() == first + general + openings
  assert len(set(first + general + openings)) == len(first) + len(general) + len(openings)
  for family in FAMILIES:
    train, test = prompts("train", family), prompts("test", family)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(all_prompts(family))
    assert test, f"the {family} family has held-out prompts"


def test_the_earlier_phases_prompts_come_first():
  """`--chat-prompts 379` and `--eval-chat-prompts 27` name the first family's prompts, which the
  first two phases of the shipped drafts were trained and measured on; `--chat-prompts 820` the
  first two families (the SmolLM2 feature draft's third phase)."""
  assert len(prompts("train", "first")) == 379 and len(prompts("test", "first")) == 27
  assert prompts("train")[:379] == prompts("train", "first")
  assert prompts("test")[:27] == prompts("test", "first")
  assert prompts("train")[:820] == prompts("train", "first") + prompts("train", "general")


def test_the_held_out_prompts_by_default_are_those_of_the_families_trained_on():
  """A phase on every family is measured on every family's held-out prompts, the first phases'
  recipe (379 prompts of the first family) on the first family's 27 as before."""
  assert [held_out_count(n) for n in (0, 379, 380, 820, 1148)] == [0, 27, 78, 78, 116]
  assert held_out_count(328, "openings") == len(prompts("test", "openings")) == 38
  assert DraftRecipe().eval_chat_prompts == 27
  assert DraftRecipe(chat_prompts=1148).eval_chat_prompts == 116
  assert DraftRecipe(chat_prompts=1148, eval_chat_prompts=27).eval_chat_prompts == 27
  assert DraftRecipe().harvest_key()["eval_chat_prompts"] == 27  # older label caches still match


def test_the_demo_prompts_are_never_trained_on():
  assert QUESTION not in all_prompts() and CONTINUE not in all_prompts()


def test_an_unknown_family_is_named():
  with pytest.raises(ValueError, match="unknown prompt family 'stories'"):
    all_prompts("stories")
