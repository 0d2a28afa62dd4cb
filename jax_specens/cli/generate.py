"""`jax-specens generate`: decode with one model, draft + target, or an ensemble of models."""

from __future__ import annotations

import argparse
import functools
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
at the models' EOS ids (config.json, generation_config.json, the tokenizer's EOS; with --chat also
the template's end-of-turn token), at --max-new-tokens, or when the KV cache is full. Models are
paired by tokenizer: sd / ensemble / se need one tokenizer (embedding tables may be padded to
different sizes); two different tokenizers need --method cosd.

--chat applies the tokenizer's chat template (as transformers' apply_chat_template does): each
--prompt is one user message, after the --system message if given. --json prints one line:
"texts" (one string per prompt, without the stop token), "tokens", "lengths", "finish_reasons"
("stop" / "length" / "cache_full") and "stats"; cross-tokenizer cosd prints "texts",
"finish_reasons" and "stats".

examples:
  jax-specens generate --model ./smollm2 --chat --prompt "What is the capital of France?" \\
      --max-new-tokens 32 --temperature 0
  jax-specens generate --model ./qwen-0.5b --prompt "def fib(n):" --max-new-tokens 32
  jax-specens generate --model ./big --draft ./small --method sd --gamma 4 --prompt-ids 1,15,27 \\
      --max-new-tokens 32
  jax-specens generate --model ./a --model ./b --method se --ensemble wprob --weights 0.6,0.4 \\
      --prompt "Once upon a time" --temperature 0.8 --max-new-tokens 32 --json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "generate", help="generate text (ar, speculative decoding, ensemble, speculative ensemble)",
      description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", required=True, metavar="DIR",
                 help="model directory (or builtin:NAME); repeat for ensemble/se (contrastive: "
                 "expert first); for sd, the target")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text, tokenized with the first model's tokenizer; repeat for a "
                   "batch")
  src.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="prompt as comma-separated token ids, e.g. 1,15,27; repeat for a batch")
  p.add_argument("--chat", action="store_true",
                 help="apply the tokenizer's chat template: each --prompt is one user message "
                 "(cross-tokenizer cosd: each model's own template)")
  p.add_argument("--system", metavar="TEXT", default=None,
                 help="with --chat: a system message before each user message")
  p.add_argument("--max-new-tokens", type=int, required=True, metavar="N",
                 help="tokens to generate per prompt at most")
  p.add_argument("--method", choices=("ar", "sd", "ensemble", "se", "cosd"), default=None,
                 help="decoding method (default: ar for one model, sd with --draft, else se)")
  p.add_argument("--draft", metavar="DIR", help="draft model directory (method sd); "
                 "builtin:smollm2-draft is the draft shipped for SmolLM2-135M-Instruct")
  p.add_argument("--ensemble", choices=("wprob", "wlogit", "contrastive"), default="wprob",
                 help="ensemble function: weighted probabilities (default), weighted logits, or "
                 "contrastive decoding (expert - mu * amateur)")
  p.add_argument("--weights", metavar="W1,W2,..",
                 help="ensemble weights, one per model, >= 0 and summing to 1 (default uniform)")
  p.add_argument("--mu", type=float, default=0.1, help="contrastive strength (default 0.1)")
  p.add_argument("--plausibility", type=float, default=None, metavar="BETA",
                 help="contrastive: keep tokens with p_expert >= BETA * max p_expert")
  p.add_argument("--gamma", default=None, metavar="N[,N..]",
                 help="speculation length (sd: the draft's; se: one for all or one per model; "
                 "cosd: the window); default 4; not for ar / ensemble. 'auto' (sd, se of two "
                 "models): chosen in 1..8 from a short calibration on these prompts (measured "
                 "acceptance and pass costs); --json reports the choice under stats.gamma_auto")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
  p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
  p.add_argument("--no-stop", action="store_true", help="ignore EOS ids; always generate N tokens")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype the parameters are loaded in (default float32)")
  p.add_argument("--scan-layers", action="store_true",
                 help="scan each model's layers (one compiled block per layer kind): the first "
                 "call compiles several times faster; on CPU each token is slower "
                 "(benchmarks/README.md, compile time). Default: layers unrolled")
  p.add_argument("--allow-long", action="store_true",
                 help="allow prompt + --max-new-tokens past a model's max_position_embeddings "
                 "(its trained context; refused otherwise)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON line: texts, tokens, lengths, finish_reasons, stats")
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


