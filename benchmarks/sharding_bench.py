"""Memory per device as the mesh grows: parameters and KV cache bytes on data x model meshes.

    python -m benchmarks.sharding_bench          # or: jax-specens bench sharding [--small]

Two parts:
  1. planned: a Llama-3.2-1B-shaped bf16 model (abstract, nothing allocated) and its cache for
     batch 8 x 4096 tokens, split by the partition rules of `jax_specens.parallel` on meshes
     data x model = 1x1, 1x2, 1x4, 1x8, 2x4, 8x1: bytes on the fullest device vs one device.
  2. measured: a small model really placed on the same meshes (8 simulated CPU devices when there
     is no accelerator): the bytes every device actually holds (must equal the plan), and a greedy
     `jax_specens.parallel.decode` whose tokens must equal the single-device tokens.
Writes sharding.json and sharding.png.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # 8 CPU devices when there is no accelerator (read when the backend starts, not at import)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1)]  # (data, model)


def available_meshes():
  """(data, model, Mesh) for each of MESHES that fits the devices present (larger are skipped)."""
  from jax_specens import parallel as par
  for data, model in MESHES:
    if data * model <= jax.device_count():
      yield data, model, par.make_mesh(data, model)
GIB = 2 ** 30


def llama_1b(small: bool):
  from jax_specens import ModelConfig
  if small:
    return ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
  return ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                     tie_embeddings=True, max_position_embeddings=131072)


def planned_bytes(tree, shardings) -> int:
  """Bytes of the largest per-device share of `tree` (ShapeDtypeStructs or arrays)."""
  per_device: dict[int, int] = {}
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    nbytes = int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
    for d in s.device_set:
      per_device[d.id] = per_device.get(d.id, 0) + nbytes
  return max(per_device.values())


def held_bytes(tree) -> int:
  """Bytes of the largest share any device actually holds of the arrays in `tree`."""
  per_device: dict[int, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return max(per_device.values())


def plan_rows(cfg, dtype, batch: int, context: int) -> list[dict]:
  from jax.sharding import NamedSharding

  from jax_specens import parallel as par
  from jax_specens.cache import init_cache
  from jax_specens.checkpoint import abstract_model
  abstract = abstract_model(cfg, dtype)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype))
  rows = []
  for data, model, mesh in available_meshes():
    plan = par.make_plan(cfg, mesh)
    p_sh = par.model_shardings(abstract, mesh)
    kv = NamedSharding(mesh, par.cache_spec(plan))
    c_sh = cache.replace(k=tuple(kv for _ in cache.k), v=tuple(kv for _ in cache.v),
                         pos=NamedSharding(mesh, par.batch_spec(1)))
    rows.append(dict(mesh=f"{data}x{model}", data=data, model=model,
                     params_gib=planned_bytes(abstract.params, p_sh) / GIB,
                     cache_gib=planned_bytes(cache, c_sh) / GIB, notes="; ".join(plan.notes)))
  for r in rows:
    r["params_x"] = rows[0]["params_gib"] / r["params_gib"]
    r["cache_x"] = rows[0]["cache_gib"] / r["cache_gib"]
    r["ideal_x"] = r["data"] * r["model"]
  return rows


def measured_rows(cfg, batch: int, new_tokens: int, repeats: int) -> list[dict]:
  from jax_specens import create_model
  from jax_specens import parallel as par
  from jax_specens.decoding.api import decode
  model = create_model(cfg, seed=0)
  model = model.replace(params=jax.tree_util.tree_map(  # spread logits: no greedy near-ties
      lambda x: 4 * x if x.ndim >= 2 else x, model.params))
  prompts, lengths = common.random_prompts(batch, 16, cfg.vocab_size)
  want = np.asarray(decode(model, prompts, lengths, max_new_tokens=new_tokens,
                           temperature=0.0).tokens)
  rows = []
  for data, mp, mesh in available_meshes():
    sharded = par.shard_model(model, mesh)
    cache = par.shard_cache(sharded.init_cache(batch, 16 + new_tokens), cfg, mesh)
    run = lambda: par.decode(sharded, prompts, lengths, mesh=mesh, max_new_tokens=new_tokens,
                             temperature=0.0)
    out, first = common.first_call(run)
    secs = common.time_call(run, repeats=repeats, warmup=0)
    plan = planned_bytes(model.params, par.model_shardings(model, mesh))
    rows.append(dict(mesh=f"{data}x{mp}", data=data, model=mp,
                     params_kib=held_bytes(sharded.params) / 1024,
                     as_planned=held_bytes(sharded.params) == plan,
                     cache_kib=held_bytes(cache) / 1024,
                     same_tokens=bool(np.array_equal(np.asarray(out.tokens), want)),
                     first_call_s=first, decode_s=secs))
  return rows


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8, help="rows (planned part and measured part)")
  p.add_argument("--context", type=int, default=4096, help="cache length of the planned part")
  p.add_argument("--max-new-tokens", type=int, default=None, help="measured decode (default 16, "
                 "--small: 4)")
  args = p.parse_args(argv)
  n_new = args.max_new_tokens or (4 if args.small else 16)
  if jax.device_count() < 8:
    print(f"(only {jax.device_count()} devices: meshes larger than that are skipped)")

  big = llama_1b(args.small)
  planned = plan_rows(big, jnp.bfloat16, args.batch, 256 if args.small else args.context)
  print(f"planned: {'small' if args.small else 'Llama-3.2-1B-shaped'} bf16 model, cache "
        f"{args.batch} x {256 if args.small else args.context} tokens; GiB on the fullest device")
  print(common.table(planned, ["mesh", "params_gib", "params_x", "cache_gib", "cache_x",
                               "ideal_x"]))
  for r in planned:
    if r["notes"]:
      print(f"  {r['mesh']}: {r['notes']}")

  small = llama_1b(True)
  measured = measured_rows(small, args.batch, n_new, args.repeats)
  print(f"\nmeasured on {jax.devices()[0].platform}: small model, bytes every device holds; greedy "
        f"decode of {n_new} tokens vs one device")
  print(common.table(measured, ["mesh", "params_kib", "as_planned", "cache_kib", "same_tokens",
                                "first_call_s", "decode_s"]))
  config = dict(batch=args.batch, context=args.context, max_new_tokens=n_new, small=args.small,
                planned_model=str(big), measured_model=str(small))
  path = common.write_results(args.out, "sharding", config, planned, measured=measured)
  png = common.line_plot(args.out / "sharding.png", [r["model"] for r in planned if r["data"] == 1],
                         {"params": [r["params_x"] for r in planned if r["data"] == 1],
                          "cache": [r["cache_x"] for r in planned if r["data"] == 1],
                          "ideal": [r["ideal_x"] for r in planned if r["data"] == 1]},
                         "model axis size", "less memory per device (x)",
                         "per-device memory vs the model axis (data=1)")
  print(f"\nwrote {path}" + (f" and {png}" if png else ""))
  return 0 if all(r["same_tokens"] and r["as_planned"] for r in measured) else 1


if __name__ == "__main__":
  raise SystemExit(main())
