"""Cross-tokenizer CoSD on the real pair vs the two models' own greedy decodes, side by side.

    python -m benchmarks.cosd_cross_bench [--draft DIR] [--model DIR] [--new 32] [--window 4]
        [--repeats 3]

Draft SmolLM2-135M-Instruct (byte-level BPE, 49152 ids), assistant Gemma-3-270M (SentencePiece
with byte fallback, 262144 ids); without --draft / --model, the ones `jax-specens demo` converts
into its user cache. 8 prompts x `--new` tokens, greedy. Times are medians of
`--repeats` warm runs (compiles excluded: one untimed run first), all measured in this one run:
  * draft alone / assistant alone: `decode(method="ar")` of the same batch, its own tokenization;
  * cosd: `cosd_text` with the rule verifier (alpha = beta = 0.5).
The goal is cosd <= 1.2 x (draft alone + assistant alone). Writes results/cosd_cross.json.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from benchmarks.common import real_model, table, time_call, write_results
from jax_specens.checkpoint import load_model, load_tokenizer
from jax_specens.decoding.api import decode
from jax_specens.fusion import cosd_text

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of a list\n",
    "Water boils at a temperature of",
    "The best way to learn a new language is",
    "Question: What is 12 times 7?\nAnswer:",
]


def own_greedy(model, tok, prompts, new: int):
  """The model's own greedy decode of the batch (right-padded prompts, stop at its EOS)."""
  ids = [tok(p)["input_ids"] for p in prompts]
  width = max(len(x) for x in ids)
  batch = jnp.asarray(np.stack([np.pad(x, (0, width - len(x))) for x in ids]).astype(np.int32))
  lengths = jnp.asarray([len(x) for x in ids], jnp.int32)
  stops = sorted(set(model.config.eos_token_ids) | {tok.eos_token_id})
  return lambda: decode(model, batch, lengths, method="ar", max_new_tokens=new, temperature=0.0,
                        stop_ids=stops).tokens


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--draft", help="draft model dir (default: SmolLM2 from the demo's cache)")
  ap.add_argument("--model", help="assistant model dir (default: Gemma 3 from the demo's cache)")
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--window", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results")
  args = ap.parse_args(argv)
  draft_dir, model_dir = real_model(args.draft, "smollm2"), real_model(args.model, "gemma3")
  draft, assistant = load_model(draft_dir), load_model(model_dir)
  tok_d, tok_a = load_tokenizer(draft_dir), load_tokenizer(model_dir)
  runs = {
      "draft alone": own_greedy(draft, tok_d, PROMPTS, args.new),
      "assistant alone": own_greedy(assistant, tok_a, PROMPTS, args.new),
  }
  out = {}

  def cosd():
    out["cosd"] = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS, max_new_tokens=args.new,
                            window=args.window, temperature=0.0)
    return 0

  runs["cosd (rule)"] = cosd
  secs = {name: time_call(fn, repeats=args.repeats) for name, fn in runs.items()}
  both = secs["draft alone"] + secs["assistant alone"]
  st = out["cosd"].stats
  emitted = sum(s.draft_tokens + s.assistant_tokens for s in st)
  cols = ["run", "seconds (median)", "x (draft + assistant alone)"]
  print(table([dict(zip(cols, [name, f"{t:.2f}", f"{t / both:.2f}"])) for name, t in secs.items()],
              cols))
  summary = {
      "seconds": secs, "ratio_vs_both_alone": secs["cosd (rule)"] / both,
      "windows": sum(s.windows for s in st), "replacements": sum(s.replacements for s in st),
      "emitted_tokens": emitted, "assistant_share": sum(s.assistant_tokens for s in st) / emitted,
      "texts": out["cosd"].texts,
  }
  print(f"cosd / (draft + assistant alone) = {summary['ratio_vs_both_alone']:.2f} "
        f"(goal <= 1.2); {summary['windows']} windows, {summary['replacements']} replaced, "
        f"assistant's share {summary['assistant_share']:.1%}")
  config = vars(args) | {"draft": str(draft_dir), "model": str(model_dir), "prompts": PROMPTS}
  write_results(args.out, "cosd_cross", config, [summary])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
