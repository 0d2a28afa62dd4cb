"""Decode step time vs the memory-bandwidth roofline, and tokens/s of every method.

    python -m benchmarks.gpu_roofline           # on a GPU/TPU; or: jax-specens bench roofline
    python -m benchmarks.gpu_roofline --small   # any backend, tiny model (checks the script)

1. Measured bandwidth: a jitted `x + 1` over a large bf16 array (bytes read + written / time).
2. A ~1B-parameter Llama-shaped model (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
   vocab 32000), random, bf16. One decode step at batch 1 must at least read every parameter, so
   its floor is `param bytes / bandwidth`; reported as % of roofline = floor / measured step time.
   The same for `ar` inside the on-device loop: (t(n) - t(n/4)) / (3n/4) seconds per token.
3. ar / sd / ensemble / se tokens/s at batch 1 and 16 with `decode()` (greedy), and whether greedy
   sd == ar and se == ensemble under the backend's default matmul precision: where a row differs,
   the first differing token and the target's top-1 minus top-2 logit margin there. The draft is the
   target's first 2 layers and the target's deeper layers add small residual updates (see
   hf_models.py): the two agree like a real draft; the ensemble is (draft, target).
The JSON records the device and versions.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

# name: (vocab, hidden, intermediate, layers, heads, kv_heads, draft_layers)
SHAPES = {"1b": (32000, 2048, 8192, 16, 32, 8, 2), "small": (256, 64, 128, 2, 4, 2, 1)}


def bandwidth(num_bytes: int, repeats: int, passes: int = 10) -> float:
  """Bytes / second of `passes` elementwise passes over `num_bytes` of bf16 (read + write) in one
  jitted loop, so that one call's dispatch and synchronisation are spread over many passes."""
  x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jax.lax.fori_loop(0, passes, lambda i, b: b + 1, a))
  secs = common.time_call(lambda: f(x), repeats=repeats, warmup=2)
  return 2 * passes * x.nbytes / secs


def make_pair(shape: str, depth_scale: float = 0.1, seed: int = 0):
  """(target, draft): random bf16 Llama-shaped models, the draft = the target's first layers."""
  from jax_specens import ModelConfig, create_model
  vocab, hidden, inter, layers, heads, kv, draft_layers = SHAPES[shape]
  cfg = lambda n: ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden,
                              intermediate_size=inter, num_layers=n, num_heads=heads,
                              num_kv_heads=kv, head_dim=hidden // heads,
                              max_position_embeddings=4096)
  target = create_model(cfg(layers), seed, jnp.bfloat16)

  def deeper_scaled(path, x):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if "layers" in keys and keys[keys.index("layers") + 1] >= draft_layers and (
        "o" in keys or "down" in keys):
      return (x * depth_scale).astype(x.dtype)
    return x

  target = target.replace(params=jax.tree_util.tree_map_with_path(deeper_scaled, target.params))
  draft = create_model(cfg(draft_layers), seed + 1, jnp.bfloat16)
  leaves = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_leaves_with_path(target.params)}
  draft = draft.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: leaves[jax.tree_util.keystr(p)], draft.params))
  return target, draft


def param_bytes(model) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))


def in_loop_token_seconds(model, prompt_len: int, n_short: int, n_long: int, repeats: int,
                          batch: int = 1, cache_len: int | None = None) -> float:
  """Seconds per step of greedy `ar` (`batch` rows) inside the on-device loop: the difference of two
  decodes' times over the difference of their lengths (prefill and the call's fixed cost cancel)."""
  from jax_specens.decoding.api import decode
  prompts, lengths = common.random_prompts(batch, prompt_len, model.config.vocab_size)
  lengths[:] = prompt_len  # every row steps; none finishes early
  secs = {}
  for n in (n_short, n_long):
    fn = lambda n=n: decode(model, prompts, lengths, method="ar", max_new_tokens=n,
                            temperature=0.0, cache_len=cache_len)
    fn()
    secs[n] = common.time_call(fn, repeats=repeats, warmup=0)
  return (secs[n_long] - secs[n_short]) / (n_long - n_short)


