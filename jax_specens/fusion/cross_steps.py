"""The compiled parts of cross-tokenizer CoSD: pure step functions over split model state.

Each model keeps one KV cache `[B, S]` over its own tokenization of each row's text; a window
feeds only the tokens a row's cache lacks (`tokens [B, W]` right-padded, written at each row's
`start`), so the work per row stays O(L). Slots past a row's valid tokens are stale and never
read (the causal mask is on slot index), so rolling a cache back is just a smaller `start` next
time. `W` is a bucket (`bucket`), so each function compiles once per bucket it meets: in a
typical run the prompt's bucket and the smallest one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jax_specens.cache import KVCache
from jax_specens.fusion.features import assemble_features, model_features
from jax_specens.sampling import SamplingParams, draw
from jax_specens.models.model import Model
from jax_specens.step import forward, forward_rows

DRAFT_MIN_WIDTH = 1  # a draft feed after a window is 1 token, or a few after a replacement
ASSISTANT_MIN_WIDTH = 4  # an assistant feed is about the window's text, re-tokenized


def bucket(n: int, smallest: int) -> int:
  """The feed width for `n` tokens: the next power of two, at least `smallest`."""
  return max(smallest, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames="k", donate_argnums=1)
def draft_window(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    n_feed: Int[Array, "B"], key, params: SamplingParams, k: int,
) -> tuple[Int[Array, "B K"], Float[Array, "B K V"], KVCache]:
  """Feeds each row's `n_feed` unfed tokens (at `start`), then drafts K tokens, one pass each.

  Returns drafts `[B, K]`, the logits each was drawn from `[B, K, V]` and the cache, which then
  holds the fed tokens and the first K - 1 drafts (the K-th is never fed).
  """
  last, cache = forward_rows(model, cache, tokens, start, (n_feed - 1)[:, None])
  last = last[:, 0]
  b, v = last.shape

  def body(j, carry):
    cache, last, key, toks, all_logits = carry
    key, sub = jax.random.split(key)
    tok = draw(sub, last, params)
    out, cache = forward(model, cache, tok[:, None], start + n_feed + j)
    return (cache, out[:, 0], key, toks.at[:, j].set(tok), all_logits.at[:, j].set(last))

  init = (cache, last, key, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, v), jnp.float32))
  cache, last, key, toks, all_logits = jax.lax.fori_loop(0, k - 1, body, init)
  tok = draw(jax.random.split(key)[1], last, params)
  return toks.at[:, k - 1].set(tok), all_logits.at[:, k - 1].set(last), cache


@functools.partial(jax.jit, donate_argnums=1)
def assistant_score(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    rows: Int[Array, "B R"], own: Int[Array, "B R"],
):
  """Feeds `tokens` at `start` in one pass. At the logits after the fed tokens `rows` (indices
  into the W) returns the assistant's top token x^ `[B, R]` (docs/algorithms.md §4) and its part of the
  features: `p_a(own), p_a(x^)` `[B, R, 2]`, entropy and margin `[B, R]` (`own`: the token its
  own tokenization puts there, i.e. x~ in its vocabulary); and the cache."""
  logits, cache = forward_rows(model, cache, tokens, start, rows)
  x_hat = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return x_hat, model_features(logits, [own, x_hat]), cache


@jax.jit
def decide(
    verifier, d_logits: Float[Array, "B K Vd"], xd_d: Int[Array, "B K"], xa_d: Int[Array, "B K"],
    a_part, agree: Bool[Array, "B K"],
) -> Bool[Array, "B K"]:
  """The verifier's replace marks from the window's features: the draft's part from its logits
  and both candidates in its vocabulary (x~ `xd_d`, x^ `xa_d`), the assistant's part `a_part`
  (from `assistant_score`, its first K rows)."""
  d_part = model_features(d_logits, [xd_d, xa_d])
  return verifier(assemble_features([d_part, a_part], agree))
