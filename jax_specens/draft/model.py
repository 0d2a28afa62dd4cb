"""The draft's shape: a few of the target's layers and a head over K of its token ids.

A draft is an ordinary `ModelConfig` of the target's family with `num_layers` layers and
`vocab_subset` = the K target ids it may propose (`tie_embeddings=False`: its head is its own
`[D, K]` matrix). It is initialised from the target: the embedding (kept frozen, so it can be
shared with the target at load time), the chosen layers, the final norm, and the head's K rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_specens.checkpoint import abstract_model
from jax_specens.models.config import ModelConfig
from jax_specens.models.layout import unrolled
from jax_specens.models.model import Model

# parameter groups shared with the target unchanged (not trained, not needed in a slim copy)
SHARED = ("embed", "pos_embed")


def target_layers(layers: Sequence[int], target: ModelConfig,
                  flag: str = "--layers") -> list[int]:
  """`layers` as ints, checked to be a non-empty list of `target`'s layer indices; the error names
  the command-line `flag` that gave them."""
  layers = [int(i) for i in layers]
  bad = [i for i in layers if not 0 <= i < target.num_layers]
  if not layers or bad:
    raise ValueError(f"{flag} {bad or layers} not in [0, {target.num_layers}) (the target's "
                     f"layers): give a non-empty list of target layer indices (e.g. {flag} 0,1)")
  return layers


def draft_config(target: ModelConfig, layers: Sequence[int], vocab_subset: Sequence[int],
                 features: bool = False, taps: Sequence[int] = ()) -> ModelConfig:
  """The target's config with only `layers` (target layer indices) and a K-id head; features:
  a draft that also reads the target's hidden states (`ModelConfig.feature_input`), and with
  `taps` its layers' outputs too (`ModelConfig.feature_taps`)."""
  layers = target_layers(layers, target)
  taps = tuple(target_layers(taps, target, "--feature-taps")) if taps else ()
  if target.vocab_subset:
    raise ValueError("the target already has a reduced vocabulary; distil from a full model")
  types = tuple(target.layer_type(i) for i in layers) if target.layer_types else ()
  return dataclasses.replace(target, num_layers=len(layers), layer_types=types,
                             vocab_subset=tuple(int(i) for i in vocab_subset),
                             tie_embeddings=False, feature_input=features, feature_taps=taps)


def unrolled_params(model: Model) -> dict:
  """`model`'s parameters as a pure dict, per layer, kernels `[d_in, d_out]` (the layout a draft
  is built in, whatever the layout `model` was loaded in: scanned, or rows for the CPU kernel)."""
  return nnx.to_pure_dict(unrolled(model).params)


def target_head_rows(target: Model, ids: np.ndarray) -> jax.Array:
  """`[D, K]`: the target's LM head columns of `ids` (its tied embedding rows, or lm_head)."""
  pure = unrolled_params(target)
  ids = jnp.asarray(ids, jnp.int32)
  if target.config.tie_embeddings:
    return jnp.take(pure["embed"]["embedding"], ids, axis=0).T
  return jnp.take(pure["lm_head"]["kernel"], ids, axis=1)


def init_from_target(target: Model, layers: Sequence[int], vocab_subset: Sequence[int],
                     features: bool = False, taps: Sequence[int] = ()) -> Model:
  """A draft whose every weight is copied from `target` (see the module docstring). features: a
  feature-input draft, whose `fuse` `[2D, D]` starts as the sum of the token's embedding and
  the feature before it; taps: its `feature_fc` starts by reading the final feature alone
  (`tapped`)."""
  config = draft_config(target.config, layers, vocab_subset, features, taps)
  pure = unrolled_params(target)
  new = {k: pure[k] for k in SHARED if k in pure}
  new["final_norm"] = pure["final_norm"]
  new["layers"] = {j: pure["layers"][i] for j, i in enumerate(layers)}
  new["lm_head"] = {"kernel": target_head_rows(target, np.asarray(config.vocab_subset))}
  if features:
    d = config.hidden_size
    new["fuse"] = {"kernel": jnp.concatenate([jnp.eye(d), jnp.eye(d)]).astype(target.dtype)}
  if config.feature_taps:
    new["feature_fc"] = {"kernel": _first_of(config).astype(target.dtype)}
  return _built(config, target.dtype, new)


