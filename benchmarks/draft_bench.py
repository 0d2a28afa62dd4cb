"""A distilled draft on its real target: acceptance, draft cost and sd / se speed-ups.

    python -m benchmarks.draft_bench --target models/smollm2 --draft DRAFT_DIR

On the held-out chat prompts (`jax_specens.draft.prompts`, split "test"), in one run so that the
ratios are measured side by side on the same (possibly busy) machine:
- greedy and T = 1 acceptance of sd (accepted / proposed, and the per-token rate alpha that
  explains it: E[accepted per round] = alpha (1 - alpha^gamma) / (1 - alpha));
- the draft's cost per token c: seconds of `ar` with the draft / seconds of `ar` with the target;
- sd over ar, and se over ensemble (wprob, equal weights), at batch 1 and batch 8, greedy, next to
  the docs/algorithms.md §3 predictions: sd (1 - a^(g+1)) / ((1 - a)(g c + 1)); se the SPEC formula.
Writes benchmarks/results/draft.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import DEFAULT_OUT, table, write_results
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decode import decode
from jax_specens.draft import data as D
from jax_specens.draft.prompts import prompts as chat_prompts


def per_token_alpha(mean_accepted: float, gamma: int) -> float:
  """Solves E[accepted of gamma] = a (1 - a^g) / (1 - a) for a (bisection)."""
  f = lambda a: sum(a ** k for k in range(1, gamma + 1))  # noqa: E731
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) < mean_accepted else (lo, mid)
  return (lo + hi) / 2


def sd_prediction(alpha: float, gamma: int, c: float) -> float:
  if alpha >= 1.0:
    return (gamma + 1) / (gamma * c + 1)
  return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def se_prediction(alpha: float, gq: int, gp: int, c: float) -> float:
  """docs/algorithms.md §3: speed-up of se over the plain ensemble, c = cost(M_q) / cost(M_p)."""
  if alpha >= 1.0:
    alpha = 1 - 1e-9
  return (1 - alpha ** gq) * (1 + c) / ((1 - alpha) * (1 + c * gq - alpha ** gp * c))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", required=True)
  ap.add_argument("--draft", required=True)
  ap.add_argument("--gamma", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (the minimum counts)")
  ap.add_argument("--no-se", action="store_true", help="skip the se / ensemble rows")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = ap.parse_args(argv)

  target, draft = load_model(args.target), load_model(args.draft)
  tok = load_tokenizer(args.target)
  rows_ids = [D.chat_ids(tok, p) for p in chat_prompts("test")]
  stop = list(target.config.eos_token_ids)
  g, n = args.gamma, args.max_new_tokens
  rows, record = [], {}
  for b in [int(x) for x in args.batches.split(",")]:
    toks, lens = D.pad(rows_ids[:b], max(map(len, rows_ids)))

    def run(models, method, temperature=0.0, **kw):
      return decode(models, toks, lens, method=method, max_new_tokens=n, temperature=temperature,
                    stop_ids=None, key=jax.random.key(0), **kw)

    calls = {
        "ar": lambda: run(target, "ar"),
        "ar_draft": lambda: run(draft, "ar"),
        "sd": lambda: run(target, "sd", draft=draft, gamma=g),
    }
    if not args.no_se:
      calls["ensemble"] = lambda: run([draft, target], "ensemble", weights=(0.5, 0.5))
      calls["se"] = lambda: run([draft, target], "se", weights=(0.5, 0.5), gamma=(g, 1))
    secs, outs = {}, {}
    for k, f in calls.items():  # compile every program first, then time them side by side
      jax.block_until_ready(f())
    for _ in range(args.repeats):
      for k, f in calls.items():
        t0 = time.perf_counter()
        outs[k] = jax.block_until_ready(f())
        secs[k] = min(secs.get(k, np.inf), time.perf_counter() - t0)
    sd_out = outs["sd"]
    np.testing.assert_array_equal(np.asarray(sd_out.tokens), np.asarray(outs["ar"].tokens))
    sd_t1 = run(target, "sd", temperature=1.0, draft=draft, gamma=g)
    c = secs["ar_draft"] / secs["ar"]
    for name, out in (("greedy", sd_out), ("T=1", sd_t1)):
      st = out.stats.to_dict()
      mean_acc = st["accepted"] / max(st["rounds"], 1)
      alpha = per_token_alpha(mean_acc, g)
      row = {"batch": b, "decoding": name, "acceptance": st["acceptance_rate"],
             "alpha": alpha, "draft_cost_c": c}
      if name == "greedy":
        row.update(sd_over_ar=secs["ar"] / secs["sd"], sd_predicted=sd_prediction(alpha, g, c))
        if not args.no_se:
          np.testing.assert_array_equal(np.asarray(outs["se"].tokens),
                                        np.asarray(outs["ensemble"].tokens))
          se_st = outs["se"].stats.to_dict()
          se_alpha = se_st["acceptance_rate"] or 0.0
          row.update(se_over_ensemble=secs["ensemble"] / secs["se"],
                     se_predicted=se_prediction(se_alpha, g, 1, c), se_acceptance=se_alpha)
      rows.append(row)
    record[f"batch{b}_seconds"] = secs
  cols = ["batch", "decoding", "acceptance", "alpha", "draft_cost_c", "sd_over_ar",
          "sd_predicted", "se_over_ensemble", "se_predicted"]
  print(table(rows, cols))
  distill = Path(args.draft) / "distill.json"
  extra = {"seconds": record, "distill": json.loads(distill.read_text()) if distill.is_file()
           else None}
  if extra["distill"]:
    extra["distill"].pop("evals", None)
  path = write_results(args.out, "draft", {"target": args.target, "draft": args.draft,
                                           "gamma": g, "max_new_tokens": n,
                                           "prompts": "draft.prompts test split"}, rows, **extra)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
