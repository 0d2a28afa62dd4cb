"""Decode step time against the context in use at a fixed cache: blocked vs dense attention.

    python -m benchmarks.long_context [--cache 32768] [--contexts 512,2048,8192,24576]
        [--blocks 512] [--repeats 5] [--models smollm2,gemma3] [--dtype float32] [--small]

For each model (SmolLM2-135M-Instruct and Gemma-3-270M in --dtype, default float32, from the user
cache that `jax-specens demo` fills; --small: two tiny random models, one with sliding-window
layers), batch 1, one cache of --cache slots per attention mode:
- dense: `attention_block=None`, every pass reads all --cache slots (the program before blocking);
- blocked@N: `attention_block=N` (`jax_specens/models/attend.py`), a pass reads the blocks of N slots
  up to its position (on sliding layers only those inside the window);
- ring+blocked@N (models with sliding layers): the same, with the sliding layers' caches as rings
  of `window + RING_SLACK` slots (`jax_specens/cache.py`; the slack an sd decode of gamma 4 uses),
  which is how `decode` builds them.
- kernel (with JAX_SPECENS_CPU_KERNELS=1): the CPU kernel's attention (`kernels/attention.cc`),
  which reads each visible slot once, over the same caches as `decode` builds (rings on sliding
  layers, which keep XLA's ring attention); the other modes are then traced with
  JAX_SPECENS_CPU_ATTENTION=0 (XLA's attention, the kernel's products).
Same parameters in every mode (`step.with_attention_block`). The cache is not prefilled: its K/V
are zeros and its position is set to the context directly (`cache.rollback`), so a step at context
c attends over c slots, which costs what it costs with real keys (no data-dependent work): this
times the attention reads, not a prefill. A step is the jitted W = 1 decode step with the cache
donated (`jax_specens.step.step`); each round times one step per (context, mode), interleaved,
and the table shows the median over --repeats rounds. "KV MB read" is what blocked attention must
read at that context (K and V of every layer, sliding layers at most their window).

Then the KV memory of each model with sliding layers at --cache tokens of context (batch 1,
float32 and bfloat16): every layer at --cache slots, against rings on the sliding layers
(`cache.kv_bytes`, which the float32 caches timed here were checked against).
Timings on a shared machine are noisy: compare the modes within one run (same rounds).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from benchmarks import common
from jax_specens import cache as kv
from jax_specens.kernels import cpu

RING_SLACK = kv.ring_slack(4)  # sd at gamma 4 writes up to 4 positions past its committed length


def small_models(dtype=jnp.float32):
  from jax_specens import ModelConfig, create_model
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=16, max_position_embeddings=1 << 20)
  return {"tiny-llama": create_model(ModelConfig(family="llama", **base), dtype=dtype),
          "tiny-sliding": create_model(ModelConfig(
              family="gemma3_text", **base, qk_norm=True, sliding_window=64,
              layer_types=("sliding", "sliding", "sliding", "full")), dtype=dtype)}


def kv_read_mb(config, context: int, itemsize: int) -> float:
  """MB of K and V that a step at `context` must read over all layers (sliding: the window)."""
  slots = sum(min(context, config.window(i) or context) for i in range(config.num_layers))
  return 2 * slots * config.num_kv_heads * config.head_dim * itemsize / 1e6


def has_windows(config) -> bool:
  return any(config.window(i) for i in range(config.num_layers))


def kv_memory(config, context: int, itemsize: int) -> dict:
  """GiB of one row's KV cache at `context`: every layer full length, and with rings of
  `window + RING_SLACK` slots on the sliding layers."""
  full = kv.kv_bytes(config, 1, context, itemsize)
  ring = kv.kv_bytes(config, 1, context, itemsize, RING_SLACK)
  return {"full_gib": full / 2**30, "ring_gib": ring / 2**30, "x_less": full / ring}


def time_model(name, model, cache_len, contexts, blocks, repeats):
  from jax_specens.models.model import with_attention_block
  from jax_specens.step import step
  modes = {"dense": with_attention_block(model, None)}
  modes.update({f"blocked@{b}": with_attention_block(model, b) for b in blocks})
  rings = has_windows(model.config)
  if rings:
    modes[f"ring+blocked@{blocks[0]}"] = modes[f"blocked@{blocks[0]}"]
  if cpu.computes():  # a config of its own (a block of the whole cache), so a program of its own
    modes["kernel"] = with_attention_block(model, cache_len)
  slack = {m: RING_SLACK if m.startswith("ring") or (m == "kernel" and rings) else None
           for m in modes}
  caches = {m: x.init_cache(1, cache_len, ring_slack=slack[m]) for m, x in modes.items()}
  for m, c in caches.items():  # the memory table's numbers are these caches' bytes
    assert kv.cache_bytes(c) == kv.kv_bytes(model.config, 1, cache_len, c.k[0].dtype.itemsize,
                                            slack[m])
  tok = jnp.zeros((1, 1), jnp.int32)

  def one(mode, context):
    t0 = time.perf_counter()
    logits, caches[mode] = step(modes[mode], caches[mode], tok, jnp.full((1,), context, jnp.int32))
    logits.block_until_ready()
    return time.perf_counter() - t0

  compile_s = {}
  for m in modes:  # first call: compile + run; the kernel's attention only in its own mode
    with common.restored_env(cpu.ATTENTION_ENV):
      os.environ[cpu.ATTENTION_ENV] = "1" if m == "kernel" else "0"
      compile_s[m] = one(m, contexts[0])
  for m in modes:  # a second untimed call per mode
    one(m, contexts[-1])
  times = {(c, m): [] for c in contexts for m in modes}
  for _ in tqdm(range(repeats), desc=f"{name}: interleaved rounds"):
    for c in contexts:
      for m in modes:
        times[(c, m)].append(one(m, c))
  itemsize = jnp.dtype(model.dtype).itemsize
  rows = []
  for c in contexts:
    row = {"model": name, "cache": cache_len, "context": c,
           "KV MB read": kv_read_mb(model.config, c, itemsize)}
    dense = statistics.median(times[(c, "dense")])
    for m in modes:
      row[f"{m} ms"] = 1e3 * statistics.median(times[(c, m)])
      if m != "dense":
        row[f"dense/{m}"] = dense / statistics.median(times[(c, m)])
    rows.append(row)
  return rows, {f"{name} {m}": s for m, s in compile_s.items()}


def _columns(blocks, ring: bool, kernel: bool) -> list[str]:
  modes = ([f"blocked@{b}" for b in blocks] + ([f"ring+blocked@{blocks[0]}"] if ring else [])
           + (["kernel"] if kernel else []))
  return (["model", "context", "KV MB read", "dense ms"] + [f"{m} ms" for m in modes]
          + [f"dense/{m}" for m in modes])


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--models", default="smollm2,gemma3",
                 help="comma-separated real models from the demo's user cache")
  p.add_argument("--cache", type=int, default=32768, help="KV slots per row (fixed)")
  p.add_argument("--contexts", default="512,2048,8192,24576",
                 help="comma-separated tokens already in the cache")
  p.add_argument("--blocks", default="512", help="comma-separated attention_block sizes")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="the models' dtype, and their caches' (bfloat16 writes "
                 "long_context_bfloat16.json)")
  p.set_defaults(repeats=5)
  args = p.parse_args(argv)
  if args.small:
    args.cache, args.contexts, args.blocks = 2048, "128,512,1536", "128"
  contexts = [int(x) for x in args.contexts.split(",")]
  blocks = [int(x) for x in args.blocks.split(",")]
  if args.repeats < 1 or not all(0 < c < args.cache for c in contexts) or not all(
      0 < b < args.cache for b in blocks):
    print("error: --repeats >= 1, and every context and block between 1 and --cache - 1",
          file=sys.stderr)
    return 2

  dtype = jnp.dtype(args.dtype)
  if args.small:
    models = small_models(dtype)
  else:
    from jax_specens import load_model
    models = {n: common.real_model(None, n) for n in args.models.split(",")}
  rows, compile_s, memory = [], {}, []
  for name, model in models.items():
    if not args.small:
      model = load_model(model, dtype=dtype)
    r, c = time_model(name, model, args.cache, contexts, blocks, args.repeats)
    print(common.table(r, _columns(blocks, has_windows(model.config), cpu.computes())),
          flush=True)
    rows += r
    compile_s.update(c)
    if has_windows(model.config):
      for dtype in (jnp.float32, jnp.bfloat16):
        memory.append({"model": name, "context": args.cache, "dtype": jnp.dtype(dtype).name,
                       **kv_memory(model.config, args.cache, jnp.dtype(dtype).itemsize)})
    del model
  print(f"\ndecode step (W = 1, batch 1) at a cache of {args.cache} slots; median of "
        f"{args.repeats} interleaved rounds")
  print(common.table(rows, _columns(blocks, any(f"ring+blocked@{blocks[0]} ms" in r
                                                  for r in rows), cpu.computes())))
  if memory:
    print(f"\nKV cache of one row at {args.cache} tokens: every layer full length vs rings of "
          f"window + {RING_SLACK} slots on the sliding layers")
    print(common.table(memory, ["model", "dtype", "full_gib", "ring_gib", "x_less"]))
  config = {"cache": args.cache, "contexts": contexts, "blocks": blocks, "repeats": args.repeats,
            "ring_slack": RING_SLACK,
            "small": args.small, "batch": 1, "width": 1, "dtype": args.dtype,
            "models": {n: str(m) if not args.small else n for n, m in models.items()}}
  name = "long_context_small" if args.small else "long_context"
  name += "_bfloat16" if args.dtype == "bfloat16" else ""
  path = common.write_results(args.out, name, config, rows, kv_memory=memory, compile_s=compile_s)
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
