"""Small building blocks: norms, rotary embeddings, the MLP."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_specens.kernels import cpu
from jax_specens.models.config import ModelConfig, RopeConfig

INIT = nnx.initializers.normal(0.02)


# float32 bytes of one converted piece of a weight (see `weight_dot`): small enough to stay in cache
CHUNK_BYTES = 4 << 20


def gpu_min_rows() -> int:
  """Rows a one-row product is padded to on GPU (`JAX_SPECENS_GPU_MIN_ROWS`, default 2; 1: off).

  Read when a function is traced: benchmarks compare settings with `jax.clear_caches()` between.
  """
  value = os.environ.get("JAX_SPECENS_GPU_MIN_ROWS", "2")
  if not value.strip().isdigit() or int(value) < 1:
    raise ValueError(f"JAX_SPECENS_GPU_MIN_ROWS={value!r}: give a whole number of rows >= 1 "
                     "(2, the default, pads one-row products on GPU to two rows; 1 turns it off)")
  return int(value)


def _after(w: Array, y: Array) -> Array:
  """`w`, made to depend on `y` (adds an exact zero XLA cannot fold: NaN and inf become 0)."""
  zero = jnp.nan_to_num(y.reshape(-1)[0].astype(jnp.float32) * 0.0, nan=0.0, posinf=0.0,
                        neginf=0.0)
  return w.astype(jnp.float32) + zero


def weight_dot(x: Array, w: Array, dims, precision=None, preferred_element_type=None,
               out_sharding=None) -> Array:
  """`lax.dot_general(x, w, dims)` of activations `x` with a weight `w`, accumulated in float32.

  Returns `preferred_element_type` (default: `x`'s dtype). XLA's CPU backend has no bfloat16
  matrix product: it converts both operands to float32, and its concurrency-optimising scheduler
  runs every weight's conversion at the start of the step, so all float32 copies are live at
  once (SmolLM2-135M in bf16: 538 MB of fresh temporaries per token, 1.3-1.8 s/token). On CPU a
  low-precision `w` is therefore converted only after `x` exists (a data dependency), and a
  2-D `w` larger than `CHUNK_BYTES` in float32 in pieces along its output dimension, each after
  the previous piece's product: the converted copies are small and reused, and stay in cache.
  Elsewhere (GPU, TPU) the product reads `w` as it is; on GPU a product of one activation row (a
  batch-1 decode step) is padded with zero rows to `gpu_min_rows()`: on an H200 a 1B bf16 model's
  batch-1 step took 1.81 ms with XLA's one-row products, 1.04 ms padded (`benchmarks/gpu_rows.py`).
  With `JAX_SPECENS_CPU_KERNELS=1` the products of decode passes (at most 16 rows) run in
  `jax_specens/kernels/cpu.py`'s kernel.
  """
  out = preferred_element_type or x.dtype
  (xc, wc), batch = dims
  if out_sharding is None and _cpu_kernel(x, w, dims, precision):
    stack, layer = _in_place(w)
    y = cpu.small_matmul(x.reshape(-1, x.shape[-1]), stack, transposed=wc[0] == 1, layer=layer)
    return y.reshape(x.shape[:-1] + y.shape[-1:]).astype(out)
  if (rows := _gpu_padded_rows(x, dims, out_sharding)) > 1:
    return _padded_dot(x, w, wc, precision, rows).astype(out)
  if w.dtype == jnp.float32 or jax.default_backend() != "cpu":
    return jax.lax.dot_general(x, w, dims, precision, preferred_element_type=jnp.float32,
                               out_sharding=out_sharding).astype(out)
  x = x.astype(jnp.float32)
  if w.ndim != 2 or batch != ((), ()) or w.size * 4 <= CHUNK_BYTES:
    return jax.lax.dot_general(x, _after(w, x), dims, precision,
                               preferred_element_type=jnp.float32).astype(out)
  axis = 1 - wc[0]  # w's output dimension
  n = w.shape[axis]
  step = max(1, CHUNK_BYTES // (4 * w.shape[wc[0]]))
  pieces, prev = [], x
  for lo in range(0, n, step):
    piece = jax.lax.slice_in_dim(w, lo, min(lo + step, n), axis=axis)
    prev = jax.lax.dot_general(x, _after(piece, prev), dims, precision,
                               preferred_element_type=jnp.float32)
    pieces.append(prev)
  return jnp.concatenate(pieces, -1).astype(out)


# id(w) -> (w, stack, layer) for the 2-D weights `layer_views` sliced out of stacks (see there)
_LAYER_VIEWS: contextvars.ContextVar[dict] = contextvars.ContextVar("layer_views", default={})


@contextlib.contextmanager
def layer_views(stacked, layer: Int[Array, ""]):
  """Yields `stacked` (a pytree of arrays stacked on a leading axis: a scanned model's layers,
  `models/layout.py`) at index `layer`. While open, a product of `weight_dot` with one of those
  2-D slices that goes to the CPU kernel reads it in place from its stack
  (`cpu.small_matmul(layer=...)`), so XLA, which copies a sliced operand out before a custom call
  (~7 MB a layer a step for SmolLM2 in bfloat16), leaves the unused slice out of the program.
  Every other use of a slice computes on the slice as usual."""
  views = {}

  def take(a):
    w = jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)
    if w.ndim == 2:
      views[id(w)] = (w, a, layer)
    return w

  sliced = jax.tree_util.tree_map(take, stacked)
  token = _LAYER_VIEWS.set({**_LAYER_VIEWS.get(), **views})
  try:
    yield sliced
  finally:
    _LAYER_VIEWS.reset(token)


def _in_place(w: Array) -> tuple[Array, Array | None]:
  """(stack, layer) where an open `layer_views` sliced `w` out of a stack, else (w, None)."""
  view = _LAYER_VIEWS.get().get(id(w))
  return (view[1], view[2]) if view is not None and view[0] is w else (w, None)


def _gpu_padded_rows(x, dims, out_sharding) -> int:
  """The rows to pad `x` to: `gpu_min_rows()` where `x` is one activation row contracted on its
  last dim, on GPU; else 1 (no padding)."""
  (xc, _), batch = dims
  one_row = (out_sharding is None and batch == ((), ()) and tuple(xc) == (x.ndim - 1,)
             and x.size == x.shape[-1])
  rows = gpu_min_rows() if one_row else 1
  return rows if rows > 1 and jax.default_backend() == "gpu" else 1


def _padded_dot(x: Array, w: Array, wc, precision, rows: int) -> Float[Array, "..."]:
  """`x` (one row, any leading shape of ones) times `w` as a `rows`-row product; row 0, float32.

  The zero rows sit behind an optimisation barrier so that XLA cannot fold the padding away.
  """
  padded = jax.lax.optimization_barrier(jnp.pad(x.reshape(1, -1), ((0, rows - 1), (0, 0))))
  y = jax.lax.dot_general(padded, w, (((1,), tuple(wc)), ((), ())), precision,
                          preferred_element_type=jnp.float32)
  return y[0].reshape(x.shape[:-1] + y.shape[1:])


def _cpu_kernel(x, w, dims, precision) -> bool:
  """Whether this product goes to the opt-in CPU kernel (`jax_specens/kernels/cpu.py`:
  `JAX_SPECENS_CPU_KERNELS=1`, decode passes of at most 16 rows)."""
  return cpu.computes() and cpu.fits(x, w, dims, precision)


# whether `linear` builds kernels stored `[d_out, d_in]` (see `rows_layout`)
_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("rows_layout", default=False)


@contextlib.contextmanager
def rows_layout(rows: bool = True):
  """While open, `linear` builds layers whose kernel is stored `[d_out, d_in]` (one row per output
  feature, as Hugging Face stores it) instead of `[d_in, d_out]`: the layout the CPU kernel
  streams fastest (`models/layout.rows_major`). Same parameter names, same products."""
  token = _ROWS.set(rows)
  try:
    yield
  finally:
    _ROWS.reset(token)


def building_rows() -> bool:
  """Whether a `rows_layout()` is open (modules built now store their kernels as rows)."""
  return _ROWS.get()


def rows_weight_dot(x: Array, w: Array, dims, *args, **kwargs) -> Array:
  """`weight_dot` for a kernel stored `[d_out, d_in]`: nnx.Linear contracts its axis 0, the
  stored kernel's axis 1 is the one meant."""
  (xc, _), batch = dims
  return weight_dot(x, w, ((xc, (1,)), batch), *args, **kwargs)


def linear(d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs,
           out_dtype=None) -> nnx.Linear:
  """`y = x @ kernel + bias`, kernel `[d_in, d_out]` (HF nn.Linear weights are transposed), or
  `[d_out, d_in]` inside `rows_layout()` (the same random draws, transposed).

  Accumulates in float32 (`weight_dot`); returns `out_dtype` (default: `dtype`).
  """
  rows = building_rows()
  layer = nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=INIT, param_dtype=dtype,
                     dtype=dtype, dot_general=rows_weight_dot if rows else weight_dot,
                     preferred_element_type=out_dtype or dtype, rngs=rngs)
  if rows:
    layer.kernel = nnx.Param(layer.kernel[...].T)
  return layer


