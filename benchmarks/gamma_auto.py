"""gamma="auto" against the best gamma of a grid, measured side by side, and what calibrating costs.

    python -m benchmarks.gamma_auto --draft DRAFT_DIR     # SmolLM2 as its own draft, and DRAFT_DIR
    python -m benchmarks.gamma_auto --small               # tiny random pair, seconds

For each pair (the target as its own draft, i.e. identical models; then the --draft model), greedy,
at --batch rows of the held-out chat prompts (--prompt-family): `decode(..., gamma="auto")` once
from an empty cache (`calibration_s`: the probe decode with its compile and the pass timings; the
chosen gamma and the acceptance alpha it measured), then ar and every gamma of --grid and the
chosen one, each compiled first and then timed --repeats times in turn (the minimum counts):
tokens/s, the measured speed-up over ar, and the speed-up the calibration predicted for that gamma.
`chosen / best` is the tok/s of the chosen gamma over the best of the grid. --method se does the
same for se over ensemble (wprob, equal weights; the grid is gamma (g, g), auto picks one gamma
per model). Writes gamma_auto.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from benchmarks.draft_bench import FAMILIES, load_pair
from jax_specens import autogamma
from jax_specens.decoding.api import decode

COLUMNS = ["pair", "gamma", "tok_s", "speedup", "predicted", "note"]


def bench_pair(name: str, target, draft, toks, lens, args, n: int) -> tuple[list[dict], dict]:
  se = args.method == "se"
  models, extra = ([draft, target], dict(weights=(0.5, 0.5))) if se else (target, dict(draft=draft))
  base = "ensemble" if se else "ar"

  def run(gamma, method=args.method):
    kw = extra if method == args.method else (dict(weights=(0.5, 0.5)) if se else {})
    return decode(models, toks, lens, method=method, max_new_tokens=n, temperature=0.0,
                  key=jax.random.key(0), **({"gamma": gamma} if gamma else {}), **kw)

  autogamma.clear_cache()
  t0 = time.perf_counter()
  auto = jax.block_until_ready(run("auto"))
  first_call_s = time.perf_counter() - t0
  choice = auto.gamma_choice
  grid = [(g, g) if se else g for g in args.grid]
  gammas = grid + ([choice.gamma] if choice.gamma not in grid else [])
  calls = {base: lambda: run(None, base)} | {g: (lambda g=g: run(g)) for g in gammas}
  for f in calls.values():
    jax.block_until_ready(f())
  secs = {}
  for _ in range(args.repeats):
    for k, f in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      secs[k] = min(secs.get(k, np.inf), time.perf_counter() - t0)
  predicted = {(c if se else c[0]): s for c, s in choice.candidates}
  tokens = n * toks.shape[0]
  rows = [{"pair": name, "gamma": base, "tok_s": tokens / secs[base], "speedup": 1.0}]
  for g in gammas:
    note = " ".join(x for x, on in (("auto", g == choice.gamma),
                                    ("best of grid", g == min(grid, key=lambda x: secs[x]))) if on)
    rows.append({"pair": name, "gamma": str(g), "tok_s": tokens / secs[g],
                 "speedup": secs[base] / secs[g], "predicted": predicted.get(g), "note": note})
  best = min(grid, key=lambda g: secs[g])
  summary = {"pair": name, "chosen": choice.gamma, "best_of_grid": best,
             "chosen_over_best": secs[best] / secs[choice.gamma], "alpha": choice.alpha,
             "calibration_s": choice.seconds, "first_auto_call_s": first_call_s,
             "decode_s": secs, "choice": choice.to_dict()}
  print(common.table(rows, COLUMNS), flush=True)
  print(f"{name}: auto chose {choice.gamma} (alpha {choice.alpha:.3f}), best of grid {best}: "
        f"chosen/best {summary['chosen_over_best']:.2f}; calibration {choice.seconds:.1f} s",
        flush=True)
  return rows, summary


def main(argv=None) -> int:
  ap = common.base_parser(__doc__.split("\n\n")[0])
  ap.add_argument("--target", default=None, help="target model dir (default: SmolLM2 from the "
                  "user cache `jax-specens demo` fills)")
  ap.add_argument("--draft", default=None, help="a draft for the target (besides identical models)")
  ap.add_argument("--method", choices=("sd", "se"), default="sd")
  ap.add_argument("--grid", type=lambda s: [int(x) for x in s.split(",")], default=None,
                  help="gammas to compare with auto (default 1,2,3,4,5,6; --small: 1,3)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--small: 12)")
  ap.add_argument("--prompt-family", default="first", choices=FAMILIES,
                  help="held-out prompts of this family (jax_specens/draft/prompts.py, as in "
                  "draft_bench): first (the default, as in every earlier run), general, openings "
                  "or all")
  args = ap.parse_args(argv)
  args.grid = args.grid or ([1, 3] if args.small else [1, 2, 3, 4, 5, 6])
  n = args.max_new_tokens or (12 if args.small else 64)
  if args.small:
    args.repeats = 1
  rows, summaries = [], []
  with tempfile.TemporaryDirectory() as tmp:
    target, draft, toks, lens, what = load_pair(
        Path(tmp), args.batch, small=args.small, identical=False, target=args.target,
        draft=args.draft, prompt_family=args.prompt_family)
    pairs = [("identical", target)] + ([("draft", draft)] if args.draft or args.small else [])
    print(f"models: {what}; {args.method}, batch {args.batch}, {n} new tokens, greedy", flush=True)
    for name, d in pairs:
      r, s = bench_pair(name, target, d, toks[:args.batch], lens[:args.batch], args, n)
      rows += r
      summaries.append(s)
  print("\n" + common.table(summaries, ["pair", "chosen", "best_of_grid", "chosen_over_best",
                                        "alpha", "calibration_s"]))
  path = common.write_results(args.out, "gamma_auto" + ("_small" if args.small else ""),
                              {"models": what, "method": args.method, "batch": args.batch,
                               "max_new_tokens": n, "grid": args.grid, "repeats": args.repeats},
                              rows, summaries=summaries)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