def divergence(model, prompts, lengths, ref, other) -> list[dict]:
  """Rows where greedy `other` differs from greedy `ref` (both `DecodeOutput`): the first differing
  index and the target's top-1 minus top-2 logit there (teacher-forced on `ref`'s text), the margin
  that a different reduction order flipped."""
  from jax_specens.step import step
  a, b = np.asarray(ref.tokens), np.asarray(other.tokens)
  n = np.minimum(np.asarray(ref.lengths), np.asarray(other.lengths))
  rows = []
  for r in range(a.shape[0]):
    diff = np.nonzero(a[r, :n[r]] != b[r, :n[r]])[0]
    if not len(diff):
      continue
    i = int(diff[0])
    seq = np.concatenate([prompts[r, :lengths[r]], a[r, :i]])[None].astype(np.int32)
    cache = model.init_cache(1, seq.shape[1])
    logits, _ = step(model, cache, jnp.asarray(seq), jnp.zeros((1,), jnp.int32))
    top = np.sort(np.asarray(logits[0, -1], np.float32))[-2:]
    rows.append({"row": r, "index": i, "ref": int(a[r, i]), "other": int(b[r, i]),
                 "margin": float(top[1] - top[0])})
  return rows


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--small: 8)")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--gamma", type=int, default=4)
  p.add_argument("--bandwidth-mib", type=int, default=None,
                 help="array size of the bandwidth probe; default 1024 (--small: 64)")
  p.add_argument("--loop-batches", type=int, nargs="+", default=[1],
                 help="batch sizes of the in-loop ar step time (the roofline uses batch 1)")
  p.add_argument("--loop-cache-lens", type=int, nargs="+", default=[0],
                 help="KV slots of the in-loop ar measurements (0: the default, prompt + tokens)")
  p.add_argument("--roofline-only", action="store_true",
                 help="stop after the roofline (no method table)")
  args = p.parse_args(argv)
  from jax_specens.decoding.api import decode
  from jax_specens.models.layers import gpu_min_rows

  shape = "small" if args.small else "1b"
  n_new = args.max_new_tokens or (8 if args.small else 128)
  prompt_len = min(args.prompt_len, 16) if args.small else args.prompt_len
  if jax.default_backend() == "cpu" and not args.small:
    print("note: running the 1B model on CPU (no accelerator found); use --small for a quick check")
  bw = bandwidth((args.bandwidth_mib or (64 if args.small else 1024)) << 20, args.repeats)
  target, draft = make_pair(shape)
  nbytes = param_bytes(target)
  step_s = common.step_seconds(target, 1, prompt_len, repeats=max(args.repeats, 5))
  floor = nbytes / bw
  loops = []
  for b in args.loop_batches:
    for c in args.loop_cache_lens:
      secs = in_loop_token_seconds(target, prompt_len, n_new // 4, n_new, max(args.repeats, 3), b,
                                   c or None)
      loops.append({"batch": b, "cache_len": c or None, "step_ms": 1e3 * secs,
                    "pct_of_roofline": 100 * floor / secs})
      print(f"ar in-loop step at batch {b}, cache {c or 'default'}: {1e3 * secs:.3f} ms "
            f"({100 * floor / secs:.1f}% of the batch-1 roofline)", flush=True)
  loop_s = loops[0]["step_ms"] / 1e3
  roof = {"params": int(sum(x.size for x in jax.tree_util.tree_leaves(target.params))),
          "param_bytes": nbytes, "bandwidth_GBps": bw / 1e9, "step_ms": step_s * 1e3,
          "roofline_ms": floor * 1e3, "pct_of_roofline": 100 * floor / step_s,
          "loop_token_ms": loop_s * 1e3, "loop_pct_of_roofline": 100 * floor / loop_s,
          "loops": loops, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  print(f"{roof['params'] / 1e6:.1f}M params ({nbytes / 2**20:.0f} MiB bf16), bandwidth "
        f"{roof['bandwidth_GBps']:.1f} GB/s, roofline {roof['roofline_ms']:.3f} ms/token:\n"
        f"  one jitted step per call {roof['step_ms']:.3f} ms = {roof['pct_of_roofline']:.1f}%"
        f" of roofline\n  ar inside the on-device loop (batch {loops[0]['batch']}) "
        f"{roof['loop_token_ms']:.3f} ms/step = "
        f"{roof['loop_pct_of_roofline']:.1f}% of roofline", flush=True)
  config = dict(shape=shape, dims=SHAPES[shape], max_new_tokens=n_new, prompt_len=prompt_len,
                gamma=args.gamma, dtype="bfloat16",
                matmul_precision=str(jax.config.jax_default_matmul_precision),
                gpu_min_rows=gpu_min_rows())
  if args.roofline_only:
    path = common.write_results(args.out, "roofline", config, [], roofline=roof)
    print(f"wrote {path}")
    return 0
  methods = {"ar": dict(models=target), "sd": dict(models=target, draft=draft, gamma=args.gamma),
             "ensemble": dict(models=[draft, target]),
             "se": dict(models=[draft, target], gamma=args.gamma)}
  rows, greedy = [], []
  for batch in args.batches:
    prompts, lengths = common.random_prompts(batch, prompt_len, target.config.vocab_size)
    outs = {}
    for method, kw in methods.items():
      kw = dict(kw)
      models = kw.pop("models")
      fn = lambda: decode(models, prompts, lengths, method=method, max_new_tokens=n_new,
                          temperature=0.0, **kw)
      out = outs[method] = fn()
      secs = common.time_call(fn, repeats=args.repeats, warmup=0)
      stats = out.stats.to_dict()
      rows.append({"method": method, "batch": batch,
                   "tok_s": common.tokens_per_s(batch * n_new, secs),
                   "acceptance": stats["acceptance_rate"], "model_calls": stats["model_calls"],
                   "seconds": secs})
      print(f"{method} batch {batch}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    for ref, other in (("ar", "sd"), ("ensemble", "se")):
      rows_off = divergence(target, prompts, lengths, outs[ref], outs[other])
      greedy.append({"batch": batch, "pair": f"{other} vs {ref}", "rows": batch,
                     "identical_rows": batch - len(rows_off), "divergences": rows_off})
      print(f"greedy {other} == {ref} at batch {batch}: {batch - len(rows_off)}/{batch} rows "
            f"identical" + "".join(f"; row {d['row']} from token {d['index']} (target margin "
                                   f"{d['margin']:.3g})" for d in rows_off), flush=True)
  path = common.write_results(args.out, "roofline", config, rows, roofline=roof, greedy=greedy)
  common.bar_plot(args.out / "roofline.png", [str(b) for b in args.batches],
                  {m: [r["tok_s"] for r in rows if r["method"] == m] for m in methods},
                  "tokens / s", f"{shape} model on {common.environment()['device']} "
                  f"({roof['pct_of_roofline']:.0f}% of roofline at batch 1)")
  print(f"\n{common.table([roof], list(roof))}\n\n"
        f"{common.table(rows, ['method', 'batch', 'tok_s', 'acceptance'])}\n\nwrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
