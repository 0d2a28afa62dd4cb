"""`jax-specens convert HF_DIR|FILE.gguf OUT_DIR`: a Hugging Face checkpoint or a GGUF -> ours."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert a Hugging Face causal LM directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) or a GGUF file (llama.cpp's format; architectures llama, qwen2, qwen3
and gemma3) into a jax_specens checkpoint directory (jax_specens.json, orbax params/, tokenizer and
generation_config files).

Hugging Face model_type: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2.
Only safetensors are read; pickled .bin files are never loaded. A GGUF is dequantized (F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*, ...), and its tokenizer, chat template and
end-of-turn ids are written from its metadata. Every tensor name and shape is checked against
the config before anything is written, and OUT_DIR appears only once it is complete.

examples:  jax-specens convert ~/hf/Qwen2.5-0.5B ./qwen2.5-0.5b --dtype bfloat16
           jax-specens convert SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
load it:   jax_specens.load_model("./smollm2"), jax_specens.load_tokenizer("./smollm2")
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "convert", help="convert a Hugging Face checkpoint (safetensors) or a GGUF file",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("hf_dir", metavar="HF_DIR|FILE.gguf",
                 help="Hugging Face model directory (from save_pretrained or a Hub snapshot), or "
                 "a .gguf file")
  p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist yet)")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="storage dtype of the parameters, which load_model then loads by default. "
                 "auto (default): bfloat16 when the checkpoint stores bfloat16, else float32 "
                 "(float16 and quantized GGUF weights become float32: float16 -> bfloat16 is "
                 "lossy)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace OUT_DIR if it exists (the old one is kept until the new one is "
                 "complete)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
  return p


def run(args: argparse.Namespace) -> int:
  from checkpoints_conversion import convert
  from jax_specens.checkpoint import abstract_model, read_config
  from jax_specens.precision import describe, stored_dtype

  out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                progress=not args.quiet)
  config = read_config(out)
  stored = describe(abstract_model(config, stored_dtype(out)))
  print(f"converted {config.family} ({config.num_layers} layers, vocab {config.vocab_size}) "
        f"{args.hf_dir} -> {out}: {stored}")
  return 0
