"""Speculative Ensemble speed-up over the plain ensemble as gamma and lambda vary (docs/algorithms.md §3).

    python -m benchmarks.se_sweep               # or: jax-specens bench se-sweep [--small]

Two models, weighted-probability ensemble `r = lambda p_q + (1 - lambda) p_p` with M_q (the proposer,
model 0) the cheaper one. For each lambda the plain ensemble (one call per model per token) is timed
once, then SE for each gamma (gamma_q = gamma_p = gamma); lambda is traced, so only gamma compiles.
Next to each measured speed-up: the docs/algorithms.md §3 prediction priced by `jax_specens.pricing`
from the run's per-token acceptance and the measured seconds of one pass of every width the loop
runs (`predicted`: per round; `predicted_run`: this call, prefill and the slowest row included),
and the SPEC's closed form `(1 - a^g)(1 + c) / ((1 - a)(1 + c g - a^g c))` with `c` = step time of
M_q / step time of M_p (which prices every width alike and assumes the proposer restarts after a
rejection).

Models: the built-in "draft" (or, if absent, "prose") and "code" models (jax_specens.builtin) on
code prompts; when the built-in models are not installed, a converted random Llama pair (`hf_models.build_pair`: the
draft is the target's first layers) on random prompts — the JSON says which. Sampling at
--temperature (default 1.0; SE is exact for any temperature). Writes se_sweep.json and se_sweep.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, hf_models
from jax_specens import pricing

CODE_PROMPTS = ["def read_lines(path):\n", "import os\n\nclass Cache:\n", "for i in range(",
                "    return sorted(", "if __name__ == '__main__':\n", "def parse(text):\n    ",
                "try:\n    import json\n", "    def __init__(self, name"]


def builtin_models(batch: int):
  """(M_q, M_p), prompts, lengths and a description, from the built-in models (or None).

  M_q is the small "draft" model when installed, else the "prose" specialist (same size as "code":
  an ensemble of two experts); M_p is the "code" specialist; the prompts are code.
  """
  from jax_specens import builtin
  for q_name in ("draft", "prose"):
    try:
      q, p = builtin.builtin_model(q_name), builtin.builtin_model("code")
      tok = builtin.builtin_tokenizer()
      break
    except FileNotFoundError as e:
      print(f"built-in model not available: {e}")
  else:
    print("using a converted random pair instead")
    return None
  ids = [tok.encode(CODE_PROMPTS[i % len(CODE_PROMPTS)]) for i in range(batch)]
  t = max(len(x) for x in ids)
  prompts = np.zeros((batch, t), np.int32)
  for i, x in enumerate(ids):
    prompts[i, :len(x)] = x
  lengths = np.array([len(x) for x in ids], np.int32)
  return (q, p), prompts, lengths, f"builtin {q_name} (M_q) + code (M_p), code prompts"


def random_models(root: Path, small: bool, batch: int, prompt_len: int):
  import jax_specens
  size = "small" if small else "base"
  pair = hf_models.build_pair(root, size)
  q = jax_specens.load_model(pair.draft_dir, jnp.float32)
  p = jax_specens.load_model(pair.target_dir, jnp.float32)
  prompts, lengths = common.random_prompts(batch, prompt_len, p.config.vocab_size)
  return (q, p), prompts, lengths, f"converted random Llama pair '{size}' {hf_models.SIZES[size]}"


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--gammas", type=int, nargs="+", default=None, help="default 1 2 3 4 (--small: 1 2)")
  p.add_argument("--lambdas", type=float, nargs="+", default=None,
                 help="ensemble weight of M_q; default 0.25 0.5 0.75 (--small: 0.5)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--small: 8)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--prompt-len", type=int, default=16, help="random prompts only")
  p.add_argument("--random-models", action="store_true",
                 help="use the converted random pair even when the built-in models exist")
  args = p.parse_args(argv)
  from jax_specens.decoding.api import decode

  gammas = args.gammas or ([1, 2] if args.small else [1, 2, 3, 4])
  lambdas = args.lambdas or ([0.5] if args.small else [0.25, 0.5, 0.75])
  n_new = args.max_new_tokens or (8 if args.small else 64)
  if args.small:
    args.repeats = 1
  with tempfile.TemporaryDirectory() as tmp:
    found = None if (args.random_models or args.small) else builtin_models(args.batch)
    (mq, mp), prompts, lengths, what = found or random_models(Path(tmp), args.small, args.batch,
                                                              args.prompt_len)
    print(f"models: {what}; batch {args.batch}, {n_new} new tokens, T={args.temperature}")
    t = prompts.shape[1]
    costs = common.pass_costs([mq, mp], [(g, g) for g in gammas], args.batch,
                              t + n_new + 2 * max(gammas), t + n_new // 2, t,
                              temperature=args.temperature)
    cost_q, cost_p = costs.of(0, 1), costs.of(1, 1)
    c = cost_q / cost_p
    print(f"step time M_q {cost_q * 1e3:.2f} ms, M_p {cost_p * 1e3:.2f} ms: c = {c:.3f}")
    rows = []
    for lam in lambdas:
      common_kw = dict(weights=(lam, 1.0 - lam), max_new_tokens=n_new,
                       temperature=args.temperature, key=jax.random.key(0))
      ens = lambda: decode([mq, mp], prompts, lengths, method="ensemble", **common_kw)
      t_ens = common.time_call(ens, repeats=args.repeats)
      for g in gammas:
        se = lambda: decode([mq, mp], prompts, lengths, method="se", gamma=g, **common_kw)
        out = se()
        t_se = common.time_call(se, repeats=args.repeats)
        stats = out.stats.to_dict()
        r = common.priced(out, t_se, t_ens, (g, g), costs, "se", n_new, t)
        rows.append({"lambda": lam, **r, "gamma": g, "acceptance": stats["acceptance_rate"],
                     "mean_accepted": stats["mean_accepted_length"], "c": c,
                     "ensemble_s": t_ens, "se_s": t_se, "speedup": r["measured"],
                     "closed_form": pricing.se_closed_form(r["alpha"], g, g, c),
                     "model_calls": stats["model_calls"]})
        print(f"lambda {lam} gamma {g}: alpha {r['alpha']:.3f}, speed-up {r['measured']:.2f} "
              f"(predicted {r['predicted']:.2f}, this run {r['predicted_run']:.2f})", flush=True)
  config = dict(models=what, batch=args.batch, max_new_tokens=n_new,
                temperature=args.temperature, gammas=gammas, lambdas=lambdas,
                step_s={"M_q": cost_q, "M_p": cost_p}, pass_costs=costs.to_dict(),
                repeats=args.repeats)
  path = common.write_results(args.out, "se_sweep", config, rows)
  series, styles = {}, {}
  for i, lam in enumerate(lambdas):
    sel = [r for r in rows if r["lambda"] == lam]
    series[f"measured, lambda={lam}"] = [r["speedup"] for r in sel]
    series[f"predicted, lambda={lam}"] = [r["predicted_run"] for r in sel]
    styles[f"measured, lambda={lam}"] = dict(color=f"C{i}")
    styles[f"predicted, lambda={lam}"] = dict(color=f"C{i}", linestyle="--", alpha=0.6)
  common.line_plot(args.out / "se_sweep.png", gammas, series, "gamma",
                   "speed-up over the plain ensemble", f"Speculative Ensemble vs ensemble\n{what}",
                   styles)
  cols = ["lambda", "gamma", "alpha", "c", "speedup", "predicted", "ratio", "predicted_run",
          "ratio_run", "closed_form"]
  print(f"\n{common.table(rows, cols)}\n\nwrote {path} and se_sweep.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