# decode()'s Python keywords -> this command's flags, for error messages
FLAGS = {"gamma": "--gamma", "weights": "--weights", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "mu": "--mu",
         "plausibility": "--plausibility", "max_new_tokens": "--max-new-tokens",
         "ensemble": "--ensemble", "method": "--method", "draft": "--draft", "models": "--model",
         "verifier": "--verifier", "verifier_path": "--verifier-path", "alpha": "--alpha",
         "beta": "--beta", "bonus": "--bonus", "prompts": "--prompt", "window": "--window"}


def as_flags(message: str) -> str:
  """Rewrites `gamma=4`, `method='sd'`, `top_p must` in a library error as `--gamma 4`,
  `--method sd`, `--top-p must`."""
  import re
  names = "|".join(sorted(FLAGS, key=len, reverse=True))
  message = re.sub(rf"(?<![\w-])({names})=(\.\.\.|'[^']*'|\"[^\"]*\"|[\w.,-]*\w)",
                   lambda m: f"{FLAGS[m[1]]} {m[2].strip(chr(39) + chr(34))}", message)
  return re.sub(rf"(?<![\w-])({names})(?= (must|has|takes|needs)\b)|(?<![\w-])"
                rf"({'|'.join(n for n in FLAGS if '_' in n)})\b",
                lambda m: FLAGS[m[1] or m[3]], message)


def run(args: argparse.Namespace) -> int:
  try:
    return _run(args)
  except ValueError as e:
    raise ValueError(as_flags(str(e))) from None


def _describe(model) -> str:
  try:
    from jax_specens.precision import describe
  except ImportError:  # the dtype policy module is optional here
    return str(model.dtype)
  return describe(model)