def linears(x: Float[Array, "... D"], layers: Sequence[nnx.Linear]) -> list[Array]:
  """`[layer(x) for layer in layers]` for layers of `linear` that read the same x (q, k and v).

  Where the CPU kernel computes each of their products (`weight_dot`), they go to it in one call
  (`cpu.small_matmuls`), each computed exactly as alone: one dispatch to the threads instead of
  one per weight (SmolLM2's q, k and v in bfloat16, from memory: 42.6 -> 34 µs a layer; with
  gate and up also paired, a decode token 0.1-0.6 ms less in bfloat16). Anywhere else, each layer
  is called.
  """
  parts = [_kernel_part(x, layer) for layer in layers]
  if any(p is None for p in parts) or len({(p[0].dtype, p[2], id(p[3])) for p in parts}) > 1:
    return [layer(x) for layer in layers]
  inputs, _, transposed, index = parts[0]
  ys = cpu.small_matmuls(inputs.reshape(-1, inputs.shape[-1]), [p[1] for p in parts], transposed,
                         index)
  out = []
  for layer, y in zip(layers, ys):
    y = y.reshape(inputs.shape[:-1] + y.shape[-1:]).astype(layer.preferred_element_type
                                                            or inputs.dtype)
    if layer.bias is not None:
      y += jnp.reshape(layer.promote_dtype((layer.bias[...],), dtype=layer.dtype)[0],
                       (1,) * (y.ndim - 1) + (-1,))
    out.append(y)
  return out


