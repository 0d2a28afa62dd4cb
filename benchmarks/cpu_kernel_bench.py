"""XLA's CPU matrix product against the opt-in kernel (`JAX_SPECENS_CPU_KERNELS=1`) on a real model.

    python -m benchmarks.cpu_kernel_bench [--model DIR] [--repeats 7] [--small]

1. Bandwidth: a jitted float32 sum over 256 MiB.
2. Pass cost: one jitted forward of W tokens (batch 1, W = 1, 2, 4, 8; batch 8, W = 1 and 4) over
   a 256-slot cache, float32 and bfloat16 weights (kernels `[d_in, d_out]` as checkpoints store
   them, for both products; `bf16_bench --rows both` times the row-major layout that
   `load_model` gives a model with the kernel on), each traced once with XLA's product
   and once with the kernel; all programs timed round-robin (median of --repeats rounds), so a
   busy machine slows both alike. A pass reads every parameter once: `share` = floor / time, with
   floor = parameter bytes / bandwidth. The ratio W / W=1 is what speculation pays for a
   verification pass (docs/algorithms.md §3).
3. Decoding (float32, batch 1, greedy, --tokens new tokens): ar, the ensemble of the model with
   itself, and se of the same pair at gamma (3, 1) (acceptance 1: the speed-up is the pass-cost
   ratio alone), ms/token; XLA and kernel alternate twice (a fresh compile each time).
Writes cpu_kernel.json. Default model: SmolLM2-135M-Instruct from the demo's user cache.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import common
from benchmarks.bf16_bench import bandwidth

SETTINGS = {"xla": "0", "kernel": "1"}
PASSES = [(1, 1), (1, 2), (1, 4), (1, 8), (8, 1), (8, 4)]  # (batch, W)


def _forward():
  from jax_specens.step import forward
  return jax.jit(lambda m, c, t, s: forward(m, c, t, s)[0])  # a new program per call of this


def pass_rows(models: dict, repeats: int, bw: float, cache_len: int, passes=PASSES) -> list[dict]:
  from jax_specens.kernels import cpu
  from jax_specens.precision import param_bytes
  jobs = {}
  for setting, flag in SETTINGS.items():
    os.environ[cpu.ENV] = flag
    for dtype, m in models.items():
      for b, w in passes:
        args = (m, m.init_cache(b, cache_len), jnp.ones((b, w), jnp.int32),
                jnp.full((b,), cache_len // 2, jnp.int32))
        f = _forward()
        jax.block_until_ready(f(*args))  # traced under this setting
        jobs[(setting, dtype, b, w)] = (f, args)
  times = {k: [] for k in jobs}
  for _ in tqdm(range(repeats), desc="pass rounds"):
    for k, (f, args) in jobs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t0)
  ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  rows = []
  for (setting, dtype, b, w), t in ms.items():
    floor = param_bytes(models[dtype]) / bw * 1e3
    rows.append({"dtype": dtype, "product": setting, "batch": b, "W": w, "ms": t,
                 "x W=1": t / ms[(setting, dtype, b, 1)], "share": floor / t,
                 "kernel / xla": t / ms[("xla", dtype, b, w)]})
  return rows


def decode_rows(model, tokens: int, repeats: int, rounds: int = 2) -> list[dict]:
  from jax_specens import decode
  from jax_specens.kernels import cpu
  prompt, lengths = jnp.arange(1, 9, dtype=jnp.int32)[None], jnp.array([8], jnp.int32)
  pair = [model, model]
  calls = {"ar": (model, {}), "ensemble": (pair, dict(method="ensemble")),
           "se": (pair, dict(method="se", gamma=(3, 1)))}
  got: dict[tuple[str, str], list[float]] = {}
  outputs = {}
  for setting in tqdm(list(SETTINGS) * rounds, desc="decode (compiles each time)"):
    os.environ[cpu.ENV] = SETTINGS[setting]
    jax.clear_caches()
    for name, (models, kw) in calls.items():
      run = lambda models=models, kw=kw: decode(models, prompt, lengths, max_new_tokens=tokens,  # noqa: E731
                                                temperature=0.0, **kw).tokens
      outputs[(setting, name)] = np.asarray(run())  # compiles
      secs = common.time_call(run, repeats=repeats, warmup=0)
      got.setdefault((setting, name), []).append(secs * 1e3 / tokens)
  rows = []
  for (setting, name), v in got.items():
    t = min(v)
    rows.append({"product": setting, "method": name, "ms/token": t,
                 "vs xla": t / min(got[("xla", name)]),
                 "se / ensemble speed-up": (min(got[(setting, "ensemble")]) / min(got[(setting, "se")])
                                            if name == "se" else None),
                 "same tokens as xla": bool(np.array_equal(outputs[(setting, name)],
                                                           outputs[("xla", name)]))})
  return rows


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--model", type=Path, help="a converted model dir; default: SmolLM2 from the "
                 "user cache of `jax-specens demo` (converted on first use)")
  p.add_argument("--tokens", type=int, default=32, help="new tokens per timed decode")
  p.set_defaults(repeats=7)
  args = p.parse_args(argv)
  from jax_specens import load_model
  from jax_specens.kernels import cpu
  if not cpu.available():
    print("error: the CPU kernel cannot be built here (see the warning above)", file=sys.stderr)
    return 2
  if args.small:
    from jax_specens import ModelConfig, create_model
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    make = lambda dtype: create_model(cfg, dtype=dtype)  # noqa: E731
    args.tokens, args.repeats, what = 8, 2, "a tiny random model (--small)"
  else:
    args.model = common.real_model(args.model, "smollm2")
    # kernels as checkpoints store them, [d_in, d_out], for both products (with the kernel on,
    # load_model would store them as rows: bf16_bench --rows both times those)
    make = lambda dtype: load_model(args.model, dtype=dtype, rows_major=False)  # noqa: E731
    what = str(args.model)
  # the model built in each dtype (its layers compute in it), not float32 modules over cast arrays
  models = {"float32": make(jnp.float32), "bfloat16": make(jnp.bfloat16)}
  model = models["float32"]
  bw = bandwidth(256 << 20, repeats=5)
  with common.restored_env(cpu.ENV):
    passes = pass_rows(models, args.repeats, bw, cache_len=256,
                       passes=[(1, 1), (1, 4)] if args.small else PASSES)
    decodes = decode_rows(model, args.tokens, max(1, args.repeats // 3),
                          rounds=1 if args.small else 2)
  print(f"bandwidth {bw / 1e9:.1f} GB/s; model {what}")
  print(common.table(passes, ["dtype", "product", "batch", "W", "ms", "x W=1", "share",
                              "kernel / xla"]))
  print(common.table(decodes, ["product", "method", "ms/token", "vs xla",
                               "se / ensemble speed-up", "same tokens as xla"]))
  path = common.write_results(args.out, "cpu_kernel", {"model": what, "tokens": args.tokens,
                                                       "repeats": args.repeats},
                              passes + decodes, bandwidth_GBps=bw / 1e9)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
