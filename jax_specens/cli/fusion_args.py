"""The CoSD / fusion options of `jax-specens generate` (kept here; generate.py only calls these).

    --method cosd --draft DIR --model DIR --verifier {rule,tree,learned} [--verifier-path P]
    [--alpha A --beta B --window K --bonus]
    --method se|ensemble --fusion-head P      (learned ensemble weights from train-fusion)

When the draft's and the assistant's tokenizers differ, cosd runs in cross-tokenizer mode
(`jax_specens.fusion.cosd_text`): text is carried across at window boundaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

# == jax_specens.fusion.VERIFIERS (not imported: `jax-specens --help` must not load jax)
VERIFIERS = ("rule", "tree", "learned")


def add_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "CoSD (--method cosd: --draft DIR writes, the --model DIR assistant fixes; not lossless)")
  g.add_argument("--verifier", choices=VERIFIERS, default=None,
                 help="who decides to replace a draft token: the CoSD rule (docs/algorithms.md §4) (default), a decision "
                 "tree or the learned head (both from `jax-specens train-fusion`)")
  g.add_argument("--verifier-path", metavar="P",
                 help="train-fusion output directory (or its tree.json / head/) for tree, learned")
  g.add_argument("--alpha", type=float, default=None,
                 help="rule: replace only when p_draft(token) < ALPHA (default 0.5)")
  g.add_argument("--beta", type=float, default=None,
                 help="rule: ... and p_assistant(its token) > BETA * p_draft (default 0.5)")
  g.add_argument("--window", dest="gamma", metavar="K",
                 help="draft tokens per window (same as --gamma)")
  g.add_argument("--bonus", action="store_true", default=None,
                 help="after a window with no replacement, also emit the assistant's next token")
  g.add_argument("--fusion-head", metavar="P",
                 help="ensemble/se: learned ensemble weights (train-fusion OUT or its "
                 "weights_head/) instead of --ensemble")


def _cosd_options(args) -> dict:
  opts = {"verifier": args.verifier, "verifier_path": args.verifier_path, "alpha": args.alpha,
          "beta": args.beta, "bonus": args.bonus}
  return {k: v for k, v in opts.items() if v is not None}


def decode_kwargs(args, method: str) -> dict:
  """Extra `decode` keyword arguments for cosd / a learned ensemble (ValueError if misplaced)."""
  out = {}
  opts = _cosd_options(args)
  if method == "cosd":
    out.update(opts)
  elif opts:
    raise ValueError(f"--{'/--'.join(k.replace('_', '-') for k in opts)} apply to --method cosd, "
                     f"not {method}")
  if args.fusion_head:
    if method not in ("ensemble", "se"):
      raise ValueError("--fusion-head (learned ensemble weights) applies to --method ensemble/se")
    if args.weights or args.ensemble != "wprob":
      raise ValueError("--fusion-head replaces --ensemble/--weights; drop those")
    from jax_specens.fusion.learned import learned_ensemble
    out["ensemble"] = learned_ensemble(args.fusion_head)
  return out


def cross_tokenizer(args, method: str) -> bool:
  """Whether cosd must run in cross-tokenizer mode (the two tokenizers differ)."""
  if method != "cosd" or not args.draft or len(args.model) != 1:
    return False
  from jax_specens import vocab
  from jax_specens.builtin import resolve
  from jax_specens.checkpoint import read_config
  tables = [read_config(d).vocab_size for d in (args.draft, args.model[0])]
  d, a = (vocab.identify(resolve(x), n) for x, n in zip((args.draft, args.model[0]), tables))
  if d.fingerprint is not None and a.fingerprint is not None:
    return d.fingerprint != a.fingerprint  # one tokenizer: same-tokenizer cosd, even if padded
  return tables[0] != tables[1]


def run_cross(args) -> int:
  """cosd with different tokenizers: text prompts in, text out (window by window)."""
  import jax
  import jax.numpy as jnp

  from jax_specens.checkpoint import load_model, load_tokenizer
  from jax_specens.fusion.cross import SidePrompts, cosd_text
  if args.prompt is None:
    raise ValueError("the draft and the assistant have different tokenizers: give text with "
                     "--prompt (token ids have no common meaning)")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  gamma = [int(x) for x in str(args.gamma).split(",")]
  if len(gamma) != 1:
    raise ValueError(f"cosd takes one window length, got --window/--gamma {args.gamma}")
  prompts = args.prompt
  if args.chat:  # each model reads the conversation through its own chat template
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    prompts = [SidePrompts(*[system + [{"role": "user", "content": p}]] * 2) for p in prompts]
  out = cosd_text(load_model(args.draft, dtype), load_model(args.model[0], dtype),
                  load_tokenizer(args.draft), load_tokenizer(args.model[0]), prompts,
                  max_new_tokens=args.max_new_tokens, window=gamma[0],
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, key=jax.random.key(args.seed), **_cosd_options(args))
  if args.json:
    print(json.dumps({"texts": out.texts, "finish_reasons": out.finish,
                      "stats": [dataclasses.asdict(s) for s in out.stats]}))
    return 0
  for i, text in enumerate(out.texts):
    head = "" if args.chat else args.prompt[i]  # a chat answer is printed alone
    print((f"[{i}] " if len(out.texts) > 1 else "") + head + text)
  n = sum(s.windows for s in out.stats)
  r = sum(s.replacements for s in out.stats)
  print(f"-- cosd (cross-tokenizer): {n} windows, {r} replaced, "
        f"{', '.join(out.finish)}", file=sys.stderr)
  return 0
