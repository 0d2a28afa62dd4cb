"""Compile time and number of compilations of `decode()` per method.

    python -m benchmarks.compile_bench          # or: jax-specens bench compile [--small]

For each method, with JAX's caches cleared first, three calls and the XLA compilations each
triggers (counted with a `jax.monitoring` listener on backend compiles):
  1. first call: compile + run;
  2. new traced values (prompts, lengths, temperature, top-p, weights, key): must compile nothing;
  3. a new static value (max_new_tokens + 1): compiles the loop again.
Writes compile.json and compile.png.

    --shape smollm2 --layers 30 60 --layout both --methods ar sd se

measures compile time against depth: a random model of SmolLM2-135M's widths (vocab 49152, hidden
576, MLP 1536, 9 / 3 heads) at each depth, with its layers unrolled and scanned
(`jax_specens.models.layout`); the draft has 1 layer. The second call's time (new values, no
compile) is the decode time of the same program, so the two layouts' run time is compared too.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) while active."""

  def __init__(self):
    self.count, self.seconds, self._on = 0, 0.0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **_):
    if self._on and event == BACKEND_COMPILE:
      self.count += 1
      self.seconds += duration

  def measure(self, fn):
    """(result, wall seconds, compilations, compile seconds) of `fn()`."""
    self.count, self.seconds, self._on = 0, 0.0, True
    t0 = time.perf_counter()
    try:
      out = common.block(fn())
    finally:
      self._on = False
    return out, time.perf_counter() - t0, self.count, self.seconds


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--methods", nargs="+", default=["ar", "sd", "ensemble", "se"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (--small: 8)")
  p.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny",
                 help="tiny: vocab 1024, hidden 256, 4 layers (--small: 128, 64, 2); smollm2: "
                 "SmolLM2-135M's widths, random weights")
  p.add_argument("--layers", type=int, nargs="+", default=None,
                 help="target depths to measure (default: the shape's own: 4, or 30)")
  p.add_argument("--layout", choices=["unrolled", "scanned", "both"], default="unrolled",
                 help="the layers as separate blocks or one scanned block (models/layout.py)")
  p.add_argument("--step-tokens", type=int, default=0,
                 help="also time greedy ar and se per token at batch 1 over this many tokens, "
                 "the layouts interleaved (0: skip; e.g. 64)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="the models' parameter dtype (with JAX_SPECENS_CPU_KERNELS=1 the step times "
                 "compare the layouts on the opt-in CPU kernel)")
  args = p.parse_args(argv)
  import jax.numpy as jnp

  from jax_specens import ModelConfig, create_model
  from jax_specens.kernels import cpu
  from jax_specens.models.layout import scanned

  n_new = args.max_new_tokens or (8 if args.small else 32)
  dtype = jnp.dtype(args.dtype)
  if args.shape == "smollm2":
    dims = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9,
                num_kv_heads=3, head_dim=64, tie_embeddings=True)
  else:
    v, d = (128, 64) if args.small else (1024, 256)
    dims = dict(vocab_size=v, hidden_size=d, intermediate_size=2 * d, num_heads=4,
                num_kv_heads=2, head_dim=d // 4)
  depths = args.layers or [30 if args.shape == "smollm2" else 2 if args.small else 4]
  layouts = ["unrolled", "scanned"] if args.layout == "both" else [args.layout]
  cfg = lambda layers: ModelConfig(family="llama", num_layers=layers, **dims)
  counter = CompileCounter()
  rows = []
  for depth in depths:
    built = {}
    for layout in layouts:
      place = scanned if layout == "scanned" else (lambda m: m)
      built[layout] = (place(create_model(cfg(depth), 0, dtype)),
                       place(create_model(cfg(1), 1, dtype)))
    steps = _ms_per_token(built, dims["vocab_size"], args.step_tokens) if args.step_tokens else {}
    for layout, (target, draft) in built.items():
      if steps:
        print(f"{depth} layers, {layout}: batch 1, ms per token (median of 5 interleaved runs): "
              + ", ".join(f"{m} {v:.1f}" for m, v in steps[layout].items()), flush=True)
      for method in args.methods:
        row = _measure(counter, method, target, draft, args.batch, n_new, dims["vocab_size"])
        rows.append({"layers": depth, "layout": layout, **row,
                     **{f"{m}_ms_per_token": v for m, v in steps.get(layout, {}).items()}})
        print(f"{depth} layers, {layout}, {method}: first call {row['first_call_s']:.1f} s "
              f"({row['compiles_first']} compilations, {row['compile_s']:.1f} s compiling), new "
              f"values {row['new_values_s']:.2f} s ({row['compiles_new_values']}), new "
              f"max_new_tokens {row['new_static_s']:.1f} s ({row['compiles_new_static']})",
              flush=True)
  config = dict(batch=args.batch, max_new_tokens=n_new, shape=args.shape, dtype=args.dtype,
                cpu_kernels=cpu.requested(), **dims)
  path = common.write_results(args.out, "compile", config, rows)
  label = lambda r: (r["method"] if len(rows) == len(args.methods) else
                     f"{r['method']} {r['layers']}L {r['layout'][:4]}")
  common.bar_plot(args.out / "compile.png", [label(r) for r in rows],
                  {"first call": [r["first_call_s"] for r in rows],
                   "XLA compile": [r["compile_s"] for r in rows],
                   "new traced values": [r["new_values_s"] for r in rows]},
                  "seconds", "decode(): compile time per method")
  cols = ["layers", "layout", "method", "first_call_s", "compiles_first", "compile_s",
          "new_values_s", "compiles_new_values", "new_static_s", "compiles_new_static"]
  cols += [c for c in ("ar_ms_per_token", "se_ms_per_token") if c in rows[0]]
  print(f"\n{common.table(rows, cols)}\n\nwrote {path} and compile.png")
  return 0


def _ms_per_token(built: dict, vocab: int, n_new: int, rounds: int = 5) -> dict:
  """{layout: {"ar": ms, "se": ms}}: milliseconds per token of compiled greedy decodes at batch 1
  (se: draft and target, gamma 3, 1), the layouts timed in turn, median of `rounds`."""
  from jax_specens.decoding.api import decode
  prompts, lengths = common.random_prompts(1, 12, vocab, seed=2)
  runs = {}
  for layout, (target, draft) in built.items():
    runs[layout, "ar"] = lambda t=target: decode(t, prompts, lengths, max_new_tokens=n_new,
                                                 temperature=0.0).tokens
    runs[layout, "se"] = lambda t=target, d=draft: decode(
        [d, t], prompts, lengths, method="se", gamma=(3, 1), weights=(0.5, 0.5),
        max_new_tokens=n_new, temperature=0.0).tokens
  for fn in runs.values():
    common.block(fn())  # compile
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for k, fn in runs.items():
      t0 = time.perf_counter()
      common.block(fn())
      times[k].append((time.perf_counter() - t0) * 1e3 / n_new)
  return {layout: {m: float(np.median(times[layout, m])) for m in ("ar", "se")}
          for layout in built}


def _measure(counter, method, target, draft, batch, n_new, vocab) -> dict:
  """The three calls of the module notes for one method, caches cleared first."""
  from jax_specens.decoding.api import decode

  models = {"ar": dict(models=target), "sd": dict(models=target, draft=draft),
            "ensemble": dict(models=[draft, target]), "se": dict(models=[draft, target])}
  kw = dict(models[method], method=method)
  if method in ("ensemble", "se"):
    kw["weights"] = (0.5, 0.5)
  prompts, lengths = common.random_prompts(batch, 12, vocab, seed=0)
  prompts2, lengths2 = common.random_prompts(batch, 12, vocab, seed=1)
  jax.clear_caches()
  call = lambda pr, ln, n, **more: decode(kw["models"], pr, ln, max_new_tokens=n,
                                          **{k: v for k, v in kw.items() if k != "models"},
                                          **more)
  _, t1, n1, c1 = counter.measure(lambda: call(prompts, lengths, n_new, temperature=0.0))
  new_values = dict(temperature=0.7, top_p=0.9, key=jax.random.key(3))
  if "weights" in kw:
    kw["weights"] = (0.3, 0.7)
  _, t2, n2, _ = counter.measure(lambda: call(prompts2, lengths2, n_new, **new_values))
  _, t3, n3, c3 = counter.measure(lambda: call(prompts, lengths, n_new + 1, temperature=0.0))
  return {"method": method, "first_call_s": t1, "compiles_first": n1, "compile_s": c1,
          "new_values_s": t2, "compiles_new_values": n2, "new_static_s": t3,
          "compiles_new_static": n3}


if __name__ == "__main__":
  raise SystemExit(main())