def _kernel_part(x: Array, layer: nnx.Linear):
  """(inputs, stack, transposed, layer index) of `layer(x)`'s product where `weight_dot` would
  give it to the CPU kernel (as `nnx.Linear` calls it), else None."""
  inputs, kernel = layer.promote_dtype((x, layer.kernel[...]), dtype=layer.dtype)
  rows = layer.dot_general is rows_weight_dot
  if not (rows or layer.dot_general is weight_dot):
    return None
  dims = (((inputs.ndim - 1,), (1 if rows else 0,)), ((), ()))
  if not _cpu_kernel(inputs, kernel, dims, layer.precision):
    return None
  stack, index = _in_place(kernel)
  return inputs, stack, rows, index


class Norm(nnx.Module):
  """RMSNorm (optionally Gemma's `1 + w`) or LayerNorm, computed in float32."""

  def __init__(self, dim: int, config: ModelConfig, dtype, rngs: nnx.Rngs | None = None):
    self.kind = config.norm
    self.eps = config.norm_eps
    self.plus_one = config.norm_plus_one
    self.scale = nnx.Param(jnp.zeros((dim,), dtype) if self.plus_one else jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if self.kind == "layer" else None

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    y = x.astype(jnp.float32)
    if self.kind == "layer":
      y = y - y.mean(-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    y = y * (1.0 + w if self.plus_one else w)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def inv_frequencies(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
  """`[rotary_dim / 2]` inverse frequencies in float32, as Hugging Face computes them."""
  exps = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
  inv = (np.float32(1.0) / (np.float32(rope.theta) ** exps)).astype(np.float32)
  if rope.kind == "linear":
    inv = inv / np.float32(rope.factor)
  elif rope.kind == "llama3":
    old = rope.original_max_position
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(
    x: Float[Array, "B W H D"], positions: Int[Array, "B W"], inv_freq: np.ndarray,
) -> Float[Array, "B W H D"]:
  """Rotates the first `2 * len(inv_freq)` features of every head (rotate-half layout)."""
  rot = 2 * inv_freq.shape[0]
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # B W rot/2
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # B W 1 rot
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  xr, rest = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
  out = xr * cos + rotated * sin
  return jnp.concatenate([out, rest], -1) if rest.shape[-1] else out


def activation(name: str):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"unknown activation {name!r}; supported: silu, gelu_tanh, gelu")


class MLP(nnx.Module):
  """Gated (`down(act(gate(x)) * up(x))`) or plain (`down(act(up(x)))`) feed-forward."""

  def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
    d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.act_name = config.activation
    self.gate = linear(d, f, b, dtype, rngs) if config.gated_mlp else None
    self.up = linear(d, f, b, dtype, rngs)
    self.down = linear(f, d, b, dtype, rngs)

  def __call__(self, x: Float[Array, "B W D"]) -> Float[Array, "B W D"]:
    act = activation(self.act_name)
    if self.gate is None:
      return self.down(act(self.up(x)))
    gate, up = linears(x, (self.gate, self.up))
    return self.down(act(gate) * up)
