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
from jax_specens.fusion.features import translated_features
from jax_specens.sampling import SamplingParams, log_probs, sample
from jax_specens.step import Model, forward

DRAFT_MIN_WIDTH = 4  # a draft feed after a window is 1 token, or a few after a replacement
ASSISTANT_MIN_WIDTH = 8  # an assistant feed is about the window's text, re-tokenized


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
  logits, cache = forward(model, cache, tokens, start)
  last = jnp.take_along_axis(logits, (n_feed - 1)[:, None, None], axis=1)[:, 0]
  b, v = last.shape

  def body(j, carry):
    cache, last, key, toks, all_logits = carry
    key, sub = jax.random.split(key)
    tok = sample(sub, log_probs(last, params))
    out, cache = forward(model, cache, tok[:, None], start + n_feed + j)
    return (cache, out[:, 0], key, toks.at[:, j].set(tok), all_logits.at[:, j].set(last))

  init = (cache, last, key, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, v), jnp.float32))
  cache, last, key, toks, all_logits = jax.lax.fori_loop(0, k - 1, body, init)
  tok = sample(jax.random.split(key)[1], log_probs(last, params))
  return toks.at[:, k - 1].set(tok), all_logits.at[:, k - 1].set(last), cache


@functools.partial(jax.jit, donate_argnums=1)
def assistant_score(
    model: Model, cache: KVCache, tokens: Int[Array, "B W"], start: Int[Array, "B"],
    rows: Int[Array, "B R"],
) -> tuple[Float[Array, "B R V"], Int[Array, "B R"], KVCache]:
  """Feeds `tokens` at `start` in one pass; returns the logits after the fed tokens `rows`
  (indices into the W fed), the assistant's top token there (x^, SPEC §4) and the cache."""
  logits, cache = forward(model, cache, tokens, start)
  picked = jnp.take_along_axis(logits, rows[:, :, None], axis=1)
  return picked, jnp.argmax(picked, axis=-1).astype(jnp.int32), cache


@jax.jit
def decide(
    verifier, d_logits: Float[Array, "B K Vd"], a_logits: Float[Array, "B K Va"],
    xd_d: Int[Array, "B K"], xa_d: Int[Array, "B K"], xd_a: Int[Array, "B K"],
    xa_a: Int[Array, "B K"], agree: Bool[Array, "B K"],
) -> Bool[Array, "B K"]:
  """The verifier's replace marks from the window's features; candidates in both vocabularies
  (x~ and x^ in the draft's: `xd_d`, `xa_d`; in the assistant's: `xd_a`, `xa_a`)."""
  feats = translated_features([d_logits, a_logits], [[xd_d, xa_d], [xd_a, xa_a]], agree)
  return verifier(feats)