def _run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  from jax_specens import text, vocab
  from jax_specens.cache import check_memory, check_positions
  from jax_specens.checkpoint import load_model, read_config
  from jax_specens.decoding.api import decode

  method = args.method or ("sd" if args.draft else "ar" if len(args.model) == 1 else "se")
  if args.gamma is not None and method in ("ar", "ensemble"):
    raise ValueError(f"--gamma applies to the speculative methods (sd, se, cosd), not --method "
                     f"{method}; drop --gamma {args.gamma}")
  gamma = "auto" if args.gamma == "auto" else _ints(args.gamma or "4", "--gamma")
  gamma = gamma if gamma == "auto" else gamma[0] if len(gamma) == 1 else tuple(gamma)
  args.gamma = args.gamma or "4"
  weights = _floats(args.weights, "--weights") if args.weights else None
  if method == "sd" and not args.draft:
    raise ValueError("--method sd needs --draft DIR (the draft model) besides --model DIR")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.prompt is None and (args.chat or args.system is not None):
    raise ValueError("--chat and --system take text prompts: give --prompt TEXT, not --prompt-ids")
  if args.system is not None and not args.chat:
    raise ValueError("--system needs --chat (the system message goes through the chat template)")
  if fusion_args.cross_tokenizer(args, method):
    mesh_args.refuse(args, "cosd across two tokenizers (it runs window by window from Python)")
    return fusion_args.run_cross(args)
  dirs = ([args.draft] if args.draft else []) + args.model
  configs = [read_config(d) for d in dirs]  # fails fast on a wrong directory
  if args.chat:  # a base model's missing template, named before its weights load
    text.check_chat(args.model[0])
  batch = len(args.prompt if args.prompt is not None else args.prompt_ids)
  rows = None if args.prompt is not None else [_ints(t, "--prompt-ids") for t in args.prompt_ids]
  if rows is not None and any(len(r) == 0 for r in rows):
    raise ValueError("a prompt is empty; give at least one token")
  mesh = mesh_args.mesh_from_args(args, zip(dirs, configs), batch)  # None: one device
  # before any model is loaded: a request past the models' positions or the device's memory
  shortest = min((len(r) for r in rows), default=1) if rows is not None else 1
  check_positions(configs, shortest, args.max_new_tokens, args.allow_long, cli=True)
  check_memory(configs, [2 if args.dtype == "bfloat16" else 4] * len(configs), batch, shortest,
               args.max_new_tokens, cli=True)

  kwargs = {}
  if method in ("ensemble", "se"):
    kwargs = dict(ensemble=args.ensemble, weights=weights, mu=args.mu,
                  plausibility=args.plausibility)
  elif args.weights or args.ensemble != "wprob":
    raise ValueError(f"--ensemble/--weights apply to methods ensemble and se, not {method}")
  kwargs.update(fusion_args.decode_kwargs(args, method))
  if method != "ar" and method != "ensemble":
    kwargs["gamma"] = gamma
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  if mesh is not None:  # each array restored straight into its shards
    from jax_specens.parallel import load_model as load_sharded
    load_model = functools.partial(load_sharded, mesh=mesh)
  load_model = functools.partial(load_model, scan_layers=args.scan_layers)
  models = []  # a distilled draft takes its target's embedding from a model loaded before it
  for d in args.model:
    models.append(load_model(d, dtype, share_from=models))
  draft = load_model(args.draft, dtype, share_from=models) if args.draft else None
  every = models + ([draft] if draft is not None else [])
  for d, m in zip(args.model + ([args.draft] if args.draft else []), every):
    print(f"-- {d}: {vocab.of(m).size} ids, {_describe(m)}", file=sys.stderr)
  run_decode = mesh_args.decode_fn(mesh, decode)  # jax_specens.parallel.decode on --mesh
  common = dict(method=method, max_new_tokens=args.max_new_tokens, draft=draft,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, key=jax.random.key(args.seed), **kwargs)
  if args.allow_long:
    common["allow_past_max_positions"] = True
  target = models if len(models) > 1 else models[0]
  if rows is None:  # text: through the text API (chat template, BOS, buckets, stop ids)
    result = text.generate_text(target, args.prompt, chat=args.chat or None,
                                system=args.system, stop=not args.no_stop,
                                decode_fn=run_decode, **common)
  else:
    result = _decode_ids(target, every, rows, run_decode, not args.no_stop, common)
  if args.json:
    print(json.dumps(result.to_dict()))
    return 0
  for i, t in enumerate(result.texts):
    print((f"[{i}] " if batch > 1 else "") + t)
  d = result.stats
  if "gamma_auto" in d:
    g = d["gamma_auto"]
    print(f"-- gamma auto: {g['gamma']} (acceptance alpha {g['alpha']:.2f}, predicted "
          f"{g['predicted_speedup']:.2f}x, calibration {g['calibration_s']:.1f} s)", file=sys.stderr)
    if g["baseline_faster"]:
      base = g["baseline"]
      print(f"-- no gamma is priced faster than {base} here (best {g['predicted_speedup']:.2f}x of "
            f"{base}): --method {base} gives the same distribution, faster on this machine",
            file=sys.stderr)
  rate = "" if d["acceptance_rate"] is None else f", acceptance {d['acceptance_rate']:.2f}"
  print(f"-- {method}: {sum(len(t) for t in result.token_ids)} tokens, "
        f"{', '.join(result.finish_reasons)}, model calls {d['model_calls']}{rate}, "
        f"{d.get('tokens_per_s', 0.0):.1f} tok/s (incl. compile)", file=sys.stderr)
  return 0


def _decode_ids(target, every, rows, run_decode, stop: bool, common: dict):
  """--prompt-ids: decode the ids as given; texts from the tokenizer when there is one, else the
  ids written out."""
  from jax_specens import text
  try:
    tokenizer = text.tokenizer_of(every)
  except ValueError:
    tokenizer = None
  stops = text.stop_ids(every, tokenizer) if stop else []
  prompts, lengths = text.pad(rows)
  out = run_decode(target, prompts, lengths, stop_ids=stops or None, **common)
  texts = (text.decode_texts(tokenizer, out, stops) if tokenizer is not None
           else [" ".join(map(str, t)) for t in out.to_lists()])
  return text.TextOutput(texts=texts, token_ids=out.to_lists(),
                         finish_reasons=out.finish_reasons(), prompt_ids=rows,
                         stats=out.to_dict()["stats"], output=out)
