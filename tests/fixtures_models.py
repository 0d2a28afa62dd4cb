"""Tiny random-init Hugging Face models of every family, saved as safetensors and converted.

`hf_zoo` (session) builds a case of `CASES` on first use: a PyTorch `*ForCausalLM` from
`transformers` with every parameter randomised (norm weights and biases too, so a swapped mapping
cannot hide), `save_pretrained` into a temporary directory with a small word-level tokenizer,
converted with `checkpoints_conversion.convert` and loaded back with `jax_specens.load_model`.

    def test_x(hf_zoo):
      case = hf_zoo["llama-gqa-llama3-bias-untied"]
      case.torch_model, case.hf_dir, case.out_dir, case.model, case.config

Nothing is downloaded. Weights are scaled up (std 0.3) so that logits are spread out: greedy
decoding then has no near-ties, and a random model does not collapse to one repeated token.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
GPT2_COMMON = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
WEIGHT_STD = 0.3
VECTOR_STD = 0.2

# name -> (model_type, config kwargs on top of COMMON, save_pretrained kwargs)
CASES: dict[str, tuple[str, dict, dict]] = {
    "llama-gqa-llama3-bias-untied": ("llama", dict(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32)), dict(max_shard_size="40KB")),
    "llama-mqa-linear-tied-hd16": ("llama", dict(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)), {}),
    "mistral-gqa-window5-untied": ("mistral", dict(
        num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False), {}),
    "mistral-mha-tied-hd16": ("mistral", dict(
        num_key_value_heads=4, head_dim=16, sliding_window=None, tie_word_embeddings=True), {}),
    "qwen2-gqa-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), {}),
    "qwen2-mqa-window-layers-untied": ("qwen2", dict(
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        tie_word_embeddings=False), {}),
    "qwen3-qknorm-tied-hd16": ("qwen3", dict(
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True), {}),
    "qwen3-bias-mqa-window-untied": ("qwen3", dict(
        num_key_value_heads=1, head_dim=8, attention_bias=True, use_sliding_window=True,
        sliding_window=6, max_window_layers=1, tie_word_embeddings=False), {}),
    "gemma-mqa-hd16-tied": ("gemma", dict(num_key_value_heads=1, head_dim=16), {}),
    "gemma-gqa-gelu-untied": ("gemma", dict(
        num_key_value_heads=2, head_dim=8, hidden_act="gelu", tie_word_embeddings=False), {}),
    "gemma2-softcap-window-tied": ("gemma2", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0), {}),
    "gemma2-nocap-mqa-untied": ("gemma2", dict(
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
        attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False,
        layer_types=["full_attention", "sliding_attention"]), {}),
    "gemma3-local-rope-tied": ("gemma3_text", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                            "factor": 4.0}}), {}),
    "gemma3-softcap-mqa-untied": ("gemma3_text", dict(
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["full_attention", "sliding_attention"], attn_logit_softcapping=6.0,
        final_logit_softcapping=4.0, tie_word_embeddings=False), {}),
    "phi3-gqa-partial-rotary-untied": ("phi3", dict(
        num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=False), {}),
    "phi3-mha-window-tied": ("phi3", dict(
        num_key_value_heads=4, partial_rotary_factor=0.75, sliding_window=6,
        tie_word_embeddings=True), {}),
    "gpt2-tied": ("gpt2", {}, {}),
    "gpt2-inner48-untied-sharded": ("gpt2", dict(n_inner=48, tie_word_embeddings=False),
                                    dict(max_shard_size="20KB")),
}
FAMILY_OF = {name: case[0] for name, case in CASES.items()}

WORDS = ("the a cat dog sat ran on under mat tree and then it was big small red blue one two "
         "three def return if else for in x y z = ( ) : . , + - * import print self class "
         "while not").split()


@dataclasses.dataclass
class Converted:
  """One case: the PyTorch model and its converted, reloaded twin."""

  name: str
  family: str
  torch_model: object  # transformers PreTrainedModel (eval mode, float32)
  hf_dir: Path
  out_dir: Path
  model: object  # jax_specens.Model loaded from out_dir in float32

  @property
  def config(self):
    return self.model.config


@contextlib.contextmanager
def one_torch_thread():
  """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def hf_config(model_type: str, overrides: dict):
  """A `transformers` config of `model_type` with the tiny common sizes plus `overrides`."""
  from transformers import AutoConfig
  base = GPT2_COMMON if model_type == "gpt2" else COMMON
  return AutoConfig.for_model(model_type, **{**base, **overrides})


def randomise_(torch_model, seed: int) -> None:
  """Every matrix ~ N(0, WEIGHT_STD); every vector (norm weight, bias) gets N(0, VECTOR_STD) added."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(torch_model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise * WEIGHT_STD)
      else:
        p.add_(noise * VECTOR_STD)


def build_hf_model(model_type: str, overrides: dict, seed: int = 0):
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(hf_config(model_type, overrides),
                                           attn_implementation="eager").eval()
  randomise_(model, seed)
  return model


def save_tokenizer(directory: Path) -> None:
  """A word-level tokenizer over WORDS (ids < VOCAB), saved as tokenizer.json + config."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
  assert len(vocab) <= VOCAB
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(str(directory))


class Zoo:
  """Lazily built, session-cached converted models (see module docstring)."""

  def __init__(self, root: Path):
    self.root = root
    self._cases: dict[str, Converted] = {}

  def __getitem__(self, name: str) -> Converted:
    if name not in self._cases:
      self._cases[name] = self._build(name)
    return self._cases[name]

  def _build(self, name: str) -> Converted:
    from checkpoints_conversion import convert
    import jax_specens
    model_type, overrides, save_kwargs = CASES[name]
    hf_dir, out_dir = self.root / "hf" / name, self.root / "converted" / name
    with one_torch_thread():
      torch_model = build_hf_model(model_type, overrides, seed=sorted(CASES).index(name))
      torch_model.save_pretrained(str(hf_dir), **save_kwargs)
    save_tokenizer(hf_dir)
    convert(hf_dir, out_dir, dtype="float32", progress=False)
    return Converted(name, model_type, torch_model, hf_dir, out_dir,
                     jax_specens.load_model(out_dir))


@pytest.fixture(scope="session")
def hf_zoo(tmp_path_factory) -> Zoo:
  return Zoo(tmp_path_factory.mktemp("hf_zoo"))
