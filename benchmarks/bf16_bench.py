"""float32 against bfloat16 weights at batch 1, each against its memory-bandwidth floor.

    python -m benchmarks.bf16_bench [--model DIR] [--tokens 32] [--repeats 5]

1. Bandwidth: the best of a jitted sum and a jitted matrix-vector product over a --bandwidth-mib
   float32 array (bytes read / time; `bandwidth`); with JAX_SPECENS_CPU_KERNELS=1 also the rate
   at which the CPU kernel streams one weight of that size (`stream_bandwidth`, which reads
   faster: the `(stream)` columns are floors and shares against it).
2. The same checkpoint loaded in float32 and in bfloat16. For each, interleaved round by round:
   - step: one jitted decode step (`jax_specens.step`, 1 token, batch 1), the best of 8 calls;
   - ar: greedy `decode(method="ar")` of --tokens new tokens after an 8-token prompt, ms/token;
   - loop: the same decode of 2 x --tokens minus that of --tokens, per token: the marginal cost
     of a token inside the decode loop (no prompt pass, no fixed costs); `loop share (same
     round)` prices each round's loop against a bandwidth probe timed just before it
     (`round_probe`; the median over rounds), `loop share (fastest round)` is the share in the
     round whose probe read fastest (the floor at its lowest);
   - call: the same decode of 1 new token, the best of the rounds: what a `decode` call costs
     besides its tokens (the prompt pass, and any copy made once a call);
   - products: the pass's matrix products alone (every linear layer's weight, then the LM head,
     each once, through `weight_dot`: XLA's product or, with
     JAX_SPECENS_CPU_KERNELS=1, the CPU kernel), one activation row, in one jitted chain.
   A decode step reads every parameter once, so its floor is `param bytes / bandwidth`; the
   share of the limit is floor / measured. Prints a table and writes bf16.json.
   --rows both: each dtype twice, its linear kernels stored `[d_in, d_out]` and as rows
   (`[d_out, d_in]`, `models/layout.rows_major`; by default `load_model` decides).
   --huge-pages both: each also with its parameters in 4 KiB pages (named '... 4k') beside the
   2 MiB pages `load_model` moves them to by default on Linux (`jax_specens.hugepages`). The
   bandwidth probes read their arrays in both and keep the best.
3. --layouts: the MLP weights' products in their stored `[K, N]` layout and transposed to
   `[N, K]` (what the kernel reads as a tied head does), 1-8 rows, per dtype (`layout_rows`).
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

def _matvec(num_bytes: int):
  """(x, f): `num_bytes` of float32 `[num_bytes / 4096, 1024]` and a jitted product of it with
  a vector, the probe that reads x at full bandwidth here."""
  x = jnp.ones((num_bytes // 4096, 1024), jnp.float32)
  v = jnp.ones((1024,), jnp.float32)
  return x, jax.jit(lambda m: m @ v)


def bandwidth(num_bytes: int, repeats: int) -> float:
  """Bytes / second read from `num_bytes` of float32: the best of a jitted sum and a jitted
  matrix-vector product (`[num_bytes / 4096, 1024] @ [1024]`), each timed `repeats` times, in
  turn. On this 2-core host the sum, a reduction XLA runs on fewer threads, read 12-22 GB/s
  where the product read 25 GB/s, so a floor from the sum alone flattered every share."""
  x, matvec = _matvec(num_bytes)
  probes = [jax.jit(jnp.sum), matvec]
  return num_bytes / _best_of_pages(x, [lambda f=f: f(x) for f in probes], repeats)


def round_probe(num_bytes: int):
  """A function giving bytes / second read now: the best of 3 jitted matrix-vector products over
  `num_bytes` of float32 in 2 MiB pages (where `hugepages` is on). Timed right before each loop
  measurement: this host's bandwidth moves between phases of seconds (31-35 GB/s, then 50-65),
  so a loop is also priced against the bandwidth of its own moment (`loop share (same round)`)."""
  from jax_specens import hugepages
  x, matvec = _matvec(num_bytes)
  if hugepages.enabled():
    hugepages.collapse(x)
  common.first_call(lambda: matvec(x))
  return lambda: num_bytes / min(common.time_call(lambda: matvec(x), repeats=1, warmup=0)
                                 for _ in range(3))


def _best_of_pages(x, calls, repeats: int) -> float:
  """The least time of `calls` (each reading `x`), twice each in 4 KiB pages, then twice each
  with `x` in 2 MiB pages (`hugepages.collapse`; skipped where it is off): the floor is the best
  the memory gives, whichever pages the model's own parameters get."""
  from jax_specens import hugepages
  best = lambda: min(common.time_call(f, repeats=repeats) for _ in range(2) for f in calls)
  t = best()
  if hugepages.enabled():
    hugepages.collapse(x)
    t = min(t, best())
  return t


