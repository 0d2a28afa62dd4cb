"""`jax-specens train-draft`: distil a small draft with a reduced vocabulary from any target."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Distil a draft for speculative decoding (sd) and speculative ensembles (se) from TARGET:
a few of the target's layers (--layers, copied from it), its embedding (frozen, shared), and a
head over only the K target ids the target most often predicts (--vocab-k; EAGLE-3 style). The
draft's logits cover the target's whole vocabulary with -inf outside those K ids, so it proposes
target ids and sd / se stay exactly lossless.

Training data, all offline: the target's own greedy answers to the chat prompts shipped in
jax_specens/draft/prompts.py, and the Python standard library's prose and code labelled with the
target's top-T next-token distribution (teacher-forced). Loss: KL to the target's distribution;
AdamW (optax); held-out split by document (prompt or file); orbax checkpoints in
--checkpoint-dir (default OUT.ckpt), rerun the same command to resume. The teacher labels are
cached there too: on a CPU they are the slow part.

--features: a draft that also reads the target's hidden states (EAGLE style): its input at each
position is the token's embedding and the target's final-normed hidden state of the position
before, and along its chain of proposals its own. It serves sd only (not as an se member); the
labels then also hold the target's features (one more teacher pass over every row), and
--unroll N trains it along N of its own proposals. E.g. --features --layers 29 --unroll 2.
--feature-taps 2,15,26 also feeds it the target's layers 2, 15 and 26 (EAGLE-3; README "The
target's middle layers too").

OUT (created only when complete) is an ordinary model directory (usable as --draft, or as a
--model of an se ensemble) with distill.json: held-out agreement (greedy acceptance per token),
alpha (T=1 acceptance), loss, the draft's own bytes and its bytes read per token / the target's.

--init-from DIR continues a draft (a second phase): the shipped feature draft is the command
below with --features --layers 29 --unroll 2, then the same with --features --init-from the
first result --unroll 3 --learning-rate 5e-4 --checkpoint-dir the first's checkpoint dir, then
two phases on greedy answers (--chat-prompts 820, then 1148 with --keep last; README "A fourth
phase").
Gemma-3-270M's shipped draft: --features --layers 17 --vocab-k 16384 --unroll 3 --borrow-tokenizer
and a smaller text recipe, continued likewise, last on --prompt-family openings (README "A draft
for Gemma-3-270M").

example:  jax-specens train-draft --target models/smollm2 --out models/smollm2-draft
          (defaults: the recipe of the shipped SmolLM2-135M-Instruct draft, about 50 min of labels
          and 40 min of training on 2 CPU cores; --time-budget 5 --chat-prompts 64
          --text-tokens 4000 for a quick try)
use it:   jax-specens generate --model models/smollm2 --draft models/smollm2-draft \\
              --method sd --gamma 4 --prompt "What is gravity?" --temperature 0 \\
              --max-new-tokens 64
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  from jax_specens.draft.pipeline import GREEDY_LABELS, DraftRecipe
  from jax_specens.draft.prompts import FAMILIES
  from jax_specens.draft.prompts import prompts as chat_prompts
  from jax_specens.draft.train import KEEP, TrainConfig
  R = DraftRecipe()  # noqa: N806  (the flags' defaults are the recipe's)
  p = subparsers.add_parser(
      "train-draft", help="distil a small reduced-vocabulary draft model from a target",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", required=True, metavar="DIR", help="target model directory")
  p.add_argument("--out", required=True, metavar="DIR", help="output draft directory")
  p.add_argument("--layers", default=None,
                 help="comma-separated target layers copied into the draft (default: "
                 f"{','.join(map(str, R.layers))})")
  p.add_argument("--init-from", metavar="DIR",
                 help="continue training this draft of TARGET (a directory train-draft wrote, or "
                 "builtin:NAME) instead of starting from the target's layers: its layers and K ids "
                 "are kept. With the first phase's --checkpoint-dir its labels are reused; e.g. a "
                 "second phase with a longer --unroll")
  p.add_argument("--grow-layers", default=None, metavar="LAYERS",
                 help="with --init-from: comma-separated target layers inserted before the "
                 "continued draft's own, each starting as the identity (its output projections "
                 "zero), so training goes on from where that draft ended with more depth (e.g. "
                 "--grow-layers 28 on the SmolLM2 feature draft, started from layer 29)")
  p.add_argument("--vocab-k", type=int, default=R.vocab_k,
                 help="K: ids in the draft's head (default %(default)s; the target's full vocabulary "
                 "is used when K >= its size)")
  p.add_argument("--chat-prompts", type=int, default=R.chat_prompts,
                 help="training prompts the target answers, the first N of "
                 "jax_specens/draft/prompts.py's training split of --prompt-family (default "
                 "%(default)s: the first family, programming / science / everyday questions; "
                 f"{len(chat_prompts('train', 'first')) + len(chat_prompts('train', 'general'))}: "
                 "the first two, with descriptions and stories; "
                 f"{len(chat_prompts('train'))}: all three, with openings of stories and articles)")
  p.add_argument("--prompt-family", choices=FAMILIES, default=R.prompt_family,
                 help="the prompts' family (default %(default)s: every family in turn; first, "
                 "general or openings: that family alone, e.g. a phase that continues a draft on "
                 "a family it has not seen, labelling only its prompts)")
  p.add_argument("--answer-tokens", type=int, default=R.answer_tokens,
                 help="tokens per answer (default %(default)s)")
  p.add_argument("--answer-temperatures", default=",".join(f"{t:g}" for t in R.answer_temperatures),
                 help="comma-separated temperatures: the target answers every training prompt "
                 "once per temperature (default %(default)s: greedy and three samples; 0: "
                 "greedy only)")
  p.add_argument("--greedy-labels", choices=GREEDY_LABELS, default=R.greedy_labels,
                 help="labels of the greedy answers: tokens (each answer's own next token; no "
                 "teacher pass; default, the shipped recipes of the first phases) or teacher (the "
                 "target's top-T distribution: one more teacher pass, about a third of the "
                 "answers' generation time; the SmolLM2 feature draft's third phase: held-out "
                 "agreement dropped with tokens)")
  p.add_argument("--text-tokens", type=int, default=R.text_tokens,
                 help="stdlib prose/code tokens labelled by the teacher (default %(default)s)")
  p.add_argument("--eval-chat-prompts", type=int, default=None,
                 help="held-out prompts answered and labelled for evaluation (default: every "
                 "held-out prompt of the families the training prompts come from: 27 for "
                 "--chat-prompts 379, 78 for 820, 116 for 1148)")
  p.add_argument("--eval-text-tokens", type=int, default=R.eval_text_tokens)
  p.add_argument("--seq-len", type=int, default=R.seq_len, help="tokens per training row")
  p.add_argument("--top", type=int, default=R.top, help="teacher labels: top-T ids (default 32)")
  p.add_argument("--features", action="store_true",
                 help="a draft that reads the target's hidden states (EAGLE style): sd only, "
                      "not an ensemble member; --layers then names the target layers it starts "
                      "from (e.g. 29: one layer)")
  p.add_argument("--feature-taps", default=None, metavar="LAYERS",
                 help="--features: comma-separated target layers whose outputs the draft also "
                 "reads (EAGLE-3's low / middle / high features, e.g. 2,15,26 on SmolLM2's 30); "
                 "with --init-from a draft without them, it starts where that draft ended")
  p.add_argument("--unroll", type=int, default=1,
                 help="--features: training passes along the draft's own chain (default 1)")
  p.add_argument("--steps", type=int, default=5000, help="max training steps (default 5000)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--learning-rate", type=float, default=1e-3)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--time-budget", type=float, default=40.0, metavar="MINUTES",
                 help="stop training after this many minutes (the learning-rate schedule follows "
                 "the elapsed time, so it completes; labels are not counted; default %(default)g)")
  p.add_argument("--keep", choices=KEEP, default=TrainConfig.keep,
                 help="the draft written: best (lowest held-out loss, the start included; "
                 "default) or last (the final weights). The held-out loss may miss what a phase "
                 "learns (SmolLM2's fourth phase, measured on the first family alone: its KL "
                 "rose while its greedy acceptance rose on every family): keep last there and "
                 "measure it (README)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint-dir", metavar="DIR",
                 help="teacher labels and training state (default OUT.ckpt); rerun to resume")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--store-dtype", choices=["float32", "bfloat16"], default=None,
                 help="dtype of the draft's own weights on disk (default: the target's); "
                 "bfloat16 halves a float32 draft (it still loads as float32; distill.json then "
                 "measures the rounded weights)")
  p.add_argument("--borrow-tokenizer", action="store_true",
                 help="do not copy the target's tokenizer files into OUT (Gemma 3's tokenizer.json "
                 "is 33 MB): OUT records their fingerprint and TARGET's path, where "
                 "load_tokenizer(OUT) reads them")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(run=run)
  return p


def _layers(text: str, flag: str = "--layers") -> tuple[int, ...]:
  try:
    layers = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers such as 0,1; got {text!r}")
  if not layers:
    raise ValueError(f"{flag} is empty; give target layer indices such as {flag} 0,1")
  return layers


def run(args: argparse.Namespace) -> int:
  from jax_specens.cli.generate import _floats
  from jax_specens.draft.pipeline import DraftRecipe, train_draft
  from jax_specens.draft.train import TrainConfig

  for flag, v in (("--steps", args.steps), ("--batch-size", args.batch_size),
                  ("--eval-every", args.eval_every), ("--unroll", args.unroll)):
    if v < 1:
      raise ValueError(f"{flag} must be >= 1, got {v}")
  if args.time_budget is not None and args.time_budget <= 0:
    raise ValueError(f"--time-budget must be > 0 minutes, got {args.time_budget}")
  if args.learning_rate <= 0:
    raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}")
  if args.init_from is not None and args.layers is not None:
    raise ValueError("--layers and --init-from exclude each other: a continued draft keeps its "
                     "own layers; drop --layers")
  recipe = DraftRecipe(
      layers=DraftRecipe.layers if args.layers is None else _layers(args.layers),
      vocab_k=args.vocab_k, seq_len=args.seq_len, top=args.top,
      chat_prompts=args.chat_prompts, prompt_family=args.prompt_family,
      answer_tokens=args.answer_tokens,
      answer_temperatures=tuple(_floats(args.answer_temperatures, "--answer-temperatures")),
      greedy_labels=args.greedy_labels,
      text_tokens=args.text_tokens, eval_chat_prompts=args.eval_chat_prompts,
      eval_text_tokens=args.eval_text_tokens, features=args.features,
      feature_taps=() if args.feature_taps is None else tuple(_layers(args.feature_taps,
                                                                      "--feature-taps")))
  config = TrainConfig(batch_size=args.batch_size, learning_rate=args.learning_rate,
                       max_steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                       unroll=args.unroll, keep=args.keep,
                       time_budget_s=None if args.time_budget is None else args.time_budget * 60)
  m = train_draft(args.target, args.out, recipe, config, checkpoint_dir=args.checkpoint_dir,
                  overwrite=args.overwrite, store_dtype=args.store_dtype,
                  progress=not args.quiet, init_from=args.init_from,
                  borrow_tokenizer=args.borrow_tokenizer,
                  grow_layers=() if args.grow_layers is None else _layers(args.grow_layers,
                                                                          "--grow-layers"))
  summary = {k: m[k] for k in ("train_tokens", "eval_tokens", "subset_coverage_eval",
                               "initial_eval", "final_eval", "steps", "train_seconds",
                               "draft_own_bytes", "read_bytes_ratio")}
  print(json.dumps(summary, indent=1))
  print(f"draft written to {args.out}")
  return 0
