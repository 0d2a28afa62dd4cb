"""Our decoders vs what a PyTorch user has, on the same converted checkpoints, side by side.

    python -m benchmarks.peers_bench            # or: jax-specens bench peers [--small]

| ours                     | peer (Hugging Face transformers, PyTorch)                          |
| ------------------------ | ------------------------------------------------------------------ |
| ar                       | `target.generate()` (greedy, KV cache)                              |
| sd (draft + target)      | `target.generate(assistant_model=draft)` (batch 1 only: row by row) |
| ensemble (draft, target) | a hand-written ensemble loop with one KV cache per model             |
| se (draft, target)       | the same ensemble loop (SE is an exact, faster ensemble)             |

Models: a random Llama target and a draft made of its first layers (`hf_models.build_pair`, so the
two agree on most tokens), saved with `save_pretrained` and converted with our converter. Greedy
decoding (temperature 0) at batch 1 and 8, fixed length; `match` is the fraction of generated tokens
equal to the peer's (greedy outputs should be identical up to float ties). Prints a table, writes
peers.json and peers.png under --out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from benchmarks import common, hf_models, torch_baselines


def _match(ours: np.ndarray, peer: np.ndarray) -> float:
  return float(np.mean(np.asarray(ours) == np.asarray(peer)))


def run_batch(models, pair, batch: int, args) -> list[dict]:
  """Times every method at one batch size; one row per method."""
  import torch
  from jax_specens.decoding.api import decode

  target, draft = models
  vocab = target.config.vocab_size
  prompts, lengths = common.random_prompts(batch, args.prompt_len, vocab, seed=batch)
  ids, mask = torch_baselines.left_pad([p[:n].tolist() for p, n in zip(prompts, lengths)])
  n_new = args.max_new_tokens
  w = (args.weight, 1.0 - args.weight)
  ours = {
      "ar": lambda: decode(target, prompts, lengths, method="ar", max_new_tokens=n_new,
                           temperature=0.0),
      "sd": lambda: decode(target, prompts, lengths, method="sd", draft=draft, gamma=args.gamma,
                           max_new_tokens=n_new, temperature=0.0),
      "ensemble": lambda: decode([draft, target], prompts, lengths, method="ensemble", weights=w,
                                 max_new_tokens=n_new, temperature=0.0),
      "se": lambda: decode([draft, target], prompts, lengths, method="se", weights=w,
                           gamma=args.gamma, max_new_tokens=n_new, temperature=0.0),
  }
  tt, td = pair.target_torch, pair.draft_torch
  ens = lambda: torch_baselines.torch_ensemble_generate([td, tt], w, ids, mask, n_new)
  peers = {
      "ar": ("hf generate", lambda: torch_baselines.hf_generate(tt, ids, mask, n_new)),
      "sd": ("hf generate(assistant_model)", lambda: torch_baselines.hf_generate(
          tt, ids, mask, n_new, assistant=td, gamma=args.gamma)),
      "ensemble": ("torch ensemble loop", ens),
      "se": ("torch ensemble loop", ens),
  }
  rows, peer_cache = [], {}
  for method in args.methods:
    out, first = common.first_call(ours[method])
    secs = common.time_call(ours[method], repeats=args.repeats, warmup=0)
    peer_name, peer_fn = peers[method]
    if peer_name not in peer_cache:  # the ensemble loop is timed once for ensemble and se
      with torch.inference_mode():
        peer_out = peer_fn()
        peer_cache[peer_name] = (peer_out, common.time_call(peer_fn, repeats=args.repeats,
                                                            warmup=0))
    peer_out, peer_secs = peer_cache[peer_name]
    n_tokens = batch * n_new
    stats = out.stats.to_dict()
    rows.append({
        "method": method, "batch": batch, "peer": peer_name,
        "ours_tok_s": common.tokens_per_s(n_tokens, secs),
        "peer_tok_s": common.tokens_per_s(n_tokens, peer_secs),
        "speedup": peer_secs / secs,
        "match": _match(out.tokens, peer_out.numpy()),
        "acceptance": stats["acceptance_rate"],
        "model_calls": stats["model_calls"],
        "ours_s": secs, "peer_s": peer_secs, "compile_s": max(first - secs, 0.0),
    })
    r = rows[-1]
    print(f"{method} batch {batch}: ours {r['ours_tok_s']:.1f} tok/s, {peer_name} "
          f"{r['peer_tok_s']:.1f} tok/s, x{r['speedup']:.2f}, match {r['match']:.2f}", flush=True)
  return rows


COLUMNS = ["method", "batch", "peer", "ours_tok_s", "peer_tok_s", "speedup", "match",
           "acceptance", "compile_s"]


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--methods", nargs="+", default=["ar", "sd", "ensemble", "se"],
                 choices=["ar", "sd", "ensemble", "se"])
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--small: 8)")
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--gamma", type=int, default=4, help="draft tokens per round (sd, se)")
  p.add_argument("--weight", type=float, default=0.5, help="ensemble weight of the draft")
  p.add_argument("--depth-scale", type=float, default=0.1,
                 help="scale of the target's layers beyond the draft's (smaller: more agreement)")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="torch.set_num_threads for the PyTorch side (on a busy CPU one thread is "
                 "its fastest setting; 0 keeps torch's default)")
  p.add_argument("--models-dir", type=Path, default=None,
                 help="where to build the HF and converted models (default: a temporary dir)")
  args = p.parse_args(argv)
  import torch

  import jax_specens
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  size = "small" if args.small else "base"
  if args.max_new_tokens is None:
    args.max_new_tokens = 8 if args.small else 64
  if args.small:
    args.repeats = min(args.repeats, 1)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.models_dir or Path(tmp)
    pair = hf_models.build_pair(root, size, depth_scale=args.depth_scale)
    models = (jax_specens.load_model(pair.target_dir, jnp.float32),
              jax_specens.load_model(pair.draft_dir, jnp.float32))
    print(f"models: {size} Llama target {hf_models.SIZES[size]} and its first-layers draft, "
          f"float32, greedy, {args.max_new_tokens} new tokens")
    rows = []
    for batch in args.batches:
      rows += run_batch(models, pair, batch, args)
  config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  config["size"] = dict(zip(["vocab", "hidden", "intermediate", "layers", "heads", "kv_heads",
                             "draft_layers"], hf_models.SIZES[size]))
  config["torch_threads"] = torch.get_num_threads()
  path = common.write_results(args.out, "peers", config, rows)
  groups = [f"{r['method']} b{r['batch']}" for r in rows]
  common.bar_plot(args.out / "peers.png", groups,
                  {"jax_specens": [r["ours_tok_s"] for r in rows],
                   "PyTorch / HF": [r["peer_tok_s"] for r in rows]},
                  "tokens / s", "jax_specens vs Hugging Face transformers (greedy)")
  print(f"\n{common.table(rows, COLUMNS)}\n\nwrote {path} and peers.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