def stream_bandwidth(num_bytes: int, repeats: int) -> float | None:
  """Bytes / second at which the CPU kernel reads one weight of `num_bytes` (float32 `[N, 1024]`,
  a tied head's layout, one activation row), the best of `repeats`; None where the kernel does not
  compute (`cpu.computes()`). One long sequential stream on every core: on this host it read
  44-52 GB/s where `bandwidth`'s XLA probes read 28-45, so `bandwidth` can set a floor the
  hardware beats; under load both drop (one busy run: 31.5 against the probes' 33.5). `floor ms
  (stream)` and the `(stream)` shares are against this one."""
  from jax_specens.kernels import cpu
  if not cpu.computes():
    return None
  w = jnp.ones((num_bytes // 4096, 1024), jnp.float32)
  x = jnp.full((1, 1024), 0.01, jnp.float32)
  f = jax.jit(lambda w: cpu.small_matmul(x, w, True))
  common.first_call(lambda: f(w))
  return num_bytes / _best_of_pages(w, [lambda: f(w)], repeats)


def products_chain(model):
  """A jitted function running every matrix product of a one-token pass (each linear layer's
  kernel in the params' order, then the LM head), each once, on one activation row, each
  product's input depending on the previous product (so they run one after another); kernels in
  the layout the model stores them (`model.rows`)."""
  leaves = _leaves(model)
  weights = [v for path, v in leaves
             if path[-1] == "kernel" and "lm_head" not in path and v.ndim == 2]
  head = [v for path, v in leaves if path[-1] == "kernel" and "lm_head" in path]
  tied = not head
  weights += head or [v for path, v in leaves if path[-2:] == ("embed", "embedding")]
  rows = model.rows  # kernels as the model stores them; a tied head (embedding) is [V, D]
  return product_chain(weights, [rows] * (len(weights) - 1) + [tied or rows])


def _leaves(model) -> list[tuple[tuple[str, ...], jax.Array]]:
  from flax import nnx
  return [(tuple(str(k) for k in path), v[...]) for path, v in nnx.to_flat_state(model.params)]


def product_chain(weights, transposed, rows: int = 1):
  """A jitted chain of `weight_dot` products, one per weight, each input depending on the
  previous output: `x [rows, K] @ w` (w `[K, N]`), or `x @ w.T` where `transposed` (w `[N, K]`)."""
  from jax_specens.models.layers import weight_dot
  nn, nt = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ()))

  @jax.jit
  def chain(weights):
    link, out = jnp.zeros((), jnp.float32), []
    for w, t in zip(weights, transposed):
      dims = nt if t else nn
      k = w.shape[dims[0][1][0]]
      x = jnp.full((rows, k), 0.01, w.dtype) + link.astype(w.dtype)
      y = weight_dot(x, w, dims, preferred_element_type=jnp.float32)
      link = y[0, 0] * 0.0
      out.append(y[0, 0])
    return jnp.stack(out)

  return lambda: chain(weights)


