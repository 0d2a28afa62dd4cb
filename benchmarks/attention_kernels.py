"""Decode-time attention kernels side by side: ours (dense, blocked) and `jax.nn.dot_product_attention`.

    python -m benchmarks.attention_kernels           # 1B-model shapes (GPU: cuDNN is tried)
    python -m benchmarks.attention_kernels --small   # any backend, tiny shapes (checks the script)

For each batch B, pass width W and used context (the cache holds S slots, the rows' positions
are near `used`), it times one attention of W new queries per row, H query heads over K kv heads:

- `dense` / `blocked`: `jax_specens.models.attend` (what the models run today);
- `dpa_xla` / `dpa_cudnn`: `jax.nn.dot_product_attention(implementation=...)` with the same
  visibility mask (`attend.visible`), GQA handled by the function. cuDNN needs a GPU and bf16/fp16;
  where it refuses a shape, the row says why instead of a time.

Each time is the median of `--repeats` calls of a jitted loop of `--inner` dependent attentions
(the output feeds the next query), divided by `--inner`: one call's dispatch is not what is
measured. `max_err` is the largest |difference| from `dense` computed in float32. `kv_floor_us` is
the K/V bytes a kernel must read up to `used` over the bandwidth given with `--bandwidth-gbps`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from jax_specens.models import attend

# name: (heads, kv_heads, head_dim, slots, used contexts, batches, widths)
SHAPES = {"1b": (32, 8, 64, 8192, (512, 4096, 8000), (1, 16), (1, 5)),
          "small": (4, 2, 16, 256, (32, 200), (1, 2), (1, 3))}


def _dpa(implementation: str):
  def fn(q, k, v, positions, *, scale, window=None, softcap=None):
    del softcap  # the shapes here have none (Gemma 2's softcap is one reason dpa does not fit)
    mask = attend.visible(positions, jnp.arange(k.shape[1]), window)[:, None]  # B 1 W S
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation=implementation)
  return fn


def kernels(block: int) -> dict:
  return {"dense": attend.dense, "blocked": functools.partial(attend.blocked, block=block),
          "dpa_xla": _dpa("xla"), "dpa_cudnn": _dpa("cudnn")}


def _looped(kernel, inner: int, scale: float):
  """A jitted loop of `inner` attentions, each query nudged by the previous output."""
  @jax.jit
  def run(q, k, v, positions):
    def body(_, out):
      return kernel(q + out * 1e-3, k, v, positions, scale=scale).astype(q.dtype)
    return lax.fori_loop(0, inner, body, jnp.zeros_like(q))
  return run


def main(argv=None) -> int:
  p = common.base_parser(__doc__.split("\n\n")[0])
  p.add_argument("--inner", type=int, default=20, help="attentions per timed jitted call")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--bandwidth-gbps", type=float, default=None,
                 help="memory bandwidth for kv_floor_us (e.g. gpu_roofline's measurement)")
  args = p.parse_args(argv)
  heads, kv, dh, slots, useds, batches, widths = SHAPES["small" if args.small else "1b"]
  dtype = jnp.dtype(args.dtype)
  scale = dh ** -0.5
  rng = np.random.default_rng(0)
  rows = []
  for b in batches:
    k = jnp.asarray(rng.standard_normal((b, slots, kv, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, slots, kv, dh)), dtype)
    for w in widths:
      q = jnp.asarray(rng.standard_normal((b, w, heads, dh)), dtype)
      for used in useds:
        positions = jnp.asarray(used - w + np.arange(w)[None] - np.arange(b)[:, None] % 7,
                                jnp.int32)
        ref = attend.dense(q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), positions, scale=scale)
        kv_bytes = 2 * b * used * kv * dh * dtype.itemsize
        for name, kernel in kernels(min(512, slots // 4)).items():
          row = {"kernel": name, "batch": b, "width": w, "used": used, "slots": slots}
          try:
            out = jax.jit(lambda *a, kernel=kernel: kernel(*a, scale=scale))(q, k, v, positions)
            row["max_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            run = _looped(kernel, args.inner, scale)
            row["us"] = 1e6 * common.time_call(lambda: run(q, k, v, positions),
                                               repeats=args.repeats) / args.inner
            if args.bandwidth_gbps:
              row["kv_floor_us"] = 1e6 * kv_bytes / (args.bandwidth_gbps * 1e9)
          except Exception as e:  # noqa: BLE001 - cuDNN refusals are reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
          rows.append(row)
          print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()},
                flush=True)
  config = dict(heads=heads, kv_heads=kv, head_dim=dh, slots=slots, dtype=args.dtype,
                inner=args.inner)
  path = common.write_results(args.out, "attention_kernels", config, rows)
  print(f"\n{common.table(rows, ['kernel', 'batch', 'width', 'used', 'us', 'max_err', 'error'])}"
        f"\n\nwrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
