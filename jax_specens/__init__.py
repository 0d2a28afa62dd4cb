"""jax_specens: several LLMs decoding together — Speculative Ensemble, CoSD, speculative decoding."""

from jax_specens.cache import KVCache, check_fits, init_cache
from jax_specens.checkpoint import CheckpointError, load_model, load_tokenizer
from jax_specens.models import SUPPORTED_FAMILIES, ModelConfig, RopeConfig, Transformer
from jax_specens.models.model import Model, create_model
from jax_specens.step import forward, forward_prompt, prefill, step
from jax_specens.decoding.api import decode, decode_stream
from jax_specens.decoding import DecodeOutput, DecodeStats
from jax_specens.ensemble_fns import Ensemble, make_ensemble
from jax_specens.sampling import SamplingParams
from jax_specens.text import TextOutput, generate_text
from jax_specens import hugepages  # noqa: F401  (js.hugepages.collapse: a model built in memory)

__version__ = "0.1.0"
