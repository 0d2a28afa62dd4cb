"""Partition rules: which mesh axis splits which dimension of every parameter and cache array.

Every parameter path gets *logical* axis names (`heads`, `kv_heads`, `mlp`, `vocab`, ...), and a
`ShardingPlan` maps those to mesh axes for one model config on one mesh, Megatron style:

    q, k, v kernels [D, H*Dh]    columns (whole heads) on `model`; their biases likewise
    o kernel [H*Dh, D]           rows on `model` (one all-reduce after attention)
    gate, up kernels [D, F]      columns on `model`; down kernel [F, D] rows (one all-reduce)
    embedding [V, D], lm_head    vocab on `model`, or hidden when the vocab does not divide
    norms, o/down biases         replicated (and a feature draft's `fuse` [2D, D], `feature_fc`)
    KV cache [B, S, Hkv, Dh]     batch on `data`, kv heads on `model`
    per-row decode state [B..]   batch on `data`

Query heads must divide the `model` axis and the batch the `data` axis (a clear error names the axis
and the numbers). KV heads that do not divide it (e.g. MQA's single KV head) are replicated over
`model` (K/V projections and the cache), unless `replicate_kv=False` asks for an error; so are an
MLP width or vocab that do not divide it.
"""

from __future__ import annotations

import dataclasses
import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_specens.models.config import ModelConfig
from jax_specens.parallel.mesh import DATA, MODEL, axis_size

# parameter path (slash-joined, layer indices included) -> logical name of each dimension
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"^embed/embedding$", ("vocab", "vocab_hidden")),
    (r"^pos_embed/embedding$", (None, None)),
    (r"^lm_head/kernel$", ("vocab_hidden", "vocab")),
    (r"^fuse/kernel$", (None, None)),  # a feature draft's [2D, D] input projection: small
    (r"^feature_fc/kernel$", (None, None)),  # its [(1 + taps) D, D] map of the target's features
    (r"/attn/q/kernel$", (None, "heads")),
    (r"/attn/q/bias$", ("heads",)),
    (r"/attn/[kv]/kernel$", (None, "kv_heads")),
    (r"/attn/[kv]/bias$", ("kv_heads",)),
    (r"/attn/o/kernel$", ("heads", None)),
    (r"/mlp/(gate|up)/kernel$", (None, "mlp")),
    (r"/mlp/(gate|up)/bias$", ("mlp",)),
    (r"/mlp/down/kernel$", ("mlp", None)),
    (r"(/attn/o|/mlp/down)/bias$", (None,)),
    (r"norm/(scale|bias)$", (None,)),
)


def param_path(path) -> str:
  """`(DictKey('layers'), DictKey(0), ...)` -> `'layers/0/...'` (Variable `.value` keys dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
      parts.append(k.name)
  return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axes of parameter `path`; a scanned layer's (`stack/...`, `models/layout.py`)
  has the per-layer axes after an unsplit leading axis of its layers."""
  if path.startswith("stack/"):
    return (None,) + logical_axes(path[len("stack"):], ndim - 1)
  for pattern, axes in PARAM_RULES:
    if re.search(pattern, path):
      if len(axes) != ndim:
        raise ValueError(f"partition rule {pattern!r} names {len(axes)} dims but parameter "
                         f"{path!r} has {ndim}")
      return axes
  raise ValueError(f"no partition rule for parameter {path!r}: add one to "
                   "jax_specens.parallel.rules.PARAM_RULES")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """Logical axis -> mesh axis (or None: replicated) for one model config on one mesh.

  notes: human-readable reasons for every dimension left replicated on a `model` axis > 1.
  """

  mesh: Mesh
  rules: dict[str, str | None]
  notes: tuple[str, ...] = ()

  def spec(self, logical: tuple[str | None, ...]) -> P:
    return P(*(self.rules.get(a) if a else None for a in logical))

  def sharding(self, logical: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(config: ModelConfig, mesh: Mesh, *, tensor_parallel: bool = True,
              replicate_kv: bool = True, name: str = "model") -> ShardingPlan:
  """Checks that `mesh` fits `config` and resolves the logical axes.

  tensor_parallel=False keeps the whole model on every device of a `model` group (only the batch is
  split): cheaper for a small draft model next to a large sharded target.
  Raises ValueError, before anything is traced, when the `model` axis does not divide the query
  heads (or the KV heads with `replicate_kv=False`).
  """
  m = axis_size(mesh, MODEL)
  who = f"{name} ({config.family})"
  if not tensor_parallel:
    return ShardingPlan(mesh, {}, ())
  h, k, f, v, d = (config.num_heads, config.num_kv_heads, config.intermediate_size,
                   config.vocab_size, config.hidden_size)
  if h % m:
    raise ValueError(
        f"mesh axis {MODEL!r} has size {m}, which does not divide num_heads={h} of {who}: use a "
        f"{MODEL} size among {_divisors(h)}, or tensor_parallel=False to keep this model whole "
        "on every device of the axis")
  notes = []
  rules = {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL, "vocab_hidden": None}
  if k % m:
    if not replicate_kv:
      raise ValueError(
          f"mesh axis {MODEL!r} has size {m}, which does not divide num_kv_heads={k} of {who}: "
          f"use a {MODEL} size among {_divisors(k)}, or replicate_kv=True to keep the K/V "
          "projections and the KV cache whole on every device of the axis")
    rules["kv_heads"] = None
    notes.append(f"{who}: num_kv_heads={k} does not divide {MODEL}={m}: K/V projections and "
                 "the KV cache are replicated over it")
  if f % m:
    rules["mlp"] = None
    notes.append(f"{who}: intermediate_size={f} does not divide {MODEL}={m}: MLP replicated")
  if v % m:
    rules["vocab"] = None
    if d % m == 0:
      rules["vocab_hidden"] = MODEL
      notes.append(f"{who}: vocab_size={v} does not divide {MODEL}={m}: embeddings split on "
                   "the hidden dimension instead")
    else:
      notes.append(f"{who}: neither vocab_size={v} nor hidden_size={d} divide {MODEL}={m}: "
                   "embeddings replicated")
  return ShardingPlan(mesh, rules, tuple(notes))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError when the `data` axis does not divide the batch."""
  n = axis_size(mesh, DATA)
  if batch_size % n:
    fits = [x for x in _divisors(batch_size) if x <= n]
    raise ValueError(
        f"mesh axis {DATA!r} has size {n}, which does not divide the batch size {batch_size}: "
        f"pad the batch to a multiple of {n} (e.g. {-(-batch_size // n) * n} rows) or use a "
        f"{DATA} size among {fits}")


def param_specs(params, plan: ShardingPlan):
  """The params pytree (an `nnx.State`) with a `PartitionSpec` at every leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: plan.spec(logical_axes(param_path(path), len(x.shape))), params)


def param_shardings(params, plan: ShardingPlan):
  """The params pytree with a `NamedSharding` at every leaf."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(plan.mesh, s), param_specs(params, plan),
                                is_leaf=lambda x: isinstance(x, P))


def cache_spec(plan: ShardingPlan) -> P:
  """Spec of every `[B, S, Hkv, Dh]` cache array: batch on `data`, kv heads as the projections."""
  return P(DATA, None, plan.rules.get("kv_heads"), None)


def batch_spec(ndim: int) -> P:
  """Spec of per-row arrays `[B, ...]` (prompts, lengths, positions, decode state)."""
  return P(DATA, *([None] * (ndim - 1)))
