"""Multi-head attention (MHA / GQA / MQA) over the preallocated KV cache (see `attend.py`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_specens import cache as kv
from jax_specens.models.attend import attend, ring as ring_attend
from jax_specens.models.config import ModelConfig
from jax_specens.models.layers import Norm, apply_rope, inv_frequencies, linear, linears


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
    self.scale = config.scale
    self.softcap = config.attn_softcap
    self.window = config.window(layer)
    self.block = config.attention_block
    self.use_rope = config.positions == "rope"
    self.inv_freq = (
        tuple(inv_frequencies(config.rope_for(layer), config.rotary_dim).tolist())
        if self.use_rope else ()
    )
    self.q = linear(d, h * hd, config.qkv_bias, dtype, rngs)
    self.k = linear(d, k * hd, config.qkv_bias, dtype, rngs)
    self.v = linear(d, k * hd, config.qkv_bias, dtype, rngs)
    self.o = linear(h * hd, d, config.o_bias, dtype, rngs)
    self.q_norm = Norm(hd, config, dtype) if config.qk_norm else None
    self.k_norm = Norm(hd, config, dtype) if config.qk_norm else None

  def __call__(
      self,
      x: Float[Array, "B W D"],
      positions: Int[Array, "B W"],
      cache_k: Float[Array, "*L B S K Dh"],
      cache_v: Float[Array, "*L B S K Dh"],
      ring: bool = False,
      valid: Int[Array, "B"] | None = None,
      layer: Int[Array, ""] | None = None,
  ) -> tuple[Float[Array, "B W D"], Float[Array, "*L B S K Dh"], Float[Array, "*L B S K Dh"]]:
    """ring: the cache is this sliding layer's ring (`cache.py`); valid: tokens per row that are
    real (a right-padded prompt; default all W): a ring keeps only those. layer: the caches are
    stacked `[n, B, S, K, Dh]` (scanned layers, `models/layout.py`) and this is layer `layer` of
    them: its K/V are written in place and read from that slice."""
    b, w, _ = x.shape
    q, k, v = linears(x, (self.q, self.k, self.v))
    q = q.reshape(b, w, self.num_heads, self.head_dim)
    k = k.reshape(b, w, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, w, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      inv = np.asarray(self.inv_freq, np.float32)
      q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    kw = dict(scale=self.scale, window=self.window, softcap=self.softcap)
    own = (lambda c: c) if layer is None else (lambda c: c[layer])  # as stored (attend.py)
    if ring:
      self._check_ring(cache_k.shape[-3], w, valid)
      out = ring_attend(q, own(cache_k), own(cache_v), k, v, positions, **kw)
      cache_k = kv.write_ring(cache_k, k, positions[:, 0], valid, layer)
      cache_v = kv.write_ring(cache_v, v, positions[:, 0], valid, layer)
    else:
      cache_k = kv.write(cache_k, k, positions[:, 0], layer)
      cache_v = kv.write(cache_v, v, positions[:, 0], layer)
      out = attend(q, cache_k, cache_v, positions, block=self.block, layer=layer, **kw)
    return self.o(out.reshape(b, w, self.num_heads * self.head_dim)), cache_k, cache_v

  def _check_ring(self, slots: int, width: int, valid) -> None:
    """A pass of W tokens over a ring of `window + slack` slots may leave unaccepted tokens in
    it; that stays correct while W <= slack + 1 (`cache.py`). Wider passes name their real
    tokens (`valid`), as a prompt does."""
    if self.window is None:
      raise ValueError("a ring cache was given to a global-attention layer")
    if valid is None and width > slots - self.window + 1:
      raise ValueError(
          f"a pass of {width} tokens over a ring cache of {slots} slots (window {self.window}) "
          f"could overwrite positions still in the window; pass valid= (the real tokens per row), "
          f"or make the cache with ring_slack >= {width - 1}")
