"""A draft on its real target: acceptance, and sd / se speed-ups next to their priced prediction.

    python -m benchmarks.draft_bench --draft DRAFT_DIR          # target: SmolLM2 (the demo's cache)
    python -m benchmarks.draft_bench --identical                # draft = target (acceptance 1)

On the held-out chat prompts (`jax_specens.draft.prompts`, split "test", --prompt-family: the
first family by default), greedy, at each batch of
--batches, in one run so that the ratios are measured side by side on the same (possibly busy)
machine:
- sd over ar and se (wprob, equal weights, gamma (g, 1)) over ensemble, measured (the minimum of
  --repeats timed calls after a compiling one);
- next to each, the docs/algorithms.md §3 prediction priced by `jax_specens.pricing`: the decode's
  own per-token acceptance alpha (accepted / (accepted + rejections)) and the measured seconds of
  one jitted pass of every width the loop runs (sd: a width-2 and g - 1 width-1 draft passes, one
  width-(g+1) target pass per step) and of the step's sampling and verification math
  (`pricing.measure_math_costs`; the baseline's token gets its draw), timed in every round right
  after the decodes and kept as
  the least over rounds like the decodes' own seconds, so a host that slows down between phases
  does not skew the ratios. `predicted` is per round (tokens per step / priced step),
  `predicted_run` this call (the slowest row of the batch, --max-new-tokens, the prefills);
  `ratio` = measured / predicted; `predicted_loop` prices the baseline's token from the ar /
  ensemble loop's own time instead of a 1-token pass timed alone; `predicted_rows` takes the
  baseline's measured time and prices this call with each row's own alpha (the loop waits for
  the slowest row; `steps_rows` its steps), so `ratio_rows` = priced / measured seconds
  (`benchmarks/common.priced`);
- the greedy output of sd equals ar's and se's equals ensemble's (checked).
--gamma takes a list (`1,2,3`: a row per gamma, sharing the ar / ensemble timings), and
`--kernels xla,cpu` times every row with XLA's products and with the opt-in CPU kernel
(`JAX_SPECENS_CPU_KERNELS`, `jax_specens/kernels`), one setting after the other in this process.
Writes benchmarks/results/draft.json (draft_identical.json with --identical, draft_features.json
for a draft that reads the target's hidden states, whose first pass per step feeds up to g + 1
tokens: sd rows only).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common, hf_models
from jax_specens import pricing
from jax_specens.builtin import resolve
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decoding.api import decode
from jax_specens.draft.prompts import FAMILIES, prompts as chat_prompts
from jax_specens.kernels import cpu

COLUMNS = ["batch", "prompt", "kernel", "method", "gamma", "alpha", "c", "measured", "predicted",
           "ratio", "predicted_run", "ratio_run", "predicted_loop", "ratio_loop", "predicted_rows",
           "ratio_rows", "steps", "steps_predicted", "steps_rows", "step_ms_priced",
           "step_ms_measured"]


def load_pair(tmp: Path, rows: int, *, small: bool, identical: bool, target: str | None,
              draft: str | None, prompt_family: str):
  """(target, draft, prompts [rows, T], lengths, description). small: a converted random pair
  (in `tmp`) and random prompts; else the `target` dir (None: SmolLM2 from the user cache), the
  `draft` dir or the target itself (`identical`), and the held-out chat prompts of
  `prompt_family`. Every option is named at the call (draft_bench's and gamma_auto's)."""
  if small:
    pair = hf_models.build_pair(tmp, "small")
    t, d = load_model(pair.target_dir), load_model(pair.draft_dir)
    toks, lens = common.random_prompts(rows, 12, t.config.vocab_size)
    return t, (t if identical else d), toks, lens, "converted random pair 'small'"
  from jax_specens.draft import data as D
  target_dir = common.real_model(target, "smollm2")
  t = load_model(target_dir)
  if identical:
    d, what = t, f"{target_dir} (draft = target)"
  else:
    share = "share_from" in inspect.signature(load_model).parameters  # a distilled draft's embedding
    d = load_model(draft, share_from=[t]) if share else load_model(draft)
    what = f"{target_dir} + draft {draft}"
  tok = load_tokenizer(target_dir)
  chats = [D.chat_ids(tok, p) for p in chat_prompts("test", prompt_family)]
  toks, lens = D.pad(chats[:rows], max(map(len, chats)))
  return t, d, toks, lens, what


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",")]


def batch_rows(args, target, draft, toks, lens, n: int, repeats: int) -> tuple[list[dict], dict]:
  """At one batch (the rows of `toks`): ar, ensemble, and sd / se at every gamma, compiled first
  and then timed side by side; greedy sd == ar and se == ensemble checked; each speed-up priced
  from the decode's acceptance and the pass costs measured here."""
  b, t = toks.shape

  def run(models, method, **kw):
    return decode(models, toks, lens, method=method, max_new_tokens=n, temperature=0.0,
                  key=jax.random.key(0), **kw)

  calls = {"ar": lambda: run(target, "ar")}
  calls |= {("sd", g): (lambda g=g: run(target, "sd", draft=draft, gamma=g)) for g in args.gamma}
  if not (args.no_se or draft.config.feature_input):  # a feature draft is no ensemble member
    calls["ensemble"] = lambda: run([draft, target], "ensemble", weights=(0.5, 0.5))
    calls |= {("se", g): (lambda g=g: run([draft, target], "se", weights=(0.5, 0.5),
                                          gamma=(g, 1))) for g in args.gamma}
  secs, outs, rounds = {}, {}, []
  for f in calls.values():  # compile every program first, then time them side by side
    jax.block_until_ready(f())
  for _ in range(repeats):  # each round: every decode, then every pass they are priced from
    for k, f in calls.items():
      t0 = time.perf_counter()
      outs[k] = jax.block_until_ready(f())
      secs[k] = min(secs.get(k, np.inf), time.perf_counter() - t0)
    rounds.append(common.pass_costs([draft, target], [(g, 1) for g in args.gamma], b,
                                    t + n + max(args.gamma) + 1, t + n // 2, t, repeats=3))
  costs = pricing.PassCosts.fastest(rounds)  # the least of each, as for the decodes
  c = costs.of(0, 1) / costs.of(1, 1)
  rows = []
  for (method, g) in [k for k in calls if isinstance(k, tuple)]:
    base = "ar" if method == "sd" else "ensemble"
    np.testing.assert_array_equal(np.asarray(outs[method, g].tokens), np.asarray(outs[base].tokens))
    rows.append({"batch": b, "method": method, "c": c, **common.priced(
        outs[method, g], secs[method, g], secs[base], (g, 1), costs, method, n, t)})
  seconds = {k if isinstance(k, str) else f"{k[0]}{k[1]}": v for k, v in secs.items()}
  return rows, {"seconds": seconds, "pass_costs": costs.to_dict()}


def over_prompts(rows: list[dict], measured: list[dict]) -> list[dict]:
  """One row per (method, gamma) over prompts timed one at a time: measured = the baseline's
  summed seconds / the method's summed seconds, alpha the mean over the prompts."""
  out = []
  for method, base in (("sd", "ar"), ("se", "ensemble")):
    for g in sorted({tuple(r["gamma"]) for r in rows if r["method"] == method}):
      mine = [r for r in rows if r["method"] == method and tuple(r["gamma"]) == g]
      total = lambda key: sum(m["seconds"][key] for m in measured)
      out.append({"kernel": mine[0]["kernel"], "prompt": "all", "batch": 1, "method": method,
                  "gamma": list(g), "c": float(np.mean([r["c"] for r in mine])),
                  "alpha": float(np.mean([r["alpha"] for r in mine])),
                  "measured": total(base) / total(f"{method}{g[0]}")})
  return out


def main(argv=None) -> int:
  ap = common.base_parser(__doc__.split("\n\n")[0])
  ap.add_argument("--target", default=None, help="target model dir (default: SmolLM2 from the "
                  "user cache `jax-specens demo` fills)")
  ap.add_argument("--draft", default=None, help="draft model dir (or --identical)")
  ap.add_argument("--identical", action="store_true", help="the target is its own draft")
  ap.add_argument("--gamma", type=_ints, default=[4], help="one gamma or a list: 1,2,3")
  ap.add_argument("--kernels", type=lambda s: s.split(","), default=["xla"],
                  help="xla, cpu or xla,cpu: the matrix products of every decode by XLA, by the "
                  "opt-in CPU kernel (JAX_SPECENS_CPU_KERNELS=1), or each in turn")
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--small: 12)")
  ap.add_argument("--batches", type=_ints, default=[1, 8])
  ap.add_argument("--batch1-prompts", type=int, default=1, metavar="N",
                  help="at batch 1, time each of the first N held-out prompts in turn (a row per "
                  "prompt) and add a row 'all' over them: summed baseline seconds / summed "
                  "seconds, mean alpha (default 1: the first prompt only)")
  ap.add_argument("--prompt-family", default="first", choices=FAMILIES,
                  help="held-out prompts of this family (jax_specens/draft/prompts.py): first "
                  "(programming, science, everyday questions; the default, as in every earlier "
                  "run), general (descriptions and stories), openings (beginnings of stories and "
                  "articles) or all")
  ap.add_argument("--no-se", action="store_true", help="skip the se / ensemble rows (always "
                  "skipped for a draft that reads the target's features: sd only)")
  args = ap.parse_args(argv)
  if not (args.draft or args.identical or args.small):
    ap.error("give --draft DIR, or --identical (draft = target)")
  if not set(args.kernels) <= {"xla", "cpu"}:
    ap.error(f"--kernels takes xla, cpu or xla,cpu; got {','.join(args.kernels)}")
  if "cpu" in args.kernels and not cpu.available():
    ap.error("--kernels cpu: the CPU kernel is not available here (see the warning above)")
  if min(args.gamma) < 1:
    ap.error(f"--gamma must be >= 1, got {args.gamma}")
  n = args.max_new_tokens or (12 if args.small else 64)
  repeats = 1 if args.small else args.repeats
  rows, record = [], {}
  with tempfile.TemporaryDirectory() as tmp, common.restored_env(cpu.ENV):
    rows_needed = max(max(args.batches), args.batch1_prompts if 1 in args.batches else 1)
    target, draft, all_toks, all_lens, what = load_pair(
        Path(tmp), rows_needed, small=args.small, identical=args.identical, target=args.target,
        draft=args.draft, prompt_family=args.prompt_family)
    print(f"models: {what}; gamma {args.gamma}, {n} new tokens, greedy", flush=True)
    for b in args.batches:
      for kernel in args.kernels:
        os.environ[cpu.ENV] = "1" if kernel == "cpu" else "0"
        jax.clear_caches()  # the setting is read when a program is traced
        starts = range(args.batch1_prompts) if b == 1 else [0]
        new, measured = [], []
        for i in starts:
          r, m = batch_rows(args, target, draft, all_toks[i:i + b], all_lens[i:i + b], n, repeats)
          new += [{"kernel": kernel, **({"prompt": i} if b == 1 else {}), **x} for x in r]
          measured.append(m)
        if len(starts) > 1:
          new += over_prompts(new, measured)
        rows += new
        record[f"batch{b}_{kernel}"] = measured[0] if len(measured) == 1 else measured
        print(common.table(new, COLUMNS), flush=True)
  print("\n" + common.table(rows, COLUMNS))
  distill = Path(resolve(args.draft)) / "distill.json" if args.draft else None
  extra = {"measurements": record,
           "distill": json.loads(distill.read_text()) if distill and distill.is_file() else None}
  if extra["distill"]:
    extra["distill"].pop("evals", None)
  name = ("draft_identical" if args.identical else
          "draft_features" if draft.config.feature_input else "draft")
  path = common.write_results(args.out, name + ("_small" if args.small else ""),
                              {"models": what, "gamma": args.gamma, "max_new_tokens": n,
                               "batches": args.batches, "kernels": args.kernels,
                               "repeats": repeats,
                               "prompts": "random" if args.small else
                               f"draft.prompts test split, family {args.prompt_family}"},
                              rows, **extra)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
