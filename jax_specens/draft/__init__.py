"""Distilled drafts: a few of a target's layers and a reduced vocabulary (`jax-specens
train-draft`). `train_draft(target_dir, out_dir)` writes an ordinary model directory."""

from jax_specens.draft.model import draft_config, init_from_target, own_bytes
from jax_specens.draft.pipeline import DraftRecipe, train_draft
from jax_specens.draft.train import TrainConfig, evaluate

__all__ = ["DraftRecipe", "TrainConfig", "draft_config", "evaluate", "init_from_target",
           "own_bytes", "train_draft"]
