"""A slow, plain reference of cross-tokenizer CoSD (docs/algorithms.md §4) at the text level, greedy, one prompt.

No caches, no batching, no incremental re-tokenization: every model pass is a full forward over
the whole token sequence, and the assistant's tokenization is its tokenizer's canonical encoding of
the text so far. The batched program (`jax_specens.fusion.cosd_text`) must give the same text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens.fusion.features import translated_features
from jax_specens.fusion.token_text import complete, is_char_boundary, token_bytes
from jax_specens.step import forward

# forwards are padded to a multiple of BUCKET tokens: one program per width met (the sequences here
# are 5 to 44 tokens; padding all to 64 ran each forward at up to 13x the work it needed)
BUCKET = 16


@jax.jit
def _all_logits(model, ids):
  cache = model.init_cache(1, ids.shape[0])  # unrolled or scanned layers
  return forward(model, cache, ids[None], jnp.zeros((1,), jnp.int32))[0][0]


def all_logits(model, ids) -> np.ndarray:
  """Logits after every token of `ids` `[len(ids), V]` (one full forward)."""
  width = -(-len(ids) // BUCKET) * BUCKET
  padded = jnp.asarray(np.pad(np.asarray(ids, np.int32), (0, width - len(ids))))
  return np.asarray(_all_logits(model, padded))[:len(ids)]


def _stops(model, tok) -> set[int]:
  return set(model.config.eos_token_ids) | {tok.eos_token_id}


def reference_cosd(draft, assistant, tok_d, tok_a, prompt: str, *, max_new: int, k: int,
                   verifier) -> str:
  """The generated text of CoSD over `prompt` (greedy drafts, x^ = the assistant's argmax)."""
  bytes_d, bytes_a = token_bytes(tok_d), token_bytes(tok_a)
  stops_d, stops_a = _stops(draft, tok_d), _stops(assistant, tok_a)
  text = prompt.encode()
  d_ids = list(tok_d(prompt)["input_ids"])
  emitted = 0
  while emitted < max_new:
    # 1. the draft drafts k tokens greedily from its own token ids
    drafts, d_logits = [], []
    for _ in range(k):
      logits = all_logits(draft, d_ids + drafts)[-1]
      d_logits.append(logits)
      drafts.append(int(np.argmax(logits)))
    stop_at = next((j for j, x in enumerate(drafts) if x in stops_d), None)
    end = k if stop_at is None else stop_at + 1
    offsets = [len(text)]
    for x in drafts[:end]:
      offsets.append(offsets[-1] + len(bytes_d[x]))
    window = text + b"".join(bytes_d[x] for x in drafts[:end])
    # 2. the assistant reads the canonical tokenization of the window's whole characters
    whole = window[:complete(window)]
    a_ids = list(tok_a(whole.decode())["input_ids"])
    a_logits = all_logits(assistant, a_ids)
    starts, at = {}, 0
    for i, x in enumerate(a_ids):
      if bytes_a[x]:
        starts[at] = i
      at += len(bytes_a[x])
    # 3. the first verifiable position the verifier replaces
    replace = None
    for j in range(end):
      o = offsets[j]
      if not is_char_boundary(window, o):
        continue
      i = len(a_ids) if (j == stop_at and o == len(whole)) else starts.get(o)
      if i is None or i == 0:
        continue
      x_hat = int(np.argmax(a_logits[i - 1]))
      mine = a_ids[i] if i < len(a_ids) else tok_a.eos_token_id
      if x_hat == mine or (i == len(a_ids) and x_hat in stops_a):
        continue  # agreement is kept
      if x_hat in stops_a:
        carried = tok_d.eos_token_id
      else:
        piece = bytes_a[x_hat]
        if not piece or complete(piece) != len(piece) or not is_char_boundary(piece, 0):
          continue  # a partial character cannot be carried across
        carried = tok_d(piece.decode(), add_special_tokens=False)["input_ids"][0]
      feats = translated_features(
          [jnp.asarray(d_logits[j]), jnp.asarray(a_logits[i - 1])],
          [[jnp.int32(drafts[j]), jnp.int32(carried)], [jnp.int32(mine), jnp.int32(x_hat)]],
          jnp.bool_(False))
      if bool(verifier(feats[None])[0]):
        replace = (j, x_hat)
        break
    # 4. emit
    budget = max_new - emitted
    if replace is not None:
      j, x_hat = replace
      keep = drafts[:min(j, budget)]
      d_ids += keep
      text += b"".join(bytes_d[x] for x in keep)
      if j >= budget or x_hat in stops_a:
        break
      emitted += j + 1
      text += bytes_a[x_hat]
      d_ids += tok_d(bytes_a[x_hat].decode(), add_special_tokens=False)["input_ids"]
      continue
    n = min(end, budget)
    d_ids += drafts[:n]
    text += b"".join(bytes_d[x] for x in drafts[:n])
    emitted += n
    if stop_at is not None and stop_at < n:
      break
  return text[len(prompt.encode()):].decode(errors="replace")
