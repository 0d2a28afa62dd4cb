"""`jax-specens train-fusion`: fit CoSD verifiers (tree, learned head) and ensemble weights."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Run the draft (--draft) and the assistant (--model) teacher-forced over a text corpus, label every
position "replace" where only the assistant's top token matches the text and "keep" where the
draft's does (docs/algorithms.md §4), and fit on those labels: a decision tree (scikit-learn, exported to arrays),
a small neural verifier head and/or an ensemble-weights head (optax, early stopping on a held-out
split). Prints held-out accuracy / AUC of the rule, the tree and the learned head.

OUT (created only when complete): tree.json, head/, weights_head/, metrics.json.
Models with one shared tokenizer read the corpus in windows of --seq-len tokens. Models with
different tokenizers (cross-tokenizer CoSD, e.g. SmolLM2 drafting for Gemma 3) read each document
in pieces of at most --max-bytes bytes, each tokenized by both; positions are the draft tokens
that start where an assistant token starts (byte offsets), and only the verifier head is trained
(ensemble weights need one vocabulary).

example:  jax-specens train-fusion --draft ./small --model ./big --data a.txt b.txt --out ./fusion
use it:   jax-specens generate --method cosd --draft ./small --model ./big \\
              --verifier learned --verifier-path ./fusion --prompt "..." --max-new-tokens 64
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "train-fusion", help="train CoSD tree / learned verifiers and learned ensemble weights",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--draft", required=True, metavar="DIR", help="draft model checkpoint dir")
  p.add_argument("--model", required=True, metavar="DIR",
                 help="assistant model checkpoint dir (the second model)")
  p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                 help="UTF-8 text files (blank lines separate documents)")
  p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
  p.add_argument("--head", choices=("verifier", "weights", "both"), default="both",
                 help="which learned head(s) to train (default: both; only verifier for "
                 "different tokenizers)")
  p.add_argument("--steps", type=int, default=400, help="max training steps per head")
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--hidden", type=int, default=32, help="head hidden size")
  p.add_argument("--eval-fraction", type=float, default=0.2,
                 help="share of positions held out for early stopping and metrics")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per harvested window")
  p.add_argument("--max-bytes", type=int, default=600,
                 help="bytes per piece of a document (different tokenizers only; default 600)")
  p.add_argument("--tree-depth", type=int, default=4)
  p.add_argument("--alpha", type=float, default=0.5, help="the rule's alpha (for comparison)")
  p.add_argument("--beta", type=float, default=0.5, help="the rule's beta (for comparison)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint-dir", metavar="DIR",
                 help="orbax directory to checkpoint head training in; rerun to resume")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(run=run)
  return p


def run(args: argparse.Namespace) -> int:
  import dataclasses
  from pathlib import Path

  from jax_specens.checkpoint import load_model, load_tokenizer
  from jax_specens.fusion.cross_harvest import harvest_cross
  from jax_specens.fusion.pipeline import (FusionRecipe, read_texts, train_fusion,
                                           train_on_harvest)
  from jax_specens.fusion.train import TrainConfig

  if args.max_bytes < 16:
    raise ValueError(f"--max-bytes must be >= 16 (bytes per document piece); got {args.max_bytes}")
  if Path(args.out).exists() and not args.overwrite:
    raise FileExistsError(f"output directory {args.out} already exists; pass --overwrite")
  recipe = FusionRecipe(
      heads=args.head, eval_fraction=args.eval_fraction, seq_len=args.seq_len,
      tree_depth=args.tree_depth, alpha=args.alpha, beta=args.beta,
      train=TrainConfig(max_steps=args.steps, learning_rate=args.learning_rate,
                        hidden_size=args.hidden, seed=args.seed))
  texts = read_texts(args.data)
  tokenizer = load_tokenizer(args.draft)
  if tokenizer is None:
    raise ValueError(f"{args.draft} has no tokenizer files (tokenizer.json); train-fusion reads "
                     "text with the models' tokenizers")
  other = load_tokenizer(args.model)
  cross = other is not None and other.get_vocab() != tokenizer.get_vocab()
  if cross and args.head == "weights":
    raise ValueError("--head weights needs one shared tokenizer; the draft and the assistant use "
                     "different ones: use --head verifier")
  models = [load_model(args.draft), load_model(args.model)]
  kw = dict(overwrite=args.overwrite, checkpoint_dir=args.checkpoint_dir,
            progress=not args.quiet)
  if cross:
    data = harvest_cross(*models, tokenizer, other, texts, max_bytes=args.max_bytes,
                         progress=not args.quiet)
    recipe = dataclasses.replace(recipe, heads="verifier")
    metrics = train_on_harvest(data.harvest, args.out, recipe, **kw)
  else:
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    metrics = train_fusion(models, sequences, args.out, recipe, **kw)
  print(json.dumps(metrics["verifiers"], indent=2))
  print(f"wrote {args.out}")
  return 0
