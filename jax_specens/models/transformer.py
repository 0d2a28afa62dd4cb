"""The decoder-only transformer every family is an instance of."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_specens.cache import KVCache
from jax_specens.models.attention import Attention
from jax_specens.models.config import ModelConfig
from jax_specens.models.embed import embed, take_rows
from jax_specens.models.layers import (INIT, MLP, Norm, building_rows, layer_views, linear,
                                      weight_dot)


class Block(nnx.Module):
  """Pre-norm residual block; Gemma2/3 add a norm after attention and after the MLP."""

  def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.attn_norm = Norm(d, config, dtype)
    self.attn = Attention(config, layer, dtype, rngs)
    self.mlp_norm = Norm(d, config, dtype)
    self.mlp = MLP(config, dtype, rngs)
    self.post_attn_norm = Norm(d, config, dtype) if config.post_norms else None
    self.post_mlp_norm = Norm(d, config, dtype) if config.post_norms else None

  def __call__(self, x, positions, cache_k, cache_v, ring=False, valid=None, layer=None):
    a, cache_k, cache_v = self.attn(self.attn_norm(x), positions, cache_k, cache_v, ring, valid,
                                    layer)
    if self.post_attn_norm is not None:
      a = self.post_attn_norm(a)
    x = x + a
    m = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      m = self.post_mlp_norm(m)
    return x + m, cache_k, cache_v


class Transformer(nnx.Module):
  """Embeddings → blocks → final norm → LM head (tied to the embeddings or its own).

  scan: the structure of scanned layers (`models/layout.py`, which fills it): with the layer
  period P and n = L // P repeats, `stack[j]` holds layers j, j + P, ... with every parameter
  stacked on a leading axis of n, and `layers` only the L - n * P tail layers; one `lax.scan`
  step runs P layers, so a pass compiles P blocks instead of L.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               scan: bool = False):
    self.config = config
    self.rows = building_rows()  # its linear kernels are stored [d_out, d_in] (layers.linear)
    d = config.hidden_size
    self.embed = nnx.Embed(config.vocab_size, d, embedding_init=INIT, param_dtype=dtype,
                           dtype=dtype, rngs=rngs)
    self.pos_embed = (
        nnx.Embed(config.max_position_embeddings, d, embedding_init=INIT, param_dtype=dtype,
                  dtype=dtype, rngs=rngs)
        if config.positions == "learned" else None
    )
    period, repeats = config.layer_stack() if scan else (0, 0)
    self.stack = nnx.List([Block(config, j, dtype, rngs) for j in range(period)]) if scan else None
    self.layers = nnx.List([Block(config, i, dtype, rngs)
                            for i in range(period * repeats, config.num_layers)])
    self.fuse = linear(2 * d, d, False, dtype, rngs) if config.feature_input else None
    self.feature_fc = (linear(config.feature_width, d, False, dtype, rngs)
                       if config.feature_taps else None)
    self.final_norm = Norm(d, config, dtype)
    self.lm_head = None if config.tie_embeddings else linear(d, config.head_size, False, dtype,
                                                             rngs, out_dtype=jnp.float32)

  def __call__(
      self, tokens: Int[Array, "B W"], positions: Int[Array, "B W"], cache: KVCache,
      valid: Int[Array, "B"] | None = None, features: Float[Array, "B W D"] | None = None,
  ) -> tuple[Float[Array, "B W V"], KVCache]:
    """Scores W tokens per row at absolute `positions` (= cache slots), writing their K/V.

    Returns float32 logits and the cache with its rows' K/V written; `cache.pos` is left to the
    caller (see `jax_specens.step`). valid: the real tokens per row of a right-padded pass (ring
    layers keep only those; default all W). features: what a `config.feature_input` draft reads
    beside each token (the hidden state of the position before it; see `ModelConfig`).
    """
    x, cache = self.hidden(tokens, positions, cache, valid, features)
    return self.head(x), cache

  def hidden(
      self, tokens: Int[Array, "B W"], positions: Int[Array, "B W"], cache: KVCache,
      valid: Int[Array, "B"] | None = None, features: Float[Array, "B W F"] | None = None,
      taps: tuple[int, ...] = (),
  ) -> tuple[Float[Array, "B W F"], KVCache]:
    """The final-normed hidden states (what `head` scores) and the cache with K/V written.

    taps: layer indices whose residual stream after the layer (RMS-normalised, no weight) is
    appended (F = (1 + len(taps)) D: the features of a draft with `config.feature_taps`; `head`
    reads the first D). features: `[B, W, D]` (a feature draft's own outputs) or, for a draft
    with feature taps, the target's `[B, W, F]`, which its `feature_fc` maps to D.
    """
    x = embed(self.embed, tokens)
    if self.config.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
    if (features is None) == (self.fuse is not None):
      raise ValueError("a feature_input draft needs features= (the target's hidden states: "
                       "decode it with method='sd'), and only such a draft takes them")
    if self.feature_fc is not None and features.shape[-1] != x.shape[-1]:
      features = self.feature_fc(features.astype(x.dtype))  # the target's: [final; taps]
    if self.fuse is not None:
      x = self.fuse(jnp.concatenate([x, features.astype(x.dtype)], axis=-1))
    if self.pos_embed is not None:
      x = x + embed(self.pos_embed, positions)
    period = len(self.stack) if self.stack is not None else 0
    if cache.stacked != period:
      raise ValueError(
          f"a cache with {cache.stacked} stacked entries was given to a model with "
          f"{period} (scanned layers: models/layout.py); make it with the model's own "
          "`init_cache`")
    bad = [t for t in taps if not 0 <= t < self.config.num_layers]
    if bad:
      raise ValueError(f"feature taps {bad} are not layers of this {self.config.num_layers}-layer "
                       "model (the draft's feature_taps name its target's layers)")
    ks, vs = [], []
    tapped = [jnp.zeros_like(x, jnp.float32) for _ in taps]
    if self.stack is not None:
      x, ks, vs, tapped = self._scan(x, positions, cache, valid, taps, tapped)
    first = self.config.num_layers - len(self.layers)  # the unscanned layers' first index
    for j, layer in enumerate(self.layers):
      i = len(ks)  # its cache entry
      x, k, v = layer(x, positions, cache.k[i], cache.v[i], cache.ring[i], valid)
      ks.append(k)
      vs.append(v)
      tapped = _tap(tapped, taps, first + j, x)
    x = self.final_norm(x)
    if taps:
      x = jnp.concatenate([x] + [t.astype(x.dtype) for t in tapped], axis=-1)
    return x, cache.replace(k=tuple(ks), v=tuple(vs))

  def _scan(self, x, positions, cache, valid, taps, tapped):
    """The stacked layers (cache entries 0 .. P - 1 stacked alike): scan step r runs layers
    r * P .. r * P + P - 1, each writing its K/V in place at index r of its stacked entry
    (and its output into `tapped` where its index is a tap)."""
    period = len(self.stack)
    graphdef, params = nnx.split(self.stack)

    def body(carry, _):
      x, ks, vs, tapped, r = carry
      ks, vs = list(ks), list(vs)
      with layer_views(params, r) as params_r:  # the CPU kernel reads weights in the stack
        for j, block in enumerate(nnx.merge(graphdef, params_r)):
          x, ks[j], vs[j] = block(x, positions, ks[j], vs[j], cache.ring[j], valid, r)
          tapped = _tap(tapped, taps, r * period + j, x)
      return (x, tuple(ks), tuple(vs), tapped, r + 1), None

    carry = (x, cache.k[:period], cache.v[:period], tapped, jnp.zeros((), jnp.int32))
    _, repeats = self.config.layer_stack()
    (x, ks, vs, tapped, _), _ = jax.lax.scan(body, carry, None, length=repeats)
    return x, list(ks), list(vs), tapped

  def head(self, x: Float[Array, "B W D"], full: bool = True) -> Float[Array, "B W V"]:
    """float32 logits over the full vocabulary (`full=False`: the K head logits, unscattered).

    With `config.vocab_subset` (K ids) only K rows are read (the tied embedding's rows of those
    ids, or a `[D, K]` head) and scattered into a `-inf` array: a reduced-vocabulary draft puts
    probability zero outside its subset and proposes target ids directly.
    """
    ids = self.config.vocab_subset
    if self.lm_head is not None:
      logits = self.lm_head(x)  # float32 (built with out_dtype=float32)
    else:
      table = self.embed.embedding[...]
      if ids:
        table = take_rows(table, jnp.asarray(ids, jnp.int32))  # K D
      # contracts the table's last dim directly (no transposed copy) and accumulates in
      # float32: bf16 models never round their logits to bf16
      logits = weight_dot(x, table, (((x.ndim - 1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
    if self.config.final_softcap is not None:
      c = self.config.final_softcap
      logits = jnp.tanh(logits / c) * c
    if ids and full:
      out = jnp.full(logits.shape[:-1] + (self.config.vocab_size,), -jnp.inf, jnp.float32)
      logits = out.at[..., jnp.asarray(ids, jnp.int32)].set(logits)
    return logits


def _tap(tapped: list, taps: tuple[int, ...], layer, x: Float[Array, "B W D"]) -> list:
  """`tapped[t]` = x RMS-normalised (float32, no weight) where `layer` (an int, or the traced
  index inside a scan) is `taps[t]`; the others unchanged."""
  if not taps:
    return tapped
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
  return [jnp.where(layer == t, normed, old) for t, old in zip(taps, tapped)]
