"""ar, sd, ensemble and se side by side on the same models: tokens/s, model calls, acceptance.

    python -m benchmarks.decode_bench [--small]      # or: jax-specens bench decode [--small]

Random weights give meaningless acceptance, so the models are built to agree the way real ones do:
- target: a random Llama-shaped model (weights scaled by --scale so its distributions are peaked);
- draft (sd): the target's first --draft-layers layers with the same embeddings and head; the
  target's deeper layers have their output projections scaled by --refine, so they refine the
  shallow model's predictions instead of replacing them (the draft agrees on most tokens);
- ensemble members (ensemble, se): the target and a "fine-tune" of it, the target with Gaussian
  noise of relative size --noise added to every weight.
Every method decodes the same prompts with the same settings; the first call (compile) is timed
separately. Prints a table with the ratios sd/ar and se/ensemble and writes decode.json.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import common


def build_models(args):
  from flax import nnx

  from jax_specens import ModelConfig, create_model
  cfg = ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=4,
                    num_kv_heads=2, head_dim=args.hidden // 4,
                    max_position_embeddings=4 * (args.prompt_len + args.max_new_tokens))
  target = create_model(cfg, seed=0)
  target = target.replace(params=jax.tree_util.tree_map(
      lambda x: x * args.scale if x.ndim >= 2 else x, target.params))
  # the target's deeper layers refine its first ones: their output projections are scaled down
  full = nnx.to_pure_dict(target.params)
  for i in range(args.draft_layers, args.layers):
    for block, name in (("attn", "o"), ("mlp", "down")):
      w = full["layers"][i][block][name]
      w["kernel"] = w["kernel"] * args.refine
  nnx.replace_by_pure_dict(target.params, full)
  # draft: the first layers of the target
  draft = create_model(dataclasses.replace(cfg, num_layers=args.draft_layers), seed=1)
  small = nnx.to_pure_dict(draft.params)
  small = dict(full, layers={i: full["layers"][i] for i in range(args.draft_layers)})
  nnx.replace_by_pure_dict(draft.params, small)
  # a second ensemble member: the target plus relative Gaussian noise
  leaves, tree = jax.tree_util.tree_flatten(target.params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  noisy = [x + args.noise * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
           if x.ndim >= 2 else x for x, k in zip(leaves, keys)]
  member = target.replace(params=jax.tree_util.tree_unflatten(tree, noisy))
  return target, draft, member


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
  p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (random ids)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
  p.add_argument("--gamma", type=int, default=4, help="speculation length (sd, se)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=8, help="target layers")
  p.add_argument("--draft-layers", type=int, default=1, help="layers kept in the draft")
  p.add_argument("--scale", type=float, default=4.0, help="target weight scale (peakedness)")
  p.add_argument("--refine", type=float, default=0.05,
                 help="scale of the deeper target layers' output projections")
  p.add_argument("--noise", type=float, default=0.02,
                 help="relative noise of the second ensemble member")
  args = p.parse_args(argv)
  if args.small:
    args.vocab, args.hidden, args.layers, args.max_new_tokens = 256, 64, 2, 16
    args.repeats = 1
  from jax_specens.decoding.api import decode

  target, draft, member = build_models(args)
  prompts, lengths = common.random_prompts(args.batch, args.prompt_len, args.vocab)
  common_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   key=jax.random.key(0))
  runs = {
      "ar": lambda: decode(target, prompts, lengths, method="ar", **common_kw),
      "sd": lambda: decode(target, prompts, lengths, method="sd", draft=draft,
                           gamma=args.gamma, **common_kw),
      "ensemble": lambda: decode([target, member], prompts, lengths, method="ensemble",
                                 **common_kw),
      "se": lambda: decode([target, member], prompts, lengths, method="se", gamma=args.gamma,
                           **common_kw),
      "se(gamma=1)": lambda: decode([target, member], prompts, lengths, method="se", gamma=1,
                                    **common_kw),
  }
  rows = []
  for name, fn in tqdm(runs.items(), desc="methods", file=sys.stderr):
    out, first = common.first_call(fn)
    secs = common.time_call(fn, repeats=args.repeats, warmup=0)
    st = out.stats.to_dict()
    rows.append({"method": name, "tok/s": common.tokens_per_s(int(np.sum(out.lengths)), secs),
                 "secs": secs, "compile+run s": first, "model_calls": st["model_calls"],
                 "acceptance": st["acceptance_rate"],
                 "mean accepted": st["mean_accepted_length"], "steps": st["steps"]})
  tps = {r["method"]: r["tok/s"] for r in rows}
  ratios = {"sd/ar": tps["sd"] / tps["ar"], "se/ensemble": tps["se"] / tps["ensemble"],
            "se(gamma=1)/ensemble": tps["se(gamma=1)"] / tps["ensemble"]}
  print(common.table(rows, ["method", "tok/s", "secs", "compile+run s", "model_calls",
                            "acceptance", "mean accepted"]))
  print("ratios: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
  config = {k: (str(v) if not isinstance(v, (int, float, bool)) else v)
            for k, v in vars(args).items()}
  path = common.write_results(args.out, "decode", config, rows, ratios=ratios)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
