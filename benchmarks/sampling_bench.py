"""The cost of a sampling distribution (`jax_specens.sampling.log_probs`) per filter.

    python -m benchmarks.sampling_bench       # or: jax-specens bench sampling [--small]

Every decode step turns each scored position's logits into a sampling distribution (the draft's
proposal, q and r of the verification), so with top-k / top-p that cost is paid per row per
position. Times `log_probs` over `[rows, V]` logits (default 16 x 49152, SmolLM2's vocabulary)
for greedy, plain temperature, top-k, top-p and min-p, and, side by side in the same run, a
`jnp.sort` over the same array: what the filter cost when it sorted (the sort alone; the
bisection that replaced it keeps the same tokens, `tests/test_sampling.py`). Writes sampling.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

FILTERS = {"greedy": dict(temperature=0.0), "temperature 0.7": dict(temperature=0.7),
           "top-k 50": dict(temperature=0.7, top_k=50), "top-p 0.9": dict(temperature=0.7, top_p=0.9),
           "min-p 0.05": dict(temperature=0.7, min_p=0.05),
           "top-k 50 + top-p 0.9": dict(temperature=0.7, top_k=50, top_p=0.9)}


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=None, help="rows of logits (default 16; --small: 4)")
  p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 49152; --small: 1024)")
  args = p.parse_args(argv)
  from jax_specens.sampling import SamplingParams, log_probs

  rows = args.rows or (4 if args.small else 16)
  vocab = args.vocab or (1024 if args.small else 49152)
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((rows, vocab)) * 3, jnp.float32)
  fn = jax.jit(log_probs)
  results = []
  for name, kw in FILTERS.items():
    params = SamplingParams.make(rows, **kw)
    ms = 1000 * common.time_call(lambda: fn(logits, params), repeats=args.repeats)
    results.append({"filter": name, "ms": ms, "ms_per_row": ms / rows})
  sort = jax.jit(lambda x: jnp.sort(x, axis=-1))
  sort_ms = 1000 * common.time_call(lambda: sort(logits), repeats=args.repeats)
  results.append({"filter": "jnp.sort alone (the former filter's core)", "ms": sort_ms,
                  "ms_per_row": sort_ms / rows})
  plain = results[1]["ms"]
  for r in results:
    r["vs_temperature"] = r["ms"] / plain
    print(f"{r['filter']}: {r['ms']:.2f} ms ({r['ms_per_row']:.3f} ms a row, "
          f"{r['vs_temperature']:.1f}x plain temperature)", flush=True)
  path = common.write_results(args.out, "sampling", dict(rows=rows, vocab=vocab), results)
  print(f"\n{common.table(results, ['filter', 'ms', 'ms_per_row', 'vs_temperature'])}\n\n"
        f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
