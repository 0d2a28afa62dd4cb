"""float32 against bfloat16 weights at batch 1, each against its memory-bandwidth floor.

    python -m benchmarks.bf16_bench [--model DIR] [--tokens 32] [--repeats 5]

1. Bandwidth: the best of a jitted sum and a jitted matrix-vector product over a --bandwidth-mib
   float32 array (bytes read / time; `bandwidth`).
2. The same checkpoint loaded in float32 and in bfloat16. For each, interleaved round by round:
   - step: one jitted decode step (`jax_specens.step`, 1 token, batch 1), the best of 8 calls;
   - ar: greedy `decode(method="ar")` of --tokens new tokens after an 8-token prompt, ms/token;
   - loop: the same decode of 2 x --tokens minus that of --tokens, per token: the marginal cost
     of a token inside the decode loop (no prompt pass, no fixed costs);
   - products: the pass's matrix products alone (every linear layer's weight, then the LM head,
     each once, through `weight_dot`: XLA's product or, with
     JAX_SPECENS_CPU_KERNELS=1, the CPU kernel), one activation row, in one jitted chain.
   A decode step reads every parameter once, so its floor is `param bytes / bandwidth`; the
   share of the limit is floor / measured. Prints a table and writes bf16.json.
Timings on a shared machine are noisy: compare the two dtypes within one run (same rounds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import common

def bandwidth(num_bytes: int, repeats: int) -> float:
  """Bytes / second read from `num_bytes` of float32: the best of a jitted sum and a jitted
  matrix-vector product (`[num_bytes / 4096, 1024] @ [1024]`), each timed `repeats` times, in
  turn. On this 2-core host the sum, a reduction XLA runs on fewer threads, read 12-22 GB/s
  where the product read 25 GB/s, so a floor from the sum alone flattered every share."""
  x = jnp.ones((num_bytes // 4096, 1024), jnp.float32)
  v = jnp.ones((1024,), jnp.float32)
  probes = [jax.jit(jnp.sum), jax.jit(lambda m: m @ v)]
  best = min(common.time_call(lambda f=f: f(x), repeats=repeats) for _ in range(2) for f in probes)
  return num_bytes / best


def products_chain(model):
  """A jitted function running every matrix product of a one-token pass (each linear layer's
  kernel in the params' order, then the LM head), each once, on one activation row, each
  product's input depending on the previous product (so they run one after another)."""
  from flax import nnx

  from jax_specens.models.layers import weight_dot
  leaves = [(tuple(str(k) for k in path), v[...]) for path, v in nnx.to_flat_state(model.params)]
  weights = [v for path, v in leaves
             if path[-1] == "kernel" and "lm_head" not in path and v.ndim == 2]
  head = [v for path, v in leaves if path[-1] == "kernel" and "lm_head" in path]
  tied = not head
  weights += head or [v for path, v in leaves if path[-2:] == ("embed", "embedding")]
  nn, nt = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ()))

  @jax.jit
  def chain(weights):
    link, out = jnp.zeros((), jnp.float32), []
    for i, w in enumerate(weights):
      dims = nt if tied and i == len(weights) - 1 else nn
      k = w.shape[dims[0][1][0]]
      x = jnp.full((1, k), 0.01, w.dtype) + link.astype(w.dtype)
      y = weight_dot(x, w, dims, preferred_element_type=jnp.float32)
      link = y[0, 0] * 0.0
      out.append(y[0, 0])
    return jnp.stack(out)

  return lambda: chain(weights)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", type=Path,
                 help="a converted model dir (jax-specens convert); default: SmolLM2 from the "
                 "user cache of `jax-specens demo`")
  p.add_argument("--tokens", type=int, default=32, help="new tokens per ar decode (default 32)")
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
  p.add_argument("--bandwidth-mib", type=int, default=256, help="bandwidth probe size (256)")
  p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="JSON directory")
  args = p.parse_args(argv)
  args.model = common.real_model(args.model, "smollm2")
  if not (args.model / "params").is_dir():
    print(f"error: --model {args.model} is not a converted model dir (no params/); convert one "
          "with `jax-specens convert` or pass --model DIR", file=sys.stderr)
    return 2
  if args.tokens < 1 or args.repeats < 1:
    print("error: --tokens and --repeats must be >= 1", file=sys.stderr)
    return 2

  from jax_specens import decode, load_model
  from jax_specens.precision import param_bytes
  from jax_specens.step import step

  bw = bandwidth(args.bandwidth_mib << 20, repeats=5)
  prompt = jnp.arange(1, 9, dtype=jnp.int32)[None]
  lengths = jnp.array([8], jnp.int32)
  runs = {}
  for name, dtype in tqdm([("float32", jnp.float32), ("bfloat16", jnp.bfloat16)],
                          desc="load + compile"):
    model = load_model(args.model, dtype=dtype)
    cache = model.init_cache(1, 256)
    tok = jnp.zeros((1, 1), jnp.int32)
    _, t_compile = common.first_call(lambda: step(model, cache, tok, jnp.zeros(1, jnp.int32)))
    ar, ar2 = (lambda m=model, n=n: decode(m, prompt, lengths, method="ar", max_new_tokens=n,
                                           temperature=0.0).tokens
               for n in (args.tokens, 2 * args.tokens))
    products = products_chain(model)
    for f in (ar, ar2, products):
      common.first_call(f)
    runs[name] = {"model": model, "ar": ar, "ar2": ar2, "products": products, "step_ms": [],
                  "ar_ms": [], "loop_ms": [], "products_ms": [], "compile_step_s": t_compile,
                  "bytes": param_bytes(model)}
  for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
    for r in runs.values():
      cache = r["model"].init_cache(1, 256)
      best = float("inf")
      for i in range(8):
        t0 = time.perf_counter()
        logits, cache = step(r["model"], cache, tok, jnp.full((1,), i, jnp.int32))
        logits.block_until_ready()
        best = min(best, time.perf_counter() - t0)
      r["step_ms"].append(best * 1e3)
      t_ar = common.time_call(r["ar"], repeats=1, warmup=0)
      r["ar_ms"].append(t_ar * 1e3 / args.tokens)
      t_ar2 = common.time_call(r["ar2"], repeats=1, warmup=0)
      r["loop_ms"].append((t_ar2 - t_ar) * 1e3 / args.tokens)
      r["products_ms"].append(common.time_call(r["products"], repeats=5, warmup=0) * 1e3)

  rows = []
  for name, r in runs.items():
    floor_ms = r["bytes"] / bw * 1e3
    step_ms, ar_ms = float(np.min(r["step_ms"])), float(np.min(r["ar_ms"]))
    loop_ms, products_ms = float(np.median(r["loop_ms"])), float(np.median(r["products_ms"]))
    rows.append({"dtype": name, "param MB": r["bytes"] / 1e6, "floor ms": floor_ms,
                 "step ms": step_ms, "step share": floor_ms / step_ms,
                 "ar ms/token": ar_ms, "ar share": floor_ms / ar_ms,
                 "loop ms/token": loop_ms, "loop share": floor_ms / loop_ms,
                 "products ms": products_ms, "products share": floor_ms / products_ms,
                 "step ms (all rounds)": r["step_ms"], "ar ms (all rounds)": r["ar_ms"],
                 "loop ms (all rounds)": r["loop_ms"],
                 "products ms (all rounds)": r["products_ms"],
                 "compile step s": r["compile_step_s"]})
  f32, bf16 = rows
  print(f"bandwidth {bw / 1e9:.1f} GB/s ({args.bandwidth_mib} MiB float32, best of a sum and a "
        f"matvec); model {args.model}")
  print(common.table(rows, ["dtype", "param MB", "floor ms", "step ms", "step share",
                            "ar ms/token", "ar share", "loop ms/token", "loop share",
                            "products ms", "products share"]))
  print(f"bfloat16 / float32 time: step {bf16['step ms'] / f32['step ms']:.2f}, "
        f"ar {bf16['ar ms/token'] / f32['ar ms/token']:.2f} (floor ratio "
        f"{bf16['floor ms'] / f32['floor ms']:.2f})")
  from jax_specens.kernels import cpu
  config = vars(args) | {"model": str(args.model), "cpu_kernels": cpu.requested()}
  path = common.write_results(args.out, "bf16", config, rows,
                              bandwidth_GBps=bw / 1e9)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
