"""The pieces every decoding method shares: inputs, loop state, feeding models, emitting tokens.

Conventions (all methods):
- `seq[b]` holds row b's prompt, then its generated tokens, then (speculative methods) its pending
  proposals; `committed = prompt_len + length` tokens of it are final.
- Each model's `cache.pos[b]` is how many tokens of `seq[b]` it has fed. After `prefill` it is
  `prompt_len - 1`: the last committed token is always fed by the next pass, so every pass feeds at
  least one token and yields the distribution for the next position.
- `emit` appends tokens to the output, stops a row at a stop id, at `max_new_tokens`, or when the
  cache has no room for the method's lookahead (`finish` RUNNING -> STOP / LENGTH / CACHE_FULL).
  Finished rows never change again.
- A method is `init` + `step` (one loop iteration); `generate` runs `step` in a `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jax_specens import vocab
from jax_specens.cache import KVCache, ring_slack
from jax_specens.decoding.outputs import (CACHE_FULL, LENGTH, RUNNING, STOP, DecodeOutput,
                                          DecodeStats)
from jax_specens.ensemble_fns import Ensemble
from jax_specens.sampling import SamplingParams
from jax_specens.models.model import Model
from jax_specens.step import forward, forward_hidden


@flax.struct.dataclass
class Request:
  """The traced inputs of one decode (new values never recompile; new shapes do).

  prompts `[B, T]` right-padded; prompt_lengths `[B]`; stop_ids `[B, S]` padded with -1;
  extra: a method-specific pytree (e.g. a CoSD verifier's parameters), None when unused.
  """

  prompts: Int[Array, "B T"]
  prompt_lengths: Int[Array, "B"]
  sampling: SamplingParams
  stop_ids: Int[Array, "B S"]
  key: Array
  ensemble: Ensemble
  extra: Any = None


@dataclasses.dataclass(frozen=True)
class Config:
  """The static part of a decode: one compiled program per distinct Config (and shapes).

  gammas: speculation length per model in method order (empty for non-speculative methods).
  lookahead: slots past the committed length the method may write (cache slack).
  options: the method's own static options, a frozen (hashable) dataclass its `prepare` returns
    (`se.SpecOptions`, `cosd.CosdOptions`); None for a method without options.
  """

  method: str
  max_new_tokens: int
  cache_len: int
  gammas: tuple[int, ...] = ()
  lookahead: int = 0
  options: Any = None


@flax.struct.dataclass
class LoopState:
  """tokens `[B, N]` output buffer; length `[B]`; finish `[B]`; seq `[B, S]` (see module doc);
  caches: one per model (method order); extra: the method's own loop state."""

  tokens: Int[Array, "B N"]
  length: Int[Array, "B"]
  finish: Int[Array, "B"]
  seq: Int[Array, "B S"]
  caches: tuple[KVCache, ...]
  key: Array
  stats: DecodeStats
  extra: Any = None

  @property
  def active(self) -> Array:
    return self.finish == RUNNING

  def committed(self, req: Request) -> Int[Array, "B"]:
    return req.prompt_lengths + self.length

  def next_key(self) -> tuple["LoopState", Array]:
    key, sub = jax.random.split(self.key)
    return self.replace(key=key), sub

  def count_call(self, model_index: int) -> "LoopState":
    calls = self.stats.model_calls.at[model_index].add(1)
    return self.replace(stats=self.stats.replace(model_calls=calls))


def prefill(models: tuple[Model, ...], req: Request, cfg: Config, extra=None) -> LoopState:
  """Feeds every prompt but its last token to every model; an empty output."""
  return prefill_hidden(models, req, cfg, extra)[0]


def feature_taps(models: tuple[Model, ...]) -> tuple[int, ...]:
  """The target layers a feature-input draft among `models` also reads (`ModelConfig.feature_taps`;
  () for none): the target's passes return them after its final-normed states."""
  return next((m.config.feature_taps for m in models if m.config.feature_input), ())


def prefill_hidden(models: tuple[Model, ...], req: Request, cfg: Config, extra=None
                   ) -> tuple[LoopState, Float[Array, "B T F"]]:
  """`prefill`, also returning the last model's (sd: the target's) final-normed hidden states
  `[B, T, D]` over the prompts (`[B, T, (1 + taps) D]` with a draft's `feature_taps`). A
  feature-input draft (`ModelConfig.feature_input`) is fed after the others, reading those states
  shifted by one position (the feature before each token)."""
  b, t = req.prompts.shape
  s = cfg.cache_len
  lengths = req.prompt_lengths.astype(jnp.int32)
  caches = [None] * len(models)
  hidden = None
  taps = feature_taps(models)
  for k in sorted(range(len(models)), key=lambda k: models[k].config.feature_input):
    m = models[k]
    features = None
    if m.config.feature_input:
      features = jnp.pad(hidden, ((0, 0), (1, 0), (0, 0)))[:, :t]
    cache = m.init_cache(b, s, ring_slack=ring_slack(cfg.lookahead))
    _, x, cache = forward_hidden(m, cache, req.prompts, jnp.zeros((b,), jnp.int32), lengths,
                                 features, () if m.config.feature_input else taps)
    hidden = x if k == len(models) - 1 else hidden
    caches[k] = cache.rollback(lengths - 1)
  seq = jnp.zeros((b, s), jnp.int32).at[:, :min(t, s)].set(req.prompts[:, :s].astype(jnp.int32))
  state = LoopState(
      tokens=jnp.zeros((b, cfg.max_new_tokens), jnp.int32),
      length=jnp.zeros((b,), jnp.int32),
      finish=jnp.full((b,), RUNNING, jnp.int32),
      seq=seq, caches=tuple(caches), key=req.key,
      stats=DecodeStats.zeros(len(models), b), extra=extra)
  return state, hidden


def feed(state: LoopState, models: tuple[Model, ...], k: int, width: int, count: Int[Array, "B"]
         ) -> tuple[LoopState, Float[Array, "B W V"], Int[Array, "B"]]:
  """Model k feeds `seq` positions `pos .. pos + width - 1` (pos = its cache position) in one pass
  and keeps the first `count[b]` of them (its cache position advances by `count`).

  Returns the state (call counted), logits `[B, W, V]` over the models' shared real vocabulary
  (`vocab.shared_size`: the padding rows of a larger embedding table are cut off) —
  `logits[:, i]` is the distribution for position `pos + i + 1` — and `pos` per row. Finished
  rows run at position 0 and do not move.
  """
  cache = state.caches[k]
  start = cache.pos
  s = state.seq.shape[1]
  pos = start[:, None] + jnp.arange(width)[None, :]
  tokens = jnp.take_along_axis(state.seq, jnp.clip(pos, 0, s - 1), axis=1)
  run_at = jnp.where(state.active, start, 0)
  logits, cache = forward(models[k], cache, tokens, run_at)
  logits = vocab.restrict(logits, vocab.shared_size(models))  # padded table rows never decoded
  cache = cache.rollback(jnp.where(state.active, start + count, start))
  caches = state.caches[:k] + (cache,) + state.caches[k + 1:]
  return state.replace(caches=caches).count_call(k), logits, start


def advance(state: LoopState, k: int, new_pos: Int[Array, "B"]) -> LoopState:
  """Sets model k's fed count for active rows."""
  cache = state.caches[k]
  cache = cache.rollback(jnp.where(state.active, new_pos, cache.pos))
  return state.replace(caches=state.caches[:k] + (cache,) + state.caches[k + 1:])


def emit(state: LoopState, req: Request, cfg: Config, new: Int[Array, "B W"],
         count: Int[Array, "B"]) -> LoopState:
  """Appends `new[b, :count[b]]` to each active row's output (and to `seq` at the committed end).

  Truncates at `max_new_tokens` and after the first stop id (kept in the output), and finishes a
  row with STOP, LENGTH, or CACHE_FULL when `committed + lookahead` no longer fits the cache.
  """
  b, w = new.shape
  act = state.active
  c = state.committed(req)
  cnt = jnp.where(act, jnp.minimum(count, cfg.max_new_tokens - state.length), 0)
  i = jnp.arange(w)[None, :]
  valid = i < cnt[:, None]
  is_stop = valid & jnp.any(new[:, :, None] == req.stop_ids[:, None, :], axis=-1)
  has_stop = jnp.any(is_stop, axis=1)
  cnt = jnp.where(has_stop, jnp.argmax(is_stop, axis=1) + 1, cnt)
  valid = i < cnt[:, None]
  rows = jnp.arange(b)[:, None]
  n_out, n_seq = state.tokens.shape[1], state.seq.shape[1]
  new = new.astype(jnp.int32)
  tokens = state.tokens.at[rows, jnp.where(valid, state.length[:, None] + i, n_out)].set(
      new, mode="drop")
  seq = state.seq.at[rows, jnp.where(valid, c[:, None] + i, n_seq)].set(new, mode="drop")
  length = state.length + cnt
  full = c + cnt + cfg.lookahead > n_seq
  finish = jnp.where(has_stop, STOP, jnp.where(
      length >= cfg.max_new_tokens, LENGTH, jnp.where(full, CACHE_FULL, RUNNING)))
  finish = jnp.where(act, finish, state.finish)
  return state.replace(tokens=tokens, seq=seq, length=length, finish=finish.astype(jnp.int32))


def finalize(state: LoopState) -> DecodeOutput:
  return DecodeOutput(tokens=state.tokens, lengths=state.length, finish_reason=state.finish,
                      stats=state.stats)


@dataclasses.dataclass(frozen=True)
class Method:
  """A decoding method for the registry in `jax_specens.decoding`.

  init(models, req, cfg) -> LoopState and step(models, req, cfg, state) -> LoopState, where
  `models` is in method order: `(draft, *models)` when `uses_draft`. `step` must emit at least one
  token per active row (the loop runs at most max_new_tokens steps).
  lookahead(cfg) -> int: cache slots the method writes past the committed length.
  num_models: (min, max or None) models (the draft included).
  speculative: whether `gamma` applies (cfg.gammas gets one entry per model).
  target: when set, the method's target is this model's distribution alone (`select`; -1 = the last
  model) and the `ensemble` argument of `decode` does not apply.
  prepare(models, options: dict) -> (extra pytree, static options dataclass): validates the
  method-specific keyword options of `decode` (ValueError) before tracing; None accepts none.
  gammas(gamma, num_models) -> tuple: the per-model speculation lengths from `decode`'s `gamma`.
  """

  init: Callable[..., LoopState]
  step: Callable[..., LoopState]
  uses_draft: bool = False
  num_models: tuple[int, int | None] = (1, None)
  speculative: bool = False
  target: int | None = None
  lookahead: Callable[[Config], int] = lambda cfg: 0
  prepare: Callable | None = None
  gammas: Callable[[Any, int], tuple[int, ...]] = None

  def __post_init__(self):
    if self.gammas is None:
      object.__setattr__(self, "gammas", gammas_per_model)


def gammas_per_model(gamma, num_models: int) -> tuple[int, ...]:
  """An int applies to every model; a sequence gives one value per model (ValueError else)."""
  if isinstance(gamma, (int,)) and not isinstance(gamma, bool):
    gammas = (gamma,) * num_models
  else:
    try:
      gammas = tuple(gamma)
    except TypeError:
      raise ValueError(f"gamma must be an int or a sequence of ints, got {gamma!r}") from None
    if len(gammas) != num_models:
      raise ValueError(f"gamma has {len(gammas)} entries for {num_models} models; give one "
                       "speculation length per model, or a single int for all")
  for g in gammas:
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
      raise ValueError(f"gamma must be >= 1 tokens per model, got {gamma!r}; use e.g. gamma=4")
  return gammas


def run(method: Method, models: tuple[Model, ...], req: Request, cfg: Config) -> LoopState:
  """The whole generation as one `lax.while_loop` (traceable); the final loop state.

  With a mesh set (`jax.set_mesh`, as `jax_specens.parallel.decode` does) the state is pinned to
  the partition rules after `init` and after every step (`parallel.place.pin_state`).
  """
  from jax_specens.parallel.place import pin_state

  def cond(s: LoopState):
    return jnp.any(s.active) & (s.stats.steps < cfg.max_new_tokens)

  def body(s: LoopState):
    s = method.step(models, req, cfg, s)
    return pin_state(s.replace(stats=s.stats.replace(steps=s.stats.steps + 1)), models)

  state = pin_state(method.init(models, req, cfg), models)
  return jax.lax.while_loop(cond, body, state)


def generate(method: Method, models: tuple[Model, ...], req: Request, cfg: Config
             ) -> DecodeOutput:
  """The whole generation as one `lax.while_loop` (traceable; `decode` jits it)."""
  return finalize(run(method, models, req, cfg))
