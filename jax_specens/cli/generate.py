"""`jax-specens generate`: decode with one model, draft + target, or an ensemble of models."""

from __future__ import annotations

import argparse
import json
import sys

from jax_specens.cli import fusion_args, mesh_args

DESCRIPTION = """\
Generate text from jax_specens model directories (made by `jax-specens convert`).

methods:
  ar        one model, token by token (--model DIR)
  sd        speculative decoding: --draft DIR proposes --gamma tokens, --model DIR (the target)
            verifies them; output distributed exactly as the target's (lossless)
  ensemble  every --model is called once per token; tokens drawn from the ensemble (--ensemble)
  se        speculative ensemble: same output distribution as `ensemble`, fewer model calls
            (--gamma N for every model, or N1,N2,... one per model)
  cosd      CoSD knowledge fusion: --draft DIR drafts, the --model DIR assistant replaces tokens
            its --verifier picks (rule / tree / learned); tokenizers may differ (not lossless)
Temperature 0 is greedy decoding (for an ensemble: argmax of the combined distribution). Rows stop
at the models' EOS ids, at --max-new-tokens, or when the KV cache is full.

examples:
  jax-specens generate --model ./qwen-0.5b --prompt "def fib(n):" --max-new-tokens 32
  jax-specens generate --model ./big --draft ./small --method sd --gamma 4 --prompt-ids 1,15,27
  jax-specens generate --model ./a --model ./b --method se --ensemble wprob --weights 0.6,0.4 \\
      --prompt "Once upon a time" --temperature 0.8 --json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "generate", help="generate text (ar, speculative decoding, ensemble, speculative ensemble)",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", required=True, metavar="DIR",
                 help="model directory; repeat for ensemble/se (contrastive: expert first); for "
                 "sd, the target")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text, tokenized with the first model's tokenizer; repeat for a "
                   "batch")
  src.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="prompt as comma-separated token ids, e.g. 1,15,27; repeat for a batch")
  p.add_argument("--max-new-tokens", type=int, required=True, metavar="N",
                 help="tokens to generate per prompt at most")
  p.add_argument("--method", choices=("ar", "sd", "ensemble", "se", "cosd"), default=None,
                 help="decoding method (default: ar for one model, sd with --draft, else se)")
  p.add_argument("--draft", metavar="DIR", help="draft model directory (method sd)")
  p.add_argument("--ensemble", choices=("wprob", "wlogit", "contrastive"), default="wprob",
                 help="ensemble function: weighted probabilities (default), weighted logits, or "
                 "contrastive decoding (expert - mu * amateur)")
  p.add_argument("--weights", metavar="W1,W2,..",
                 help="ensemble weights, one per model, >= 0 and summing to 1 (default uniform)")
  p.add_argument("--mu", type=float, default=0.1, help="contrastive strength (default 0.1)")
  p.add_argument("--plausibility", type=float, default=None, metavar="BETA",
                 help="contrastive: keep tokens with p_expert >= BETA * max p_expert")
  p.add_argument("--gamma", default="4", metavar="N[,N..]",
                 help="speculation length (sd: the draft's; se: one for all or one per model)")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
  p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
  p.add_argument("--no-stop", action="store_true", help="ignore EOS ids; always generate N tokens")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype the parameters are loaded in (default float32)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON line: tokens, lengths, finish_reasons, stats")
  fusion_args.add_arguments(p)
  mesh_args.add_arguments(p)
  p.set_defaults(run=run)
  return p


def _ints(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _floats(text: str, what: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jax_specens.checkpoint import load_model, load_tokenizer, read_config
  from jax_specens.decode import decode

  method = args.method or ("sd" if args.draft else "ar" if len(args.model) == 1 else "se")
  gamma = _ints(args.gamma, "--gamma")
  gamma = gamma[0] if len(gamma) == 1 else tuple(gamma)
  weights = _floats(args.weights, "--weights") if args.weights else None
  if method == "sd" and not args.draft:
    raise ValueError("--method sd needs --draft DIR (the draft model) besides --model DIR")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if fusion_args.cross_tokenizer(args, method):
    mesh_args.refuse(args, "cosd across two tokenizers (it runs window by window from Python)")
    return fusion_args.run_cross(args)
  dirs = ([args.draft] if args.draft else []) + args.model
  configs = [read_config(d) for d in dirs]  # fails fast on a wrong directory

  tokenizer = None
  if args.prompt is not None:
    tokenizer = load_tokenizer(args.model[0])
    if tokenizer is None:
      raise ValueError(f"{args.model[0]} has no tokenizer files; pass --prompt-ids 1,2,3 instead "
                       "of --prompt")
    rows = [tokenizer.encode(t) for t in args.prompt]
  else:
    rows = [_ints(t, "--prompt-ids") for t in args.prompt_ids]
  if any(len(r) == 0 for r in rows):
    raise ValueError("a prompt is empty; give at least one token")
  lengths = np.array([len(r) for r in rows], np.int32)
  prompts = np.zeros((len(rows), int(lengths.max())), np.int32)
  for i, r in enumerate(rows):
    prompts[i, :len(r)] = r
  stop_ids = [] if args.no_stop else sorted({e for c in configs for e in c.eos_token_ids})
  mesh = mesh_args.mesh_from_args(args, zip(dirs, configs), len(rows))  # None: one device

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  models = [load_model(d, dtype, mesh=mesh) for d in args.model]
  draft = load_model(args.draft, dtype, mesh=mesh) if args.draft else None
  kwargs = {}
  if method in ("ensemble", "se"):
    kwargs = dict(ensemble=args.ensemble, weights=weights, mu=args.mu,
                  plausibility=args.plausibility)
  elif args.weights or args.ensemble != "wprob":
    raise ValueError(f"--ensemble/--weights apply to methods ensemble and se, not {method}")
  kwargs.update(fusion_args.decode_kwargs(args, method))
  decode = mesh_args.decode_fn(mesh, decode)  # jax_specens.parallel.decode on --mesh
  out = decode(models if len(models) > 1 else models[0], prompts, lengths, method=method,
               max_new_tokens=args.max_new_tokens, draft=draft, gamma=gamma,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               min_p=args.min_p, stop_ids=stop_ids or None, key=jax.random.key(args.seed),
               **kwargs)
  if args.json:
    print(json.dumps(out.to_dict()))
    return 0
  for i, toks in enumerate(out.to_lists()):
    text = tokenizer.decode(toks) if tokenizer is not None else " ".join(map(str, toks))
    prefix = f"[{i}] " if len(rows) > 1 else ""
    print(prefix + text)
  d = out.stats.to_dict()
  rate = "" if d["acceptance_rate"] is None else f", acceptance {d['acceptance_rate']:.2f}"
  tps = out.to_dict()["stats"].get("tokens_per_s", 0.0)
  print(f"-- {method}: {int(np.sum(out.lengths))} tokens, {', '.join(out.finish_reasons())}, "
        f"model calls {d['model_calls']}{rate}, {tps:.1f} tok/s (incl. compile)",
        file=sys.stderr)
  return 0
