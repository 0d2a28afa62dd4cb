"""Batch 1 on GPU: bf16 products of one activation row, and decode with one-row products padded.

    python -m benchmarks.gpu_rows            # on a GPU
    python -m benchmarks.gpu_rows --small    # any backend, tiny shapes (checks the script)

On an H200 greedy `ar` of a 1B bf16 model stepped at 35% of its memory roofline at batch 1 and
at 74% at batch 2 (`gpu_roofline.py`, 2026-11-30): one row was slower than two. This finds where:
1. Products `x[M, K] @ W[K, N]` of the 1B model's MLP up (2048 x 8192), MLP down (8192 x 2048) and
   LM head (2048 x 32000) bf16 weights, float32 accumulation, several stacked weights read in one
   jitted scan (~512 MiB a call, far past the L2): GB/s of weight bytes for M = 1, 2 and 16 as
   `weight_dot` computes them with padding off, and at M = 1 `weight_dot` padding to 2 rows
   (zero rows behind an optimisation barrier; the default), the same padding without the
   barrier, and the plain product with bf16 output.
2. Greedy `ar` at batch 1 inside the on-device loop (gpu_roofline's in-loop step time) with
   `JAX_SPECENS_GPU_MIN_ROWS` = 1 (plain products), 2 and 4, and at batch 2 for reference, each
   as a share of the batch-1 roofline `param bytes / bandwidth`.
Writes `results/gpu_rows.json` (with `XLA_FLAGS` recorded).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.gpu_roofline import bandwidth, in_loop_token_seconds, make_pair, param_bytes

ENV = "JAX_SPECENS_GPU_MIN_ROWS"
# name: (K, N) of `x[M, K] @ W[K, N]`
PRODUCTS = {"1b": {"mlp_up": (2048, 8192), "mlp_down": (8192, 2048), "head": (2048, 32000)},
            "small": {"mlp_up": (64, 128), "mlp_down": (128, 64), "head": (64, 256)}}


def _with_rows(rows: int, fn):
  """`fn()` traced afresh with `weight_dot` padding one-row products to `rows` rows."""
  with common.restored_env(ENV):
    os.environ[ENV] = str(rows)
    jax.clear_caches()
    return fn()


def product_variants():
  """name -> (rows M, min rows for `weight_dot`, product fn(x, w) -> float32 [M, N])."""
  from jax_specens.models.layers import weight_dot
  dims = (((1,), (0,)), ((), ()))
  shipped = lambda x, w: weight_dot(x, w, dims, preferred_element_type=jnp.float32)

  def pad_no_barrier(x, w):
    padded = jnp.pad(x, ((0, 1), (0, 0)))
    return jax.lax.dot_general(padded, w, dims, preferred_element_type=jnp.float32)[:1]

  bf16_out = lambda x, w: jax.lax.dot_general(x, w, dims).astype(jnp.float32)
  return {"M=1": (1, 1, shipped), "M=2": (2, 1, shipped), "M=16": (16, 1, shipped),
          "M=1 padded to 2 (weight_dot)": (1, 2, shipped),
          "M=1 padded to 2, no barrier": (1, 1, pad_no_barrier),
          "M=1, bf16 output": (1, 1, bf16_out)}


def product_seconds(fn, rows: int, k: int, n: int, layers: int, repeats: int) -> float:
  """Median seconds per product of `fn(x[rows, K], W[K, N])` over `layers` stacked weights."""
  key = jax.random.key(0)
  w = (0.02 * jax.random.normal(key, (layers, k, n), jnp.float32)).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (rows, k), jnp.float32).astype(jnp.bfloat16)

  def run(x, w):
    return jax.lax.scan(lambda acc, wl: (acc + fn(x, wl).sum(), None), jnp.float32(0), w)[0]

  f = jax.jit(run)
  return common.time_call(lambda: f(x, w), repeats=repeats, warmup=1) / layers


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--small: 8)")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--min-rows", type=int, nargs="+", default=[1, 2, 4],
                 help=f"{ENV} settings of the batch-1 decode")
  p.add_argument("--skip-products", action="store_true", help="only the decode part")
  args = p.parse_args(argv)
  shape = "small" if args.small else "1b"
  n_new = args.max_new_tokens or (8 if args.small else 128)
  prompt_len = min(args.prompt_len, 16) if args.small else args.prompt_len
  repeats = max(args.repeats, 3)
  products = []
  if not args.skip_products:
    for name, (k, n) in PRODUCTS[shape].items():
      layers = max(1, (512 << 20) // (2 * k * n)) if not args.small else 2
      for variant, (rows, min_rows, fn) in product_variants().items():
        secs = _with_rows(min_rows, lambda: product_seconds(fn, rows, k, n, layers, repeats))
        products.append({"weight": name, "K": k, "N": n, "variant": variant,
                         "us": 1e6 * secs, "weight_GBps": 2 * k * n / secs / 1e9})
        print(f"{name} {k}x{n} {variant}: {1e6 * secs:.1f} us, "
              f"{products[-1]['weight_GBps']:.0f} GB/s", flush=True)
  bw = bandwidth((64 if args.small else 1024) << 20, args.repeats)
  target, _ = make_pair(shape)
  floor = param_bytes(target) / bw
  decode_rows = []
  for batch, min_rows in [(1, r) for r in args.min_rows] + [(2, 1)]:
    secs = _with_rows(min_rows, lambda: in_loop_token_seconds(target, prompt_len, n_new // 4,
                                                              n_new, repeats, batch))
    decode_rows.append({"batch": batch, ENV: min_rows, "step_ms": 1e3 * secs,
                        "pct_of_roofline": 100 * floor / secs})
    print(f"ar in-loop step, batch {batch}, {ENV}={min_rows}: {1e3 * secs:.3f} ms "
          f"({100 * floor / secs:.1f}% of the batch-1 roofline {1e3 * floor:.3f} ms)", flush=True)
  config = dict(shape=shape, max_new_tokens=n_new, prompt_len=prompt_len,
                bandwidth_GBps=bw / 1e9, roofline_ms=1e3 * floor,
                xla_flags=os.environ.get("XLA_FLAGS", ""))
  path = common.write_results(args.out, "gpu_rows", config, products, decode=decode_rows)
  if products:
    print("\n" + common.table(products, ["weight", "variant", "us", "weight_GBps"]))
  print("\n" + common.table(decode_rows, ["batch", ENV, "step_ms", "pct_of_roofline"]))
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
