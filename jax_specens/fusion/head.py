"""The learnable fusion head (docs/algorithms.md §5): a small Flax NNX MLP over per-position features.

Two outputs from one module:
  - kind "verifier": one logit, the probability that CoSD should replace the draft's token;
  - kind "weights":  n logits, softmax-ed into ensemble weights lambda (the "learned" ensemble
    function; its features are the models' argmax features, a function of the prefix only).
Inputs are standardised with the training set's mean and std, stored in the module.

A saved head is a directory: `fusion_head.json` (config, feature names) + `params/` (orbax).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jaxtyping import Array, Bool, Float

from jax_specens.fusion import features as F

HEAD_FILE = "fusion_head.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """kind: "verifier" (keep/replace probability) or "weights" (ensemble weights lambda)."""

  kind: Literal["verifier", "weights"] = "verifier"
  num_models: int = 2
  hidden_size: int = 32
  num_layers: int = 2

  def __post_init__(self):
    if self.kind not in ("verifier", "weights"):
      raise ValueError(f"unknown head kind {self.kind!r}; use 'verifier' or 'weights'")
    if self.num_models < 2 or self.hidden_size < 1 or self.num_layers < 1:
      raise ValueError(f"invalid HeadConfig {self}: need num_models >= 2, hidden_size >= 1, "
                       "num_layers >= 1")

  @property
  def num_features(self) -> int:
    return F.num_features(self.num_models)

  @property
  def num_outputs(self) -> int:
    return 1 if self.kind == "verifier" else self.num_models


class Stat(nnx.Variable):
  """Feature normalisation statistics: saved with the head, never trained."""


class FusionHead(nnx.Module):
  """features `[*P, F]` -> logits `[*P, 1]` (verifier) or `[*P, n]` (weights)."""

  def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs):
    self.config = config
    f = config.num_features
    self.mean = Stat(jnp.zeros((f,), jnp.float32))
    self.std = Stat(jnp.ones((f,), jnp.float32))
    sizes = [f] + [config.hidden_size] * config.num_layers
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], config.num_outputs, rngs=rngs)

  def __call__(self, features: Float[Array, "*P F"]) -> Float[Array, "*P O"]:
    x = (features - self.mean[...]) / self.std[...]
    for layer in self.hidden:
      x = jax.nn.gelu(layer(x))
    return self.out(x)


@flax.struct.dataclass
class FusionHeadFn:
  """A `FusionHead` split into static graph and a state pytree, usable inside any jitted loop."""

  config: HeadConfig = flax.struct.field(pytree_node=False)
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  state: nnx.State
  cutoff: float = flax.struct.field(pytree_node=False, default=0.5)

  @classmethod
  def from_module(cls, head: FusionHead, cutoff: float = 0.5) -> "FusionHeadFn":
    graphdef, state = nnx.split(head)
    return cls(config=head.config, graphdef=graphdef, state=state, cutoff=cutoff)

  def logits(self, features: Float[Array, "*P F"]) -> Float[Array, "*P O"]:
    F.check_features(features, self.config.num_models)
    return nnx.merge(self.graphdef, self.state)(features.astype(jnp.float32))

  # verifier interface ---------------------------------------------------------------------------
  def scores(self, features: Float[Array, "*P F"]) -> Float[Array, "*P"]:
    """Probability of "replace" (kind "verifier")."""
    self._need("verifier")
    return jax.nn.sigmoid(self.logits(features)[..., 0])

  def __call__(self, features: Float[Array, "*P F"]) -> Bool[Array, "*P"]:
    return self.scores(features) > self.cutoff

  # ensemble-weights interface -------------------------------------------------------------------
  def weights(self, features: Float[Array, "*P F"]) -> Float[Array, "*P n"]:
    """Ensemble weights lambda, non-negative and summing to 1 (kind "weights")."""
    self._need("weights")
    return jax.nn.softmax(self.logits(features), axis=-1)

  def _need(self, kind: str) -> None:
    if self.config.kind != kind:
      raise ValueError(f"this fusion head was trained as kind {self.config.kind!r}, not {kind!r}; "
                       f"train one with `jax-specens train-fusion --head {kind}`")


def init_head(config: HeadConfig, seed: int = 0, mean=None, std=None) -> FusionHeadFn:
  """A freshly initialised head; `mean`/`std` `[F]` set the input standardisation."""
  head = FusionHead(config, rngs=nnx.Rngs(seed))
  if mean is not None:
    head.mean[...] = jnp.asarray(mean, jnp.float32)
  if std is not None:
    head.std[...] = jnp.maximum(jnp.asarray(std, jnp.float32), 1e-6)
  return FusionHeadFn.from_module(head)


def save_head(head: FusionHeadFn, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
  """Writes `out_dir/fusion_head.json` and `out_dir/params/` into an existing directory."""
  out = Path(out_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  meta = {"format": "jax_specens.fusion_head", "version": 1,
          "config": dataclasses.asdict(head.config), "cutoff": head.cutoff,
          "feature_names": list(F.feature_names(head.config.num_models)), **(extra or {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / PARAMS_DIR, nnx.to_pure_dict(head.state))
  (out / HEAD_FILE).write_text(json.dumps(meta, indent=2))
  return out


def load_head(path: str | os.PathLike) -> FusionHeadFn:
  """Restores a head saved by `save_head` (or a `train-fusion --out DIR`, which holds DIR/head)."""
  path = Path(path)
  if not (path / HEAD_FILE).is_file() and (path / "head" / HEAD_FILE).is_file():
    path = path / "head"
  if not (path / HEAD_FILE).is_file() or not (path / PARAMS_DIR).exists():
    raise FileNotFoundError(
        f"no fusion head checkpoint at {path} (expected {HEAD_FILE} and {PARAMS_DIR}/); train one "
        "with `jax-specens train-fusion --draft DIR --model DIR --data FILE --out OUT` and pass OUT")
  meta = json.loads((path / HEAD_FILE).read_text())
  if meta.get("format") != "jax_specens.fusion_head":
    raise ValueError(f"{path / HEAD_FILE} is not a jax_specens fusion head")
  config = HeadConfig(**meta["config"])
  abstract = nnx.eval_shape(lambda: FusionHead(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore((path / PARAMS_DIR).absolute(), _str_keys(target))
  nnx.replace_by_pure_dict(state, _like(restored, nnx.to_pure_dict(state)))
  return FusionHeadFn(config=config, graphdef=graphdef, state=state,
                      cutoff=float(meta.get("cutoff", 0.5)))


def _str_keys(tree):
  return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _like(tree, like):
  if isinstance(like, dict):
    return {k: _like(tree[str(k)], v) for k, v in like.items()}
  return tree
