"""Hugging Face checkpoints -> jax_specens checkpoints (safetensors only, nothing unpickled).

    from checkpoints_conversion import convert
    convert("path/to/hf_model", "path/to/out")      # or: jax-specens convert HF_DIR OUT_DIR

Modules: `hf_config` (config.json -> ModelConfig), `names` (per-family tensor name maps),
`tensors` (safetensors reading, single file or sharded), `converter` (validation, conversion, writing).
"""

from checkpoints_conversion.converter import convert, load_hf_model
from checkpoints_conversion.hf_config import config_from_hf, load_hf_config

__all__ = ["config_from_hf", "convert", "load_hf_config", "load_hf_model"]
