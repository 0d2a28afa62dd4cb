"""Flax NNX decoder-only transformer covering the supported Hugging Face families."""

from jax_specens.models.config import SUPPORTED_FAMILIES, ModelConfig, RopeConfig
from jax_specens.models.transformer import Transformer

__all__ = ["SUPPORTED_FAMILIES", "ModelConfig", "RopeConfig", "Transformer"]
