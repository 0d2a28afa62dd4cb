"""Tree verifier: a depth-limited decision tree fit with scikit-learn, run as jitted array code.

`fit_tree` trains `sklearn.tree.DecisionTreeClassifier` on harvested (features, keep/replace)
pairs and exports it to flat arrays; `TreeVerifier` walks those arrays with `depth` gathers, so
inference needs neither scikit-learn nor Python control flow. Saved as JSON (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jax_specens.fusion import features as F

TREE_FILE = "tree.json"


@flax.struct.dataclass
class TreeVerifier:
  """A decision tree as arrays over N nodes. Leaves point to themselves (left = right = node), so
  `depth` steps from the root always end on a leaf.

  feature [N] int32, threshold [N] f32 (go left iff x[feature] <= threshold), left/right [N] int32,
  value [N] f32 (probability of "replace" at each node), depth: static.
  """

  feature: Int[Array, "N"]
  threshold: Float[Array, "N"]
  left: Int[Array, "N"]
  right: Int[Array, "N"]
  value: Float[Array, "N"]
  depth: int = flax.struct.field(pytree_node=False, default=1)
  num_models: int = flax.struct.field(pytree_node=False, default=2)
  cutoff: float = flax.struct.field(pytree_node=False, default=0.5)

  def scores(self, features: Float[Array, "*P F"]) -> Float[Array, "*P"]:
    """Probability of "replace" at the leaf each position falls into."""
    F.check_features(features, self.num_models)
    node = jnp.zeros(features.shape[:-1], jnp.int32)
    for _ in range(self.depth):
      x = jnp.take_along_axis(features, self.feature[node][..., None], axis=-1)[..., 0]
      node = jnp.where(x <= self.threshold[node], self.left[node], self.right[node])
    return self.value[node]

  def __call__(self, features: Float[Array, "*P F"]) -> Bool[Array, "*P"]:
    return self.scores(features) > self.cutoff

  # ---- (de)serialisation ----------------------------------------------------------------------
  def to_dict(self) -> dict:
    return {"format": "jax_specens.tree", "version": 1, "depth": self.depth,
            "num_models": self.num_models, "cutoff": self.cutoff,
            "feature_names": list(F.feature_names(self.num_models)),
            **{k: np.asarray(getattr(self, k)).tolist()
               for k in ("feature", "threshold", "left", "right", "value")}}

  def save(self, path: str | os.PathLike) -> Path:
    """Writes the tree as JSON to `path` (a file, or a directory that gets `tree.json`)."""
    path = Path(path)
    if path.is_dir():
      path = path / TREE_FILE
    path.write_text(json.dumps(self.to_dict()))
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TreeVerifier":
    path = Path(path)
    if path.is_dir():
      path = path / TREE_FILE
    if not path.is_file():
      raise FileNotFoundError(f"no decision tree at {path}; train one with `jax-specens "
                              "train-fusion ... --out DIR` and pass DIR or DIR/tree.json")
    d = json.loads(path.read_text())
    if d.get("format") != "jax_specens.tree":
      raise ValueError(f"{path} is not a jax_specens decision tree (written by train-fusion)")
    return cls(feature=jnp.asarray(d["feature"], jnp.int32),
               threshold=jnp.asarray(d["threshold"], jnp.float32),
               left=jnp.asarray(d["left"], jnp.int32), right=jnp.asarray(d["right"], jnp.int32),
               value=jnp.asarray(d["value"], jnp.float32), depth=int(d["depth"]),
               num_models=int(d["num_models"]), cutoff=float(d["cutoff"]))


def fit_tree(
    features: np.ndarray, labels: np.ndarray, *, max_depth: int = 4, min_samples_leaf: int = 20,
    num_models: int = 2, seed: int = 0,
) -> TreeVerifier:
  """Fits a classifier tree on `features [N, F]` and labels `[N]` in {0 keep, 1 replace}."""
  try:
    from sklearn.tree import DecisionTreeClassifier
  except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
    raise ImportError("fitting a tree verifier needs scikit-learn: pip install scikit-learn") from e
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  F.check_features(features, num_models)
  if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
    raise ValueError(f"fit_tree needs as many labels as feature rows (> 0); got "
                     f"{features.shape[0]} rows and {labels.shape[0]} labels")
  clf = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                               random_state=seed).fit(features, labels)
  t = clf.tree_
  n = t.node_count
  leaf = t.children_left < 0
  idx = np.arange(n)
  counts = t.value[:, 0, :]
  classes = list(clf.classes_)
  replace_col = classes.index(1) if 1 in classes else None
  value = (counts[:, replace_col] / counts.sum(-1) if replace_col is not None
           else np.zeros(n))
  return TreeVerifier(
      feature=jnp.asarray(np.where(leaf, 0, t.feature), jnp.int32),
      threshold=jnp.asarray(np.where(leaf, 0.0, t.threshold), jnp.float32),
      left=jnp.asarray(np.where(leaf, idx, t.children_left), jnp.int32),
      right=jnp.asarray(np.where(leaf, idx, t.children_right), jnp.int32),
      value=jnp.asarray(value, jnp.float32), depth=max(int(t.max_depth), 1),
      num_models=num_models)
