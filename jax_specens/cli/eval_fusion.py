"""`jax-specens eval-fusion`: single models vs. ensembles vs. CoSD on held-out text of both domains.

Teacher-forced, on the held-out `test` split of the built-in corpora (code and prose from the
interpreter's standard library) and on both together (`mixed`, the same number of windows of each):
next-token accuracy and perplexity of

    code, prose, draft                  each built-in model alone
    ensemble wprob / wlogit / learned   the two specialists, uniform weighted probabilities /
                                        weighted logits, and per-position weights from a fusion head
    cosd rule / tree / learned          CoSD, code specialist drafting and prose specialist
                                        assisting, with each verifier (docs/algorithms.md §4)

Then greedy text: each model and the wprob ensemble continue the demo's prompts by
--greedy-tokens tokens, and the share of distinct 3-grams of each continuation is reported
(1.0: no 3-gram repeats; a loop like "the the the" tends to 0; `builtin/repetition.py`).

The tree and the two fusion heads are first trained on the separate `fusion` split. Writes
OUT/eval_fusion.json, OUT/eval_fusion.md (the table), OUT/eval_fusion.png (needs matplotlib:
`pip install 'jax_specens[plot]'`) and the trained verifiers (OUT/verifiers/: tree.json, head/,
weights_head/, metrics.json, as `jax-specens train-fusion` writes them — usable with
`decode(..., method="cosd", verifier="tree", verifier_path=OUT/verifiers)`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "eval-fusion", help="accuracy / perplexity of single models, ensembles and CoSD on "
      "held-out text (built-in models)", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=Path, default=Path("eval_fusion"),
                 help="output directory (default ./eval_fusion)")
  p.add_argument("--models-dir", default=None, metavar="DIR",
                 help="models trained with `jax-specens train-builtin --out DIR` instead of the "
                 "built-in ones")
  p.add_argument("--seq-len", type=int, default=256, help="window length in tokens (default 256)")
  p.add_argument("--test-windows", type=int, default=48,
                 help="held-out windows scored per domain (default 48)")
  p.add_argument("--fusion-windows", type=int, default=48,
                 help="windows per domain of the fusion split used to train the verifiers and "
                 "the weights head (default 48)")
  p.add_argument("--head-steps", type=int, default=300,
                 help="maximum training steps of each fusion head (default 300)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
  p.add_argument("--greedy-tokens", type=int, default=32,
                 help="tokens of greedy text per demo prompt for the distinct 3-gram share "
                 "(default 32)")
  p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(run=run)
  return p


def run(args: argparse.Namespace) -> int:
  for name in ("seq_len", "test_windows", "fusion_windows", "head_steps", "batch_size",
               "greedy_tokens"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.seq_len < 2:
    raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
  if not args.no_plot:
    try:
      import matplotlib  # noqa: F401  (fail before the long work, not after it)
    except ImportError as e:
      raise ValueError("the PNG plot needs matplotlib: pip install 'jax_specens[plot]', or pass "
                       "--no-plot") from e
  from jax_specens.builtin import builtin_model, builtin_tokenizer
  from jax_specens.builtin import fusion_eval as fe
  from jax_specens.builtin.repetition import greedy_repetition
  from jax_specens.cli.demo import PROMPTS as DEMO_PROMPTS

  t0 = time.perf_counter()
  settings = fe.Settings(seq_len=args.seq_len, test_windows=args.test_windows,
                         fusion_windows=args.fusion_windows, batch_size=args.batch_size,
                         head_steps=args.head_steps, progress=not args.no_progress)
  tok = builtin_tokenizer(args.models_dir)
  models = {n: builtin_model(n, models_dir=args.models_dir) for n in fe.SINGLE}
  print("tokenizing the fusion and test splits ...", flush=True)
  need = lambda windows: windows * args.seq_len + 1
  fusion_streams = fe.domain_tokens(tok, "fusion", need(args.fusion_windows))
  test_streams = fe.domain_tokens(tok, "test", need(args.test_windows))
  out = Path(args.out)
  verifiers, learned, fusion_metrics = fe.train_fusers(models, fusion_streams, settings,
                                                       out / "verifiers")
  table = fe.evaluate_methods(models, verifiers, learned, test_streams, settings)
  md = fe.markdown_table(table)
  best_single = min(table["mixed"][m]["perplexity"] for m in ("code", "prose"))
  best_fused = min(fe.ENSEMBLES + fe.COSD, key=lambda m: table["mixed"][m]["perplexity"])
  summary = (f"mixed held-out perplexity: best fused method {best_fused} "
             f"{table['mixed'][best_fused]['perplexity']:.2f} vs best specialist {best_single:.2f}")
  repetition = greedy_repetition(
      {**models, "ensemble wprob": [models["code"], models["prose"]]}, tok,
      [p for _, p in DEMO_PROMPTS], args.greedy_tokens)
  rep_md = repetition_table(repetition, args.greedy_tokens)
  record = {"settings": vars(args) | {"out": str(out)}, "table": table,
            "fusion_training": fusion_metrics, "summary": summary,
            "greedy_distinct_3grams": repetition,
            "seconds": round(time.perf_counter() - t0, 1)}
  (out / "eval_fusion.json").write_text(json.dumps(record, indent=2, default=str))
  (out / "eval_fusion.md").write_text(md + "\n\n" + rep_md + "\n")
  if not args.no_plot:
    fe.plot(table, out / "eval_fusion.png")
  print(md)
  print(summary)
  print(rep_md)
  print(f"wrote {out}/eval_fusion.json, eval_fusion.md" + ("" if args.no_plot else
                                                          ", eval_fusion.png"))
  return 0


def repetition_table(repetition: dict, tokens: int) -> str:
  """Markdown: per model, the mean and lowest share of distinct 3-grams over the demo prompts."""
  lines = [f"greedy text, {tokens} tokens per demo prompt: share of distinct 3-grams "
           "(1.0 = no repeated 3-gram)", "", "| model | mean | lowest |", "|---|---|---|"]
  lines += [f"| {name} | {r['mean']:.2f} | {r['min']:.2f} |" for name, r in repetition.items()]
  return "\n".join(lines)
