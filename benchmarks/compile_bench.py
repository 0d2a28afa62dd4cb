"""Compile time and number of compilations of `decode()` per method.

    python -m benchmarks.compile_bench          # or: jax-specens bench compile [--small]

For each method, with JAX's caches cleared first, three calls and the XLA compilations each
triggers (counted with a `jax.monitoring` listener on backend compiles):
  1. first call: compile + run;
  2. new traced values (prompts, lengths, temperature, top-p, weights, key): must compile nothing;
  3. a new static value (max_new_tokens + 1): compiles the loop again.
Writes compile.json and compile.png.
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
  args = p.parse_args(argv)
  from jax_specens import ModelConfig, create_model
  from jax_specens.decode import decode

  n_new = args.max_new_tokens or (8 if args.small else 32)
  dims = (128, 64, 2) if args.small else (1024, 256, 4)  # vocab, hidden, layers
  cfg = lambda layers: ModelConfig(family="llama", vocab_size=dims[0], hidden_size=dims[1],
                                   intermediate_size=2 * dims[1], num_layers=layers, num_heads=4,
                                   num_kv_heads=2, head_dim=dims[1] // 4)
  target, draft = create_model(cfg(dims[2]), 0), create_model(cfg(1), 1)
  models = {"ar": dict(models=target), "sd": dict(models=target, draft=draft),
            "ensemble": dict(models=[draft, target]), "se": dict(models=[draft, target])}
  counter = CompileCounter()
  rows = []
  for method in args.methods:
    kw = dict(models[method], method=method)
    if method in ("ensemble", "se"):
      kw["weights"] = (0.5, 0.5)
    prompts, lengths = common.random_prompts(args.batch, 12, dims[0], seed=0)
    prompts2, lengths2 = common.random_prompts(args.batch, 12, dims[0], seed=1)
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
    rows.append({"method": method, "first_call_s": t1, "compiles_first": n1,
                 "compile_s": c1, "new_values_s": t2, "compiles_new_values": n2,
                 "new_static_s": t3, "compiles_new_static": n3})
    print(f"{method}: first call {t1:.1f} s ({n1} compilations, {c1:.1f} s compiling), new values "
          f"{t2:.2f} s ({n2}), new max_new_tokens {t3:.1f} s ({n3})", flush=True)
  config = dict(batch=args.batch, max_new_tokens=n_new, vocab=dims[0], hidden=dims[1],
                layers=dims[2])
  path = common.write_results(args.out, "compile", config, rows)
  common.bar_plot(args.out / "compile.png", [r["method"] for r in rows],
                  {"first call": [r["first_call_s"] for r in rows],
                   "XLA compile": [r["compile_s"] for r in rows],
                   "new traced values": [r["new_values_s"] for r in rows]},
                  "seconds", "decode(): compile time per method")
  cols = ["method", "first_call_s", "compiles_first", "compile_s", "new_values_s",
          "compiles_new_values", "new_static_s", "compiles_new_static"]
  print(f"\n{common.table(rows, cols)}\n\nwrote {path} and compile.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