def _first_of(config: ModelConfig) -> jax.Array:
  """`[(1 + taps) D, D]`: the `feature_fc` that passes the final feature and ignores the taps."""
  d = config.hidden_size
  return jnp.concatenate([jnp.eye(d)] + [jnp.zeros((d, d))] * len(config.feature_taps))


def tapped(draft: Model, target: Model, taps: Sequence[int]) -> Model:
  """`draft` (a feature draft of `target` without taps) also reading the target's layers `taps`
  (EAGLE-3's low / middle / high features): its `feature_fc` starts at `[I; 0; ...]`, so its
  logits equal `draft`'s and training continues from where `draft` ended."""
  c = draft.config
  if not c.feature_input or c.feature_taps:
    raise ValueError("--feature-taps extend a feature draft without taps (this draft: "
                     f"features {c.feature_input}, taps {list(c.feature_taps)})")
  config = dataclasses.replace(c, feature_taps=tuple(target_layers(taps, target.config,
                                                                   "--feature-taps")))
  pure = unrolled_params(draft)
  pure["feature_fc"] = {"kernel": _first_of(config).astype(draft.dtype)}
  return _built(config, draft.dtype, pure)


def _built(config: ModelConfig, dtype, pure: dict) -> Model:
  """The model of `config` whose parameters are the pure dict `pure` (arrays or numpy)."""
  abstract = abstract_model(config, dtype)
  params = abstract.params
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map(jnp.asarray, pure))
  return Model(config=config, graphdef=abstract.graphdef, params=params)


def grown(draft: Model, target: Model, layers: Sequence[int]) -> Model:
  """`draft` (a draft of `target`) with the target's `layers` inserted before its own layers, each
  starting as the identity: its attention and MLP output projections are zero, so the grown
  draft's logits equal `draft`'s and training continues from where `draft` ended with more depth
  (e.g. SmolLM2's one-layer feature draft grown by layer 28)."""
  t = target.config
  layers = target_layers(layers, t, "--grow-layers")
  c = draft.config
  types = (tuple(t.layer_type(i) for i in layers) + tuple(c.layer_type(j)
                                                          for j in range(c.num_layers))
           if t.layer_types else ())
  config = dataclasses.replace(c, num_layers=c.num_layers + len(layers), layer_types=types)
  pure = unrolled_params(draft)
  source = unrolled_params(target)["layers"]

  def silent(block: dict) -> dict:  # the block's residual contributions made zero
    out = jax.tree_util.tree_map(jnp.asarray, block)
    for part, proj in (("attn", "o"), ("mlp", "down")):
      out[part][proj] = jax.tree_util.tree_map(jnp.zeros_like, out[part][proj])
    return out

  own = pure.pop("layers")
  pure["layers"] = {j: silent(source[i]) for j, i in enumerate(layers)}
  pure["layers"].update({len(layers) + j: own[j] for j in range(c.num_layers)})
  return _built(config, draft.dtype, pure)


def own_bytes(draft: Model) -> int:
  """Bytes of the draft's own weights: everything but the embedding it shares with its target."""
  pure = nnx.to_pure_dict(draft.params)
  return sum(x.size * x.dtype.itemsize for k, v in pure.items() if k not in SHARED
             for x in jax.tree_util.tree_leaves(v))


def read_bytes_per_token(config: ModelConfig, dtype_bytes: int = 4) -> int:
  """Weight bytes one decoding step reads (embedding: one row): the memory-bound cost model."""
  d, f = config.hidden_size, config.intermediate_size
  attn = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = d * f * (3 if config.gated_mlp else 2)
  fuse = 2 * d * d if config.feature_input else 0
  fuse += config.feature_width * d if config.feature_taps else 0  # feature_fc
  return dtype_bytes * (config.num_layers * (attn + mlp) + d * config.head_size + d + fuse)
