"""`jax-specens convert HF_DIR OUT_DIR`: a Hugging Face checkpoint -> our checkpoint directory."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert a Hugging Face causal LM directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) into a jax_specens checkpoint directory (jax_specens.json, orbax
params/, tokenizer and generation_config files). Only safetensors are read; pickled .bin files are
never loaded. Supported model_type: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3,
gpt2. Every tensor name and shape is checked against config.json before anything is written, and
OUT_DIR appears only once it is complete.

example:  jax-specens convert ~/hf/Qwen2.5-0.5B ./qwen2.5-0.5b --dtype bfloat16
load it:  jax_specens.load_model("./qwen2.5-0.5b"), jax_specens.load_tokenizer("./qwen2.5-0.5b")
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "convert", help="convert a Hugging Face checkpoint (safetensors) to a jax_specens one",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("hf_dir", metavar="HF_DIR",
                 help="Hugging Face model directory (from save_pretrained or a Hub snapshot)")
  p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist yet)")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="storage dtype of the parameters; auto (default): bfloat16 when the "
                 "checkpoint stores 16-bit floats, else float32")
  p.add_argument("--overwrite", action="store_true",
                 help="replace OUT_DIR if it exists (the old one is kept until the new one is "
                 "complete)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
  return p


def run(args: argparse.Namespace) -> int:
  from checkpoints_conversion import convert
  from jax_specens.checkpoint import read_config

  out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                progress=not args.quiet)
  config = read_config(out)
  print(f"converted {config.family} ({config.num_layers} layers, vocab {config.vocab_size}) "
        f"{args.hf_dir} -> {out}")
  return 0
