"""A draft on its real target: acceptance, and sd / se speed-ups next to their priced prediction.

    python -m benchmarks.draft_bench --draft DRAFT_DIR          # target: SmolLM2 (the demo's cache)
    python -m benchmarks.draft_bench --identical                # draft = target (acceptance 1)

On the held-out chat prompts (`jax_specens.draft.prompts`, split "test"), greedy, at each batch of
--batches, in one run so that the ratios are measured side by side on the same (possibly busy)
machine:
- sd over ar and se (wprob, equal weights, gamma (g, 1)) over ensemble, measured (the minimum of
  --repeats timed calls after a compiling one);
- next to each, the docs/algorithms.md §3 prediction priced by `jax_specens.pricing`: the decode's
  own per-token acceptance alpha (accepted / (accepted + rejections)) and the measured seconds of
  one jitted pass of every width the loop runs (sd: a width-2 and g - 1 width-1 draft passes, one
  width-(g+1) target pass per step). `predicted` is per round (tokens per step / priced step),
  `predicted_run` this call (the slowest row of the batch, --max-new-tokens, the prefills);
  `ratio` = measured / predicted;
- the greedy output of sd equals ar's and se's equals ensemble's (checked).
Writes benchmarks/results/draft.json (draft_identical.json with --identical).
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common, hf_models
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decode import decode

COLUMNS = ["batch", "method", "gamma", "alpha", "c", "measured", "predicted", "ratio",
           "predicted_run", "ratio_run", "steps", "steps_predicted", "step_ms_priced",
           "step_ms_measured"]


def load_pair(args, tmp: Path):
  """(target, draft, prompts [B, T], lengths, description)."""
  if args.small:
    pair = hf_models.build_pair(tmp, "small")
    target, draft = load_model(pair.target_dir), load_model(pair.draft_dir)
    toks, lens = common.random_prompts(max(args.batches), 12, target.config.vocab_size)
    return target, (target if args.identical else draft), toks, lens, "converted random pair 'small'"
  from jax_specens.draft import data as D
  from jax_specens.draft.prompts import prompts as chat_prompts
  target_dir = common.real_model(args.target, "smollm2")
  target = load_model(target_dir)
  if args.identical:
    draft, what = target, f"{target_dir} (draft = target)"
  else:
    share = "share_from" in inspect.signature(load_model).parameters  # a distilled draft's embedding
    draft = load_model(args.draft, share_from=[target]) if share else load_model(args.draft)
    what = f"{target_dir} + draft {args.draft}"
  tok = load_tokenizer(target_dir)
  rows = [D.chat_ids(tok, p) for p in chat_prompts("test")]
  toks, lens = D.pad(rows[:max(args.batches)], max(map(len, rows)))
  return target, draft, toks, lens, what


def main(argv=None) -> int:
  ap = common.base_parser(__doc__.split("\n\n")[0])
  ap.add_argument("--target", default=None, help="target model dir (default: SmolLM2 from the "
                  "user cache `jax-specens demo` fills)")
  ap.add_argument("--draft", default=None, help="draft model dir (or --identical)")
  ap.add_argument("--identical", action="store_true", help="the target is its own draft")
  ap.add_argument("--gamma", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--small: 12)")
  ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
  ap.add_argument("--no-se", action="store_true", help="skip the se / ensemble rows")
  args = ap.parse_args(argv)
  if not (args.draft or args.identical or args.small):
    ap.error("give --draft DIR, or --identical (draft = target)")
  g, n = args.gamma, args.max_new_tokens or (12 if args.small else 64)
  repeats = 1 if args.small else args.repeats
  rows, record = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    target, draft, all_toks, all_lens, what = load_pair(args, Path(tmp))
    print(f"models: {what}; gamma {g}, {n} new tokens, greedy", flush=True)
    for b in args.batches:
      toks, lens = all_toks[:b], all_lens[:b]
      t = toks.shape[1]

      def run(models, method, **kw):
        return decode(models, toks, lens, method=method, max_new_tokens=n, temperature=0.0,
                      key=jax.random.key(0), **kw)

      calls = {"ar": lambda: run(target, "ar"),
               "sd": lambda: run(target, "sd", draft=draft, gamma=g)}
      if not args.no_se:
        calls["ensemble"] = lambda: run([draft, target], "ensemble", weights=(0.5, 0.5))
        calls["se"] = lambda: run([draft, target], "se", weights=(0.5, 0.5), gamma=(g, 1))
      secs, outs = {}, {}
      for f in calls.values():  # compile every program first, then time them side by side
        jax.block_until_ready(f())
      for _ in range(repeats):
        for k, f in calls.items():
          t0 = time.perf_counter()
          outs[k] = jax.block_until_ready(f())
          secs[k] = min(secs.get(k, np.inf), time.perf_counter() - t0)
      np.testing.assert_array_equal(np.asarray(outs["sd"].tokens), np.asarray(outs["ar"].tokens))
      costs = common.pass_costs([draft, target], [(g, 1)], b, t + n + g + 1, t + n // 2, t,
                                repeats=max(repeats, 3))
      c = costs.of(0, 1) / costs.of(1, 1)
      rows.append({"batch": b, "method": "sd", "c": c, **common.priced(
          outs["sd"], secs["sd"], secs["ar"], (g, 1), costs, "sd", n, t)})
      if not args.no_se:
        np.testing.assert_array_equal(np.asarray(outs["se"].tokens),
                                      np.asarray(outs["ensemble"].tokens))
        rows.append({"batch": b, "method": "se", "c": c, **common.priced(
            outs["se"], secs["se"], secs["ensemble"], (g, 1), costs, "se", n, t)})
      record[f"batch{b}"] = {"seconds": secs, "pass_costs": costs.to_dict()}
      print(common.table(rows[-2:], COLUMNS), flush=True)
  print("\n" + common.table(rows, COLUMNS))
  distill = Path(args.draft) / "distill.json" if args.draft else None
  extra = {"measurements": record,
           "distill": json.loads(distill.read_text()) if distill and distill.is_file() else None}
  if extra["distill"]:
    extra["distill"].pop("evals", None)
  name = "draft_identical" if args.identical else "draft"
  path = common.write_results(args.out, name + ("_small" if args.small else ""),
                              {"models": what, "gamma": g, "max_new_tokens": n,
                               "batches": args.batches, "repeats": repeats,
                               "prompts": "random" if args.small else "draft.prompts test split"},
                              rows, **extra)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
