"""An opt-in CPU kernel for the matrix products of decode passes (`small_matmul.cc`, via jax.ffi).

XLA's CPU matrix product reads a weight at about half the memory bandwidth as soon as the
activations have more than one row (a W-token verification pass, or a batch), and converts
bfloat16 weights to float32 copies before reading them (`models/layers.weight_dot`). The kernel
takes products of up to `MAX_ROWS` rows, float32 or bfloat16 weights (converted in registers,
float32 accumulation; a bfloat16 model's bfloat16 activations with AVX512-BF16's dot product on
CPUs that have it), split over the calling thread and XLA's intra-op pool; it reads a weight
once per 4 rows of activations (a `[K, N]` kernel) or 8 (a `[N, K]` tied head), so a batch-1 pass
of up to 4 tokens reads each weight once. A `[N, K]` weight is one sequential stream, read faster:
`load_model` stores a model's kernels so when the kernel is on (`models/layout.rows_major`).

It also copies the rows of a 16-bit embedding for the lookup of each step (`take_rows`,
`take_rows.cc`): XLA gathers them from a float32 copy of the whole table, made once a `decode`;
and it computes the attention of decode passes (`attend`, `attention.cc`: each visible cache slot
read once; `JAX_SPECENS_CPU_ATTENTION=0` keeps XLA's).

Opt-in: `JAX_SPECENS_CPU_KERNELS=1` (read when a model's pass is traced). It needs an x86 CPU
with AVX-512 and a C++ compiler (`$CXX`, else `g++`); it is built once into the user cache
(`~/.cache/jax_specens/kernels/`, keyed by the sources, the flags and jaxlib's version). Where it
cannot be used, `weight_dot` keeps XLA's product and says why once. A pass differentiated
through the kernel (a trainer's small batch) gets XLA's gradient (`with_xla_gradient`); on a mesh
XLA gathers the operands of the call (use it on one device).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

ENV = "JAX_SPECENS_CPU_KERNELS"
ATTENTION_ENV = "JAX_SPECENS_CPU_ATTENTION"  # 0: decode passes keep XLA's attention
MAX_ROWS = 16  # rows (batch x pass width) the kernel takes; wider products stay with XLA
MAX_HEAD_DIM = 256  # head size the kernel's attention takes (a query's output in registers)
SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("small_matmul.cc", "take_rows.cc", "attention.cc"))
HEADERS = (Path(__file__).with_name("common.h"),)
TARGET = "jax_specens_small_matmul"  # products with one or more weights (or stacks, read in place)
TAKE_TARGET = "jax_specens_take_rows"  # a 16-bit embedding's rows, copied as bits
ATTEND_TARGET = "jax_specens_attend"  # a decode pass's attention over a (stacked) KV cache
FLAGS = ("-O3", "-mavx512f", "-mfma", "-shared", "-fPIC", "-std=c++17", "-w")


def requested() -> bool:
  return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def computes() -> bool:
  """Whether products traced now go to the kernel (where they fit, `fits`): it is requested,
  the backend is the CPU and the kernel is built (`available`)."""
  return requested() and jax.default_backend() == "cpu" and available()


def attention() -> bool:
  """Whether the attention of decode passes traced now goes to the kernel (`attend`): where
  products do (`computes`), unless $JAX_SPECENS_CPU_ATTENTION is 0 (benchmarks compare both)."""
  off = os.environ.get(ATTENTION_ENV, "").strip().lower() in ("0", "false", "no")
  return not off and computes()


@functools.cache
def available() -> bool:
  """Builds (once per source and jaxlib) and registers the kernel; False, with one warning
  naming the reason, where it cannot run here."""
  try:
    _register(_build())
    return True
  except Exception as e:  # noqa: BLE001 (any failure means: use XLA's product)
    warnings.warn(f"{ENV}=1 but the CPU kernel is not used: {e}; decoding keeps XLA's matrix "
                  "product", stacklevel=2)
    return False


def _build() -> Path:
  if "avx512f" not in _cpu_flags():
    raise RuntimeError("this CPU has no AVX-512 (avx512f)")
  cxx = os.environ.get("CXX") or shutil.which("g++")
  if not cxx:
    raise RuntimeError("no C++ compiler (set $CXX or install g++)")
  import jaxlib
  from jax_specens.user_cache import user_cache_dir
  key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS)
                       + " ".join(FLAGS).encode()
                       + jaxlib.__version__.encode()).hexdigest()[:16]
  out = user_cache_dir() / "kernels" / f"small_matmul-{key}.so"
  if out.is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed in place
    part = Path(tmp) / out.name
    r = subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
                        str(part)],
                       capture_output=True, text=True)
    if r.returncode:
      raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-500:]}")
    os.replace(part, out)
  return out


@functools.cache
def _cpu_flags() -> set[str]:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return set()
  line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
  return set(line.partition(":")[2].split())


_REGISTERED: list[Path] = []  # a target name registers once per process


def _register(path: Path) -> None:
  if _REGISTERED:
    return
  import ctypes
  lib = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxSpecensSmallMatmul),
                              platform="cpu")
  jax.ffi.register_ffi_target(TAKE_TARGET, jax.ffi.pycapsule(lib.JaxSpecensTakeRows),
                              platform="cpu")
  jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(lib.JaxSpecensAttend),
                              platform="cpu")
  _REGISTERED.append(path)


def with_xla_gradient(kernel: Callable, reference: Callable) -> Callable:
  """`kernel`, differentiable in reverse mode: the forward pass runs the kernel, the backward pass
  the vjp of `reference` (XLA's program of the same function, recomputed from the saved inputs;
  integer inputs get no cotangent). The kernels themselves have no gradient rule: without this a
  trainer whose pass fits the kernel (JAX_SPECENS_CPU_KERNELS=1, a small batch) would fail."""
  f = jax.custom_vjp(kernel)
  f.defvjp(lambda *args: (kernel(*args), args), lambda args, g: jax.vjp(reference, *args)[1](g))
  return f


def small_matmul(x: Float[Array, "M K"], w: Array, transposed: bool,
                 layer: Int[Array, ""] | None = None) -> Float[Array, "M N"]:
  """`x @ w` (`transposed`: `x @ w.T`, w `[N, K]`) in float32, for M <= MAX_ROWS rows; w float32
  or bfloat16 with N (and, transposed, K) a multiple of 16. Call `available()` first.

  x and w both bfloat16 (a bfloat16 model) take the AVX512-BF16 path where the CPU has it (and,
  for `[K, N]`, N % 32 == 0): the same exact products, another summation order.

  layer: w is a stack `[n, K, N]` (or `[n, N, K]`) of such weights, a scanned model's layers, and
  the product is with `w[layer]`, read in place: XLA would copy a slice `w[layer]` out of the
  stack before the call, on every step (`models/layout.py`).
  """
  return small_matmuls(x, [w], transposed, layer)[0]


def small_matmuls(x: Float[Array, "M K"], ws: Sequence[Array], transposed: bool,
                  layer: Int[Array, ""] | None = None) -> list[Float[Array, "M N"]]:
  """`[small_matmul(x, w, transposed, layer) for w in ws]` in one call, each product computed
  exactly as alone: their tasks share one dispatch to the threads (q, k and v of a layer; a
  helper thread of XLA's pool that is not lingering from the previous call starts ~14 us after it
  is called, measured in SmolLM2's decode; `common.h`'s `Parallel`)."""
  ns = [w.shape[-2] if transposed else w.shape[-1] for w in ws]
  bf16 = {x.dtype == w.dtype == jnp.bfloat16 and (transposed or n % 32 == 0)
          and "avx512_bf16" in _cpu_flags() for w, n in zip(ws, ns)}
  if len(bf16) > 1:  # one call takes one kind of x
    return [small_matmul(x, w, transposed, layer) for w in ws]
  call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for n in ns],
                          vmap_method="sequential")
  as_is = bf16.pop()
  dims = (((1,), (1 if transposed else 0,)), ((), ()))

  def kernel(x, index, *ws):
    return list(call(x if as_is else x.astype(jnp.float32), index, *ws,
                     transposed=bool(transposed)))

  def reference(x, index, *ws):
    return [jax.lax.dot_general(x, w if layer is None else w[index], dims,
                                preferred_element_type=jnp.float32) for w in ws]

  index = jnp.asarray(-1 if layer is None else layer, jnp.int32)
  return with_xla_gradient(kernel, reference)(x, index, *ws)


def take_rows(table: Array, ids: Int[Array, "..."]) -> Array:
  """`jnp.take(table, ids, axis=0)` for a 2-D table of 16-bit floats, as a copy of rows (`ids`
  shape + `[D]`, the table's dtype; `take_rows.cc`). Call `available()` first."""
  call = jax.ffi.ffi_call(TAKE_TARGET, jax.ShapeDtypeStruct(ids.shape + table.shape[1:],
                                                            table.dtype),
                          vmap_method="sequential")
  return call(table, ids.astype(jnp.int32))


def attend(q: Float[Array, "B W H Dh"], k: Array, v: Array, positions: Int[Array, "B W"],
           layer: Int[Array, ""] | None, *, scale: float, window: int | None,
           softcap: float | None) -> Float[Array, "B W H Dh"]:
  """Softmax attention of W new queries over a KV cache (`attention.cc`), float32 out: what
  `models/attend.dense` computes, reading each visible slot once. k, v: `[B, S, K, Dh]` caches
  (float32, bfloat16 or its uint16 bits), or stacks `[n, B, S, K, Dh]` read at `layer` in place.
  Dh must be a multiple of 16, at most MAX_HEAD_DIM. Call `available()` first."""
  if layer is None:  # k[None] would do, but XLA then copies a cache it updates in place
    layer = 0
  call = jax.ffi.ffi_call(ATTEND_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q.astype(jnp.float32), k, v, jnp.asarray(layer, jnp.int32),
              positions.astype(jnp.int32), scale=np.float32(scale), window=np.int64(window or 0),
              softcap=np.float32(softcap or 0.0))


def fits(x: Array, w: Array, dims, precision) -> bool:
  """Whether `lax.dot_general(x, w, dims)` is a product the kernel computes: x's last axis
  contracted with either axis of a 2-D w, no batch axes, at most MAX_ROWS rows."""
  (xc, wc), batch = dims
  if w.ndim != 2 or batch != ((), ()) or tuple(xc) != (x.ndim - 1,) or len(wc) != 1:
    return False
  if precision is not None or w.dtype not in (jnp.float32, jnp.bfloat16):
    return False
  k, n = (w.shape[1], w.shape[0]) if wc[0] == 1 else w.shape
  return math.prod(x.shape[:-1]) <= MAX_ROWS and n % 16 == 0 and k % 16 == 0
