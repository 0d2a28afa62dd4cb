"""`jax-specens bench {peers,se-sweep,roofline,attention,compile,...} [options]`: runs a benchmark script.

The scripts live in the repository's `benchmarks/` directory (not installed with the package): run
this from a source checkout. Everything after the benchmark name goes to the script; see
`jax-specens bench peers --help`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "peers": ("peers_bench", "ar / sd / ensemble / se vs Hugging Face generate() and a PyTorch "
              "ensemble loop, on the same converted checkpoints, batch 1 and 8"),
    "se-sweep": ("se_sweep", "Speculative Ensemble speed-up over the plain ensemble as gamma and "
                 "lambda vary, next to the theoretical speed-up from the measured alpha and c"),
    "roofline": ("gpu_roofline", "decode step time of a ~1B Llama-shaped bf16 model vs the memory "
                 "bandwidth roofline, and tokens/s of every method at batch 1 and 16 (--small on "
                 "CPU)"),
    "gpu-rows": ("gpu_rows", "batch 1 on GPU: bf16 products of 1 / 2 / 16 activation rows, and "
                 "in-loop ar at batch 1 with one-row products padded to 1 / 2 / 4 rows"),
    "compile": ("compile_bench", "compile time and number of compilations of decode() per method"),
    "sampling": ("sampling_bench", "the cost of a sampling distribution per filter (greedy, "
                 "temperature, top-k, top-p, min-p) next to a sort of the same logits"),
    "decode": ("decode_bench", "ar / sd / ensemble / se side by side on the same models: tokens/s, "
               "ratios sd/ar and se/ensemble, model calls, acceptance"),
    "long-context": ("long_context", "decode step time against the context in use at a fixed "
                     "cache of 32k slots, blocked vs dense attention; Gemma 3's KV memory"),
    "attention": ("attention_kernels", "one decode-time attention: dense, blocked and "
                  "jax.nn.dot_product_attention (xla, cudnn) side by side (GPU: 1B shapes)"),
    "cpu-kernel": ("cpu_kernel_bench", "XLA's CPU matrix product vs the opt-in kernel "
                   "(JAX_SPECENS_CPU_KERNELS=1): pass cost by width and dtype, ar / se decode"),
    "sharding": ("sharding_bench", "parameter and KV cache bytes per device on data x model "
                 "meshes (1x1 .. 1x8, 2x4, 8x1), and sharded greedy decode == one device"),
}


def add_parser(subparsers) -> None:
  lines = "\n".join(f"  {name:9} {text}" for name, (_, text) in BENCHMARKS.items())
  p = subparsers.add_parser(
      "bench", help="run a benchmark (tables, JSON and PNG under benchmarks/results/)",
      description=f"Runs one benchmark script of benchmarks/ (from a source checkout).\n\n{lines}\n\n"
      "Every benchmark takes --small (tiny models: a quick end-to-end check), --out DIR and "
      "--repeats N; `jax-specens bench NAME --help` lists the rest.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark")
  p.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
  p.set_defaults(run=run)


def repo_root() -> Path:
  """The source checkout holding benchmarks/ (the parent of the jax_specens package)."""
  root = Path(__file__).resolve().parents[2]
  if not (root / "benchmarks" / "common.py").is_file():
    raise FileNotFoundError(
        f"benchmarks/ not found next to the jax_specens package ({root}); the benchmarks are not "
        "installed with the package: clone the repository, `pip install -e .` it and run "
        "`jax-specens bench` (or `python -m benchmarks.<name>`) from there")
  return root


def run(args) -> int:
  root = str(repo_root())
  if root not in sys.path:
    sys.path.insert(0, root)
  module = importlib.import_module(f"benchmarks.{BENCHMARKS[args.benchmark][0]}")
  prog, sys.argv[0] = sys.argv[0], f"jax-specens bench {args.benchmark}"  # the script's usage line
  try:
    return int(module.main(args.args) or 0)
  finally:
    sys.argv[0] = prog
