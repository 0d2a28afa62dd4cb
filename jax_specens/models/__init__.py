"""Flax NNX decoder-only transformer covering the supported Hugging Face families."""

from jax_specens.models.config import SUPPORTED_FAMILIES, ModelConfig, RopeConfig
from jax_specens.models.transformer import Transformer
from jax_specens.models.model import Model, create_model, from_module
from jax_specens.models.layout import rows_major, scanned, unrolled

__all__ = ["SUPPORTED_FAMILIES", "Model", "ModelConfig", "RopeConfig", "Transformer", "create_model",
           "from_module", "rows_major", "scanned", "unrolled"]
