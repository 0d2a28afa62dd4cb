"""Fusion measured on the real cross-tokenizer pair: each model alone vs CoSD with the rule, the
tree and the learned verifier, on held-out code, prose and short questions.

    python -m benchmarks.cosd_real_fusion [--draft DIR] [--model DIR] [--docs 6] [--test-docs 6]
        [--small]

Draft SmolLM2-135M-Instruct, assistant Gemma-3-270M (different tokenizers; without --draft /
--model, the ones `jax-specens demo` converts into its user cache). The held-out set is
`jax_specens.fusion.realeval_data` (fixed, offline), split by document into a fusion part and a
test part; nothing is tuned on the test part.

1. The fusion part is harvested teacher-forced across the two tokenizers
   (`fusion.cross_harvest.harvest_cross`) and the tree and the learned verifier head are trained
   on it (`fusion.pipeline.train_on_harvest`, what `jax-specens train-fusion` runs; split by
   document for early stopping).
2. Teacher-forced, on the test part: next-token accuracy at the verifiable positions (a draft
   token starting where an assistant token starts). Draft alone: x~ is the reference's draft
   token; assistant alone: x^ is the reference's assistant token; CoSD: x^ where the verifier
   replaces (a replaceable position), else x~; "share": how often CoSD takes x^. QA items score
   their answer's positions only. `mixed` pools the positions of all three domains.
3. Generation, on the test questions: each model alone (`generate_text`) and `cosd_text` with
   each verifier answer the same plain prompt ("Question: ...\\nAnswer:", no chat template),
   greedy, at most `--new` tokens; exact match when an accepted answer appears in the first
   line written.

Writes results/cosd_real_fusion.json and .png; --small: a few documents, for tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import bar_plot, real_model, table, write_results
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.fusion import cosd_text
from jax_specens.fusion import realeval_data as R
from jax_specens.fusion.cross_harvest import harvest_cross
from jax_specens.fusion.pipeline import FusionRecipe, train_on_harvest
from jax_specens.fusion.train import TrainConfig
from jax_specens.fusion.verifier import load_verifier
from jax_specens.text import generate_text

ALONE = ("draft alone", "assistant alone")
COSD = ("cosd rule", "cosd tree", "cosd learned")
GROUPS = R.DOMAINS + ("mixed",)


class Clock:
  """Wall seconds of each phase, printed as they end."""

  def __init__(self):
    self.t, self.laps = time.perf_counter(), {}

  def __call__(self, phase: str) -> None:
    now = time.perf_counter()
    self.laps[phase] = round(now - self.t, 1)
    self.t = now
    print(f"[{phase}: {self.laps[phase]} s]", flush=True)


def held_out(part: str, docs: int, max_bytes: int) -> list[R.Item]:
  """`docs` code and `docs` prose documents of `part`, and every QA item of it."""
  return (R.items("code", part, docs, max_bytes) + R.items("prose", part, docs, max_bytes)
          + R.items("qa", part))


def harvest(pair, items: list[R.Item], progress: bool):
  return harvest_cross(*pair, [i.text for i in items], scored_from=[i.scored_from for i in items],
                       max_bytes=1 << 20, progress=progress)


def teacher_forced(data, items: list[R.Item], verifiers: dict) -> dict:
  """{group: {method: accuracy, share, positions}} on the harvest of the test part."""
  domain = np.asarray([items[d].domain for d in data.harvest.docs])
  out = {}
  for group in GROUPS:
    part = data.take(domain == group) if group != "mixed" else data
    row = {"positions": len(part),
           "draft alone": {"accuracy": float(np.mean(part.draft_ok)), "share": 0.0},
           "assistant alone": {"accuracy": float(np.mean(part.assistant_ok)), "share": 1.0}}
    for name, verifier in verifiers.items():
      correct, replaced = part.choose(verifier)
      row[f"cosd {name}"] = {"accuracy": float(np.mean(correct)),
                             "share": float(np.mean(replaced))}
    out[group] = row
  return out


def answers(pair, qa: list[R.Item], verifiers: dict, new: int, window: int, progress: bool
            ) -> dict:
  """{method: {exact_match, texts[, assistant_share]}} for the QA prompts, greedy."""
  draft, assistant, tok_d, tok_a = pair
  prompts = [i.prompt for i in qa]
  out = {}
  for name, model, tok in (("draft alone", draft, tok_d), ("assistant alone", assistant, tok_a)):
    texts = generate_text(model, prompts, tokenizer=tok, max_new_tokens=new, temperature=0.0,
                          chat=False).texts
    out[name] = {"texts": texts}
  for name, verifier in verifiers.items():
    res = cosd_text(draft, assistant, tok_d, tok_a, prompts, max_new_tokens=new, window=window,
                    temperature=0.0, verifier=verifier, progress=progress)
    emitted = sum(s.draft_tokens + s.assistant_tokens for s in res.stats)
    out[f"cosd {name}"] = {"texts": res.texts, "assistant_share":
                           sum(s.assistant_tokens for s in res.stats) / max(emitted, 1)}
  for name, r in out.items():
    r["exact_match"] = float(np.mean([R.exact_match(t, i.answers) for t, i in zip(r["texts"], qa)]))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--draft", help="draft model dir (default: SmolLM2 from the demo's cache)")
  ap.add_argument("--model", help="assistant model dir (default: Gemma 3 from the demo's cache)")
  ap.add_argument("--docs", type=int, default=6,
                  help="code and prose documents each of the fusion part (default 6)")
  ap.add_argument("--test-docs", type=int, default=6,
                  help="code and prose documents each of the test part (default 6)")
  ap.add_argument("--max-bytes", type=int, default=400, help="bytes per document excerpt")
  ap.add_argument("--new", type=int, default=16, help="tokens written per question (default 16)")
  ap.add_argument("--window", type=int, default=4, help="cosd draft window (default 4)")
  ap.add_argument("--steps", type=int, default=300, help="verifier head training steps")
  ap.add_argument("--small", action="store_true", help="a check in minutes: 3 + 3 documents and the QA items of the fusion part, 2 + 2 "
                  "and 4 questions of the test part")
  ap.add_argument("--repeats", type=int, default=1, help="unused: every number is one pass")
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  if args.small:
    args.docs, args.test_docs, args.steps = 3, 2, 50
  clock = Clock()
  draft_dir, model_dir = real_model(args.draft, "smollm2"), real_model(args.model, "gemma3")
  pair = (load_model(draft_dir), load_model(model_dir), load_tokenizer(draft_dir),
          load_tokenizer(model_dir))
  clock("load")
  fusion_items = held_out("fusion", args.docs, args.max_bytes)
  test_items = held_out("test", args.test_docs, args.max_bytes)
  if args.small:
    test_items = [i for i in test_items if i.domain != "qa"] + R.items("qa", "test")[:4]
  progress = not args.no_progress
  train = harvest(pair, fusion_items, progress)
  clock("harvest fusion part")
  recipe = FusionRecipe(heads="verifier", train=TrainConfig(max_steps=args.steps))
  with tempfile.TemporaryDirectory() as tmp:
    fit = train_on_harvest(train.harvest, f"{tmp}/v", recipe, progress=progress)
    verifiers = {"rule": load_verifier("rule"), "tree": load_verifier("tree", f"{tmp}/v"),
                 "learned": load_verifier("learned", f"{tmp}/v/head")}
  clock("train tree and head")
  test = harvest(pair, test_items, progress)
  tf = teacher_forced(test, test_items, verifiers)
  clock("harvest test part")
  qa = [i for i in test_items if i.domain == "qa"]
  gen = answers(pair, qa, verifiers, args.new, args.window, progress)
  clock("answer questions")

  methods = ALONE + COSD
  cols = ["method"] + [f"{g} acc" for g in GROUPS] + ["mixed share", "QA exact match"]
  rows = [{"method": m, **{f"{g} acc": tf[g][m]["accuracy"] for g in GROUPS},
           "mixed share": tf["mixed"][m]["share"], "QA exact match": gen[m]["exact_match"]}
          for m in methods]
  print(table(rows, cols))
  print("positions: " + ", ".join(f"{g} {tf[g]['positions']}" for g in GROUPS)
        + f"; QA questions {len(qa)}")
  best_alone = max(tf["mixed"][m]["accuracy"] for m in ALONE)
  best = max(COSD, key=lambda m: tf["mixed"][m]["accuracy"])
  acc = {m: tf["mixed"][m]["accuracy"] for m in COSD}
  summary = {"best_fused": best, "best_fused_beats_both_alone": acc[best] > best_alone,
             "learned>=tree>=rule": acc["cosd learned"] >= acc["cosd tree"] >= acc["cosd rule"]}
  print(f"mixed: best fused {best} {acc[best]:.3f} vs best model alone {best_alone:.3f}; "
        f"learned >= tree >= rule: {summary['learned>=tree>=rule']}")
  config = vars(args) | {"draft": str(draft_dir), "model": str(model_dir),
                         "fusion_documents": len(fusion_items), "test_documents": len(test_items)}
  write_results(args.out, "cosd_real_fusion", config, rows, teacher_forced=tf, generation=gen,
                fusion_training=fit, summary=summary,
                seconds=clock.laps)
  plot(f"{args.out}/cosd_real_fusion.png", tf, gen)
  return 0


def plot(path, tf: dict, gen: dict):
  """Grouped bars: teacher-forced accuracy per domain and QA exact match, per method."""
  return bar_plot(path, [f"{g} (TF acc)" for g in GROUPS] + ["QA exact match"],
                  {m: [tf[g][m]["accuracy"] for g in GROUPS] + [gen[m]["exact_match"]]
                   for m in ALONE + COSD},
                  "accuracy", "SmolLM2 drafts, Gemma-3-270M assists: held-out test part")


if __name__ == "__main__":
  raise SystemExit(main())
