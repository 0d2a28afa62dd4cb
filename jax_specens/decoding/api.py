"""`decode()`: one jitted generation loop for every method, and `decode_stream()` (step by step).

    out = decode([expert, amateur], prompts, lengths, method="se", ensemble="wprob",
                 max_new_tokens=64, gamma=3, temperature=0.7, key=jax.random.key(0))
    out.tokens, out.lengths, out.finish_reasons(), out.stats.acceptance_rate

Everything that can be wrong with the arguments raises a ValueError naming the problem and the fix
*before* anything is traced. What is static (one compiled program per value): the method, gamma,
max_new_tokens, cache_len, the ensemble kind, the models' structure and the array shapes. What is
traced (new values never recompile): prompts, lengths, sampling parameters, ensemble weights / mu /
plausibility, stop ids and the key. Models are pytrees, so `decode` also works inside a user's
`jax.jit` (validation then only checks what is concrete).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens import sampling, vocab
from jax_specens.cache import check_fits, check_memory, check_positions
from jax_specens.decoding import METHODS
from jax_specens.decoding.loop import Config, LoopState, Method, Request, finalize, generate
from jax_specens.decoding.outputs import RUNNING, DecodeOutput
from jax_specens.ensemble_fns import make_ensemble
from jax_specens.models.model import Model


def decode(models, prompts, prompt_lengths, *, method: str = "ar", max_new_tokens: int,
           draft: Model | None = None, ensemble="wprob", weights=None, mu=0.1,
           plausibility=None, gamma=4, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           stop_ids=None, key=None, cache_len: int | None = None, **options) -> DecodeOutput:
  """Generates up to `max_new_tokens` tokens per row.

  Args:
    models: a Model or a sequence of Models sharing one vocabulary. ar: one model; sd: the target
      (with `draft=`); ensemble / se: the ensemble members (contrastive: expert first).
    prompts: `[B, T]` int32, right-padded. prompt_lengths: `[B]`, each in [1, T].
    method: "ar" | "sd" | "ensemble" | "se" (and any registered in `jax_specens.decoding.METHODS`).
    max_new_tokens: static.
    draft: the draft model of "sd".
    ensemble: "wprob" | "wlogit" | "contrastive" | fn(logits[N,B,...,V], SamplingParams) -> log r.
    weights: `[N]` ensemble weights (>= 0, sum 1; default uniform). mu, plausibility: contrastive.
    gamma: speculation length, an int or one per model (se); sd: the draft's. "auto" (sd, and se
      of two models): chosen from a short calibration on these prompts (`jax_specens.autogamma`),
      cached per models and shape; `out.gamma_choice` says what was chosen and why.
    temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off): scalars or `[B]`.
    stop_ids: ids that end a row (kept in its output): a sequence, or `[B, S]` padded with -1.
    key: PRNG key for sampling (default `jax.random.key(0)`).
    cache_len: KV slots per row (default: longest prompt + max_new_tokens + the method's slack).
    allow_past_max_positions (in **options): decode past a model's max_position_embeddings
      (refused by default). A request whose KV caches do not fit the device's memory is refused.
    **options: method-specific options (see the method's `prepare`).
  Returns:
    DecodeOutput(tokens `[B, max_new_tokens]`, lengths `[B]`, finish_reason `[B]`, stats).
  """
  kw = dict(method=method, max_new_tokens=max_new_tokens, draft=draft, ensemble=ensemble,
            weights=weights, mu=mu, plausibility=plausibility, gamma=gamma,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, stop_ids=stop_ids,
            key=key, cache_len=cache_len, **options)
  kw["gamma"], choice = _auto_gamma(models, prompts, prompt_lengths, kw)
  ordered, req, cfg, method_obj = prepare(models, prompts, prompt_lengths, **kw)
  traced = any(isinstance(x, jax.core.Tracer)
               for x in jax.tree_util.tree_leaves((ordered, req)))
  t0 = time.perf_counter()
  out = _generate(ordered, req, cfg)
  if traced:
    return out
  out = jax.block_until_ready(out)
  return out.replace(wall_time=time.perf_counter() - t0, gamma_choice=choice)


def _auto_gamma(models, prompts, prompt_lengths, kw: dict):
  """(gamma, GammaChoice or None): gamma="auto" calibrated (`jax_specens.autogamma`), else as is."""
  if not isinstance(kw.get("gamma"), str):
    return kw.get("gamma", 4), None
  from jax_specens import autogamma
  return autogamma.resolve(models, prompts, prompt_lengths, kw)


@functools.partial(jax.jit, static_argnames="cfg")
def _generate(models, req: Request, cfg: Config) -> DecodeOutput:
  return generate(METHODS[cfg.method], models, req, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _init(models, req: Request, cfg: Config) -> LoopState:
  return METHODS[cfg.method].init(models, req, cfg)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="state")
def _step(models, req: Request, cfg: Config, state: LoopState) -> LoopState:
  s = METHODS[cfg.method].step(models, req, cfg, state)
  return s.replace(stats=s.stats.replace(steps=s.stats.steps + 1))


class DecodeStream:
  """Iterates over one decode step by step (one jitted loop step per iteration, state donated).

  Each item is a list with, per row, the tokens newly generated in that step (possibly empty).
  After the iteration ends, `output` holds the DecodeOutput. Same arguments as `decode`.
  """

  def __init__(self, models, prompts, prompt_lengths, **kwargs):
    kwargs["gamma"], self.gamma_choice = _auto_gamma(models, prompts, prompt_lengths, kwargs)
    self._models, self._req, self._cfg, _ = prepare(models, prompts, prompt_lengths, **kwargs)
    self.output: DecodeOutput | None = None

  def __iter__(self) -> Iterator[list[list[int]]]:
    t0 = time.perf_counter()
    state = _init(self._models, self._req, self._cfg)
    seen = np.zeros(state.length.shape, np.int64)
    for _ in range(self._cfg.max_new_tokens):
      state = _step(self._models, self._req, self._cfg, state)
      length, finish = jax.device_get((state.length, state.finish))
      if np.any(length > seen):
        toks = np.asarray(state.tokens)
        yield [toks[b, seen[b]:length[b]].tolist() for b in range(len(seen))]
      seen = length.astype(np.int64)
      if not np.any(finish == RUNNING):
        break
    out = jax.block_until_ready(finalize(state))
    self.output = out.replace(wall_time=time.perf_counter() - t0, gamma_choice=self.gamma_choice)


def decode_stream(models, prompts, prompt_lengths, **kwargs) -> DecodeStream:
  """`decode`, streamed: `for new in (s := decode_stream(...)): ...`, then `s.output`."""
  return DecodeStream(models, prompts, prompt_lengths, **kwargs)


def prepare(models, prompts, prompt_lengths, *, method: str = "ar", max_new_tokens: int,
            draft=None, ensemble="wprob", weights=None, mu=0.1, plausibility=None, gamma=4,
            temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, stop_ids=None, key=None,
            cache_len=None, options=None, **more_options
            ) -> tuple[tuple[Model, ...], Request, Config, Method]:
  """Validates every argument of `decode` (ValueError) and builds (models, Request, Config)."""
  options = dict(options or {}, **more_options)
  allow_long = options.pop("allow_past_max_positions", False)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  m = METHODS[method]
  models = (models,) if isinstance(models, Model) else tuple(models)
  for x in models + ((draft,) if draft is not None else ()):
    if not isinstance(x, Model):
      raise ValueError(f"expected jax_specens Model objects (create_model / load_model), got "
                       f"{type(x).__name__}")
  if m.uses_draft and draft is None:
    raise ValueError(f"method {method!r} needs a draft model: pass draft=... (the --draft DIR "
                     "option on the command line)")
  if not m.uses_draft and draft is not None:
    raise ValueError(f"method {method!r} takes no draft model; use method='sd' for draft + "
                     "target, or pass the models to ensemble as `models`")
  ordered = ((draft,) if m.uses_draft else ()) + models
  readers = [i for i, x in enumerate(ordered) if x.config.feature_input]
  if readers and not (method == "sd" and readers == [0]):
    raise ValueError(
        "a draft that reads its target's hidden states (feature_input, e.g. `train-draft "
        "--features`) can only be the draft of method='sd' (draft=...); for ar / ensemble / se "
        "use an ordinary model (train-draft without --features)")
  taps = ordered[0].config.feature_taps if readers else ()
  if taps and max(taps) >= ordered[-1].config.num_layers:
    raise ValueError(f"the draft reads its target's layers {list(taps)} (feature_taps) but the "
                     f"target has {ordered[-1].config.num_layers}: give the target it was "
                     "distilled from")
  lo, hi = m.num_models
  if len(models) + (1 if m.uses_draft else 0) < lo or (
      hi is not None and len(ordered) > hi):
    what = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo}-{hi}")
    raise ValueError(f"method {method!r} needs {what} models (draft included), got "
                     f"{len(ordered)}; e.g. se / ensemble take the ensemble members, ar one model")
  vocabs = [vocab.check_shared(ordered)]  # one tokenizer (tables may be padded differently)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
      max_new_tokens < 1):
    raise ValueError(f"max_new_tokens must be a positive int (it is static), got "
                     f"{max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)

  prompts_shape = np.shape(prompts)
  if len(prompts_shape) != 2 or prompts_shape[1] < 1:
    raise ValueError(f"prompts must be a [batch, length] int array (right-padded), got shape "
                     f"{prompts_shape}; wrap a single prompt as [[ids...]]")
  if not jnp.issubdtype(jnp.asarray(prompts).dtype if not isinstance(prompts, jax.core.Tracer)
                        else prompts.dtype, jnp.integer):
    raise ValueError("prompts must hold integer token ids")
  b, t = prompts_shape
  if np.shape(prompt_lengths) != (b,):
    raise ValueError(f"prompt_lengths must have shape [{b}] (one length per prompt row), got "
                     f"{np.shape(prompt_lengths)}")
  lens = sampling.concrete(prompt_lengths)
  if lens is not None:
    if np.any(lens < 1):
      rows = np.nonzero(lens < 1)[0].tolist()
      raise ValueError(f"empty prompt in rows {rows}: every row needs at least one token (e.g. "
                       "the BOS token)")
    if np.any(lens > t):
      raise ValueError(f"prompt_lengths {lens.tolist()} exceed the padded width {t} of prompts")
  ptoks = sampling.concrete(prompts)
  if ptoks is not None and (np.any(ptoks < 0) or np.any(ptoks >= vocabs[0])):
    raise ValueError(f"prompt token ids must be in [0, {vocabs[0]}) (the vocabulary size); "
                     "right-pad with a valid id such as 0")

  if isinstance(gamma, str):
    raise ValueError(f"gamma={gamma!r} is not a length: pass an int, one int per model (se), or "
                     "gamma='auto' to decode() / decode_stream()")
  gammas = m.gammas(gamma, len(ordered)) if m.speculative else ()
  sampling.check_params(temperature, top_k, top_p, min_p)
  sp = sampling.SamplingParams.make(b, temperature, top_k, top_p, min_p)
  if m.target is not None:
    if weights is not None or ensemble not in ("wprob", None):
      raise ValueError(f"method {method!r} decodes from one model's distribution; ensemble= and "
                       "weights= do not apply (use method='ensemble' or 'se')")
    ens = make_ensemble("select", len(ordered), index=m.target % len(ordered))
  else:
    ens = make_ensemble(ensemble, len(ordered), weights, mu, plausibility)
    reduced = [i for i, o in enumerate(ordered[1:], 1) if o.config.vocab_subset]
    if ensemble == "contrastive" and reduced:
      raise ValueError(
          f"contrastive decoding subtracts the amateur's log-probabilities, but model(s) {reduced}"
          " have a reduced vocabulary (vocab_subset: log p = -inf outside it), which would give "
          "+inf scores; use a full-vocabulary amateur, or ensemble='wprob' / 'wlogit'")

  stops = _stop_ids(stop_ids, b)
  if key is None:
    key = jax.random.key(0)
  elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))

  extra, static_opts = (None, None)
  if m.prepare is not None:
    extra, static_opts = m.prepare(ordered, dict(options))
  elif options:
    raise ValueError(f"unknown arguments for method {method!r}: {sorted(options)}")

  cfg = Config(method=method, max_new_tokens=max_new_tokens, cache_len=0, gammas=gammas,
               options=static_opts)
  slack = m.lookahead(cfg)
  longest = int(np.max(lens)) if lens is not None else t
  if cache_len is None:  # from the padded width only: new prompt lengths never recompile
    cache_len = t + max_new_tokens + slack
  else:
    check_fits(longest, max_new_tokens, int(cache_len), slack)
    if cache_len < t:
      raise ValueError(f"cache_len={cache_len} is shorter than the padded prompt width {t}; "
                       f"pass cache_len >= {t} or trim the padding")
  for x in ordered:
    if x.config.positions == "learned" and cache_len > x.config.max_position_embeddings:
      raise ValueError(
          f"a {x.config.family} model has learned positions for {x.config.max_position_embeddings}"
          f" tokens but decoding needs {cache_len} (prompt + max_new_tokens + {slack} slack); "
          "shorten the prompt or max_new_tokens")
  configs = [x.config for x in ordered]
  check_positions(configs, longest, max_new_tokens, allow_long)
  check_memory(configs, [jnp.dtype(x.dtype).itemsize for x in ordered], b, t, max_new_tokens,
               slack, cache_len=int(cache_len), devices=_num_devices(ordered))
  cfg = dataclasses.replace(cfg, cache_len=int(cache_len), lookahead=slack)
  req = Request(prompts=jnp.asarray(prompts, jnp.int32),
                prompt_lengths=jnp.asarray(prompt_lengths, jnp.int32), sampling=sp,
                stop_ids=stops, key=key, ensemble=ens, extra=extra)
  return ordered, req, cfg, m


def _num_devices(models) -> int:
  """Devices the first model's parameters are spread over (1 when traced or unknown)."""
  try:
    return len(jax.tree_util.tree_leaves(models[0].params)[0].sharding.device_set)
  except Exception:  # a tracer inside a user's jit
    return 1


def _stop_ids(stop_ids, b: int):
  if stop_ids is None:
    return jnp.zeros((b, 0), jnp.int32)
  if isinstance(stop_ids, (int, np.integer)):
    stop_ids = [stop_ids]
  arr = jnp.asarray(stop_ids, jnp.int32) if not isinstance(stop_ids, jax.core.Tracer) else stop_ids
  if arr.ndim == 1:
    arr = jnp.broadcast_to(arr[None, :], (b, arr.shape[0]))
  if arr.ndim != 2 or arr.shape[0] != b:
    raise ValueError(f"stop_ids must be a sequence of ids or a [{b}, S] array padded with -1, got "
                     f"shape {arr.shape}")
  return arr.astype(jnp.int32)