def layout_rows(model, repeats: int) -> list[dict]:
  """The MLP weights (gate / up / down of every layer) read by one chain of products as they are
  stored (`[K, N]`, a Linear kernel) and as the same weights transposed (`[N, K]`, the layout
  of a tied head), for 1, 2, 4 and 8 activation rows, the two layouts alternating round by round:
  microseconds and GB/s per weight (the chain is larger than the CPU's caches, so each weight
  comes from memory)."""
  from jax_specens.models.layout import rows_major
  mlp = [v for path, v in _leaves(rows_major(model, False))
         if path[-1] == "kernel" and path[-2] in ("gate", "up", "down") and v.ndim == 2]
  stored = {"[K, N]": (mlp, [False] * len(mlp)),
            "[N, K]": ([jnp.asarray(w.T) for w in mlp], [True] * len(mlp))}
  nbytes = sum(w.nbytes for w in mlp)
  out = []
  for rows in (1, 2, 4, 8):
    chains = {name: product_chain(ws, ts, rows) for name, (ws, ts) in stored.items()}
    times = {name: [] for name in chains}
    for f in chains.values():
      common.first_call(f)
    for _ in range(repeats):
      for name, f in chains.items():
        times[name].append(common.time_call(f, repeats=3, warmup=0))
    for name, ts in times.items():
      t = float(np.median(ts))
      out.append({"dtype": str(jnp.dtype(model.dtype)), "layout": name, "rows": rows,
                  "us / weight": t * 1e6 / len(mlp), "GB/s": nbytes / t / 1e9,
                  "weights": len(mlp), "MB / weight": nbytes / len(mlp) / 1e6})
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", type=Path,
                 help="a converted model dir (jax-specens convert); default: SmolLM2 from the "
                 "user cache of `jax-specens demo`")
  p.add_argument("--tokens", type=int, default=32, help="new tokens per ar decode (default 32)")
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
  p.add_argument("--bandwidth-mib", type=int, default=256, help="bandwidth probe size (256)")
  p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="JSON directory")
  p.add_argument("--rows", choices=["auto", "both"], default="auto",
                 help="auto: each model loaded as `load_model` stores it by default (with "
                 "JAX_SPECENS_CPU_KERNELS=1 its kernels as rows, "
                 "`layout.rows_major`); both: each dtype with kernels [d_in, d_out] and as rows "
                 "(named '... rows'), interleaved")
  p.add_argument("--huge-pages", choices=["auto", "both"], default="auto",
                 help="auto: parameters in 2 MiB pages as `load_model` puts them by default "
                 "(`jax_specens.hugepages`, Linux); both: each model also in 4 KiB pages "
                 "(named '... 4k'), interleaved")
  p.add_argument("--layouts", action="store_true",
                 help="also time the MLP weights' products in their stored [K, N] layout and "
                 "transposed to [N, K], 1-8 rows (`layout_rows`)")
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
  stream = stream_bandwidth(args.bandwidth_mib << 20, repeats=5)
  prompt = jnp.arange(1, 9, dtype=jnp.int32)[None]
  lengths = jnp.array([8], jnp.int32)
  runs = {}
  row_layouts = [(None, "")] if args.rows == "auto" else [(False, ""), (True, " rows")]
  pages = [(None, "")] if args.huge_pages == "auto" else [(False, " 4k"), (True, "")]
  variants = [(r, h) for r in row_layouts for h in pages]
  for (name, dtype), ((rows_major, rows_name), (huge, pages_name)) in tqdm(
      [(d, v) for d in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)) for v in variants],
      desc="load + compile"):
    name += rows_name + pages_name
    model = load_model(args.model, dtype=dtype, rows_major=rows_major, huge_pages=huge)
    cache = model.init_cache(1, 256)
    tok = jnp.zeros((1, 1), jnp.int32)
    _, t_compile = common.first_call(lambda: step(model, cache, tok, jnp.zeros(1, jnp.int32)))
    ar1, ar, ar2 = (lambda m=model, n=n: decode(m, prompt, lengths, method="ar",
                                                max_new_tokens=n, temperature=0.0).tokens
                    for n in (1, args.tokens, 2 * args.tokens))
    products = products_chain(model)
    for f in (ar1, ar, ar2, products):
      common.first_call(f)
    runs[name] = {"model": model, "ar1": ar1, "ar": ar, "ar2": ar2, "products": products,
                  "step_ms": [], "ar_ms": [], "loop_ms": [], "call_ms": [], "products_ms": [],
                  "round_bandwidth": [],
                  "compile_step_s": t_compile, "bytes": param_bytes(model)}
  probe = round_probe(args.bandwidth_mib << 20)
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
      r["round_bandwidth"].append(probe())
      t_ar = common.time_call(r["ar"], repeats=1, warmup=0)
      r["ar_ms"].append(t_ar * 1e3 / args.tokens)
      t_ar2 = common.time_call(r["ar2"], repeats=1, warmup=0)
      r["loop_ms"].append((t_ar2 - t_ar) * 1e3 / args.tokens)
      r["call_ms"].append(common.time_call(r["ar1"], repeats=1, warmup=0) * 1e3)
      r["products_ms"].append(common.time_call(r["products"], repeats=5, warmup=0) * 1e3)

  layouts = ([row for r in runs.values() if not r["model"].rows
              for row in layout_rows(r["model"], args.repeats)] if args.layouts else [])
  rows = []
  for name, r in runs.items():
    floor_ms = r["bytes"] / bw * 1e3
    stream_ms = r["bytes"] / stream * 1e3 if stream else None  # the floor at the kernel's stream
    step_ms, ar_ms = float(np.min(r["step_ms"])), float(np.min(r["ar_ms"]))
    loop_ms, products_ms = float(np.median(r["loop_ms"])), float(np.median(r["products_ms"]))
    # each round's loop against the bandwidth probed just before it; and at the round the
    # memory was fastest (its floor the lowest)
    same = [r["bytes"] / b * 1e3 / t for b, t in zip(r["round_bandwidth"], r["loop_ms"])]
    fastest = int(np.argmax(r["round_bandwidth"]))
    rows.append({"dtype": name, "param MB": r["bytes"] / 1e6, "floor ms": floor_ms,
                 "step ms": step_ms, "step share": floor_ms / step_ms,
                 "ar ms/token": ar_ms, "ar share": floor_ms / ar_ms,
                 "loop ms/token": loop_ms, "loop share": floor_ms / loop_ms,
                 "loop share (same round)": float(np.median(same)),
                 "fastest round GB/s": r["round_bandwidth"][fastest] / 1e9,
                 "loop share (fastest round)": same[fastest],
                 "call ms": float(np.min(r["call_ms"])),
                 "products ms": products_ms, "products share": floor_ms / products_ms,
                 **({"floor ms (stream)": stream_ms, "loop share (stream)": stream_ms / loop_ms,
                     "products share (stream)": stream_ms / products_ms} if stream else {}),
                 "step ms (all rounds)": r["step_ms"], "ar ms (all rounds)": r["ar_ms"],
                 "loop ms (all rounds)": r["loop_ms"],
                 "round GB/s (all rounds)": [b / 1e9 for b in r["round_bandwidth"]],
                 "loop share (all rounds, same round)": same,
                 "call ms (all rounds)": r["call_ms"],
                 "products ms (all rounds)": r["products_ms"],
                 "compile step s": r["compile_step_s"]})
  f32, bf16 = rows[0], rows[len(variants)]
  print(f"bandwidth {bw / 1e9:.1f} GB/s ({args.bandwidth_mib} MiB float32, best of a sum and a "
        f"matvec); model {args.model}")
  if stream:
    print(f"stream {stream / 1e9:.1f} GB/s (the CPU kernel reading one {args.bandwidth_mib} MiB "
          "weight): the (stream) columns")
  print(common.table(rows, ["dtype", "param MB", "floor ms", "step ms", "step share",
                            "ar ms/token", "ar share", "loop ms/token", "loop share",
                            "loop share (same round)", "fastest round GB/s",
                            "loop share (fastest round)", "call ms",
                            "products ms", "products share"]
                     + (["floor ms (stream)", "loop share (stream)", "products share (stream)"]
                        if stream else [])))
  print(f"bfloat16 / float32 time: step {bf16['step ms'] / f32['step ms']:.2f}, "
        f"ar {bf16['ar ms/token'] / f32['ar ms/token']:.2f} (floor ratio "
        f"{bf16['floor ms'] / f32['floor ms']:.2f})")
  if layouts:
    print("MLP weights' products by layout (`--layouts`):")
    print(common.table(layouts, ["dtype", "layout", "rows", "us / weight", "GB/s"]))
  from jax_specens.kernels import cpu
  config = vars(args) | {"model": str(args.model), "cpu_kernels": cpu.requested()}
  path = common.write_results(args.out, "bf16", config, rows, bandwidth_GBps=bw / 1e9,
                              stream_GBps=stream / 1e9 if stream else None,
                              **({"layouts": layouts} if layouts else {}))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
