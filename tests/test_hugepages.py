"""Parameters moved into 2 MiB pages (`jax_specens/hugepages.py`) keep their values, and
`load_model` moves a CPU model's parameters there unless told not to.

Whether Linux grants the pages depends on the machine (kernel >= 6.1, THP not `never`, free 2 MiB
pages): the test of the pages themselves skips, naming why, where it refuses.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens import ModelConfig, create_model, hugepages, load_model
from jax_specens.checkpoint import save_model

# an embedding of 4096 x 64 float32 (1 MiB) and MLP kernels of 256 KiB: over hugepages.MIN_BYTES
CONFIG = ModelConfig(family="llama", vocab_size=4096, hidden_size=64, intermediate_size=1024,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_collapse_keeps_every_value():
  x = jax.random.normal(jax.random.key(0), (4 << 20,), jnp.float32)  # 16 MiB
  small = jnp.arange(16, dtype=jnp.float32)
  before = np.asarray(x).copy()
  report = hugepages.collapse({"x": x, "small": small, "not an array": 3})
  chex.assert_trees_all_equal(np.asarray(x), before)
  chex.assert_trees_all_equal(small, jnp.arange(16, dtype=jnp.float32))
  if sys.platform.startswith("linux"):
    assert report.arrays == 1 and report.bytes == x.nbytes  # the small array is not asked for
  else:
    assert report == hugepages.Report()


# run in a fresh process: in a long one, memory freed by earlier tests may still be in huge pages
# when the array reuses it, and a collapse then adds fewer of them
GRANTED = """
import json, jax.numpy as jnp
from jax_specens import hugepages
x = jnp.ones((8 << 20,), jnp.float32)  # 32 MiB: at least 15 whole 2 MiB pages inside
span = (x.unsafe_buffer_pointer(), x.unsafe_buffer_pointer() + x.nbytes)
before = hugepages.huge_page_bytes(span)
report = hugepages.collapse(x)
print(json.dumps({"before": before, "after": hugepages.huge_page_bytes(span),
                  "refused": report.refused, "sum": float(x.sum())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
@pytest.mark.parametrize("refusals", [1, hugepages.ATTEMPTS])
def test_a_refusal_is_asked_again_before_it_counts(monkeypatch, refusals):
  """Linux refuses a collapse now and then that it grants on the next call: `collapse` asks up to
  ATTEMPTS times per range, and counts a buffer refused only when every call was."""
  calls = []

  def madvise(start, length, advice):  # refuses each range `refusals` times, then grants it
    calls.append((start, length, advice))
    return -1 if calls.count((start, length, advice)) <= refusals else 0

  monkeypatch.setattr(hugepages, "_madvise", lambda: madvise)
  x = jnp.zeros((4 << 20,), jnp.float32)  # 16 MiB: whole 2 MiB pages inside
  report = hugepages.collapse(x)
  assert report.arrays == 1 and report.refused == (refusals == hugepages.ATTEMPTS)
  assert {advice for *_, advice in calls} == {hugepages.MADV_COLLAPSE}
  asked = collections.Counter(calls)
  assert set(asked.values()) == {min(refusals + 1, hugepages.ATTEMPTS)}  # per range


def test_collapse_gives_huge_pages_where_linux_grants_them():
  if not sys.platform.startswith("linux"):
    pytest.skip("transparent huge pages are Linux's")
  if _thp_mode() in (None, "always"):
    pytest.skip("THP unreadable here, or every mapping gets huge pages anyway")
  r = subprocess.run([sys.executable, "-c", GRANTED], capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  if got["refused"]:
    pytest.skip("Linux refused MADV_COLLAPSE (kernel < 6.1, or no free 2 MiB pages)")
  assert got["after"] - got["before"] >= 15 * hugepages.PAGE, got
  assert got["sum"] == 8 << 20  # the values are the array's


def _thp_mode() -> str | None:
  """`always`, `madvise` or `never` (the bracketed word of the sysfs setting), None if unreadable."""
  try:
    text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  except OSError:
    return None
  return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def test_enabled_reads_the_environment(monkeypatch):
  monkeypatch.setenv(hugepages.ENV, "0")
  assert not hugepages.enabled()
  monkeypatch.setenv(hugepages.ENV, "1")
  assert hugepages.enabled() == sys.platform.startswith("linux")
  monkeypatch.delenv(hugepages.ENV)
  assert hugepages.enabled() == sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return save_model(create_model(CONFIG, seed=3), tmp_path_factory.mktemp("hp") / "m")


def _spy(monkeypatch) -> list:
  calls, real = [], hugepages.collapse
  monkeypatch.setattr(hugepages, "collapse", lambda tree: calls.append(tree) or real(tree))
  return calls


def test_load_model_collapses_cpu_parameters_by_default(saved, monkeypatch):
  monkeypatch.delenv(hugepages.ENV, raising=False)
  calls = _spy(monkeypatch)
  model = load_model(saved)
  plain = load_model(saved, huge_pages=False)
  assert len(calls) == (1 if sys.platform.startswith("linux") else 0)
  if calls:
    assert calls[0] is model.params
  chex.assert_trees_all_equal(jax.tree_util.tree_leaves(model.params),
                              jax.tree_util.tree_leaves(plain.params))


def test_load_model_leaves_pages_alone_when_told(saved, monkeypatch):
  calls = _spy(monkeypatch)
  monkeypatch.setenv(hugepages.ENV, "0")
  load_model(saved)
  assert calls == []
  monkeypatch.delenv(hugepages.ENV)
  load_model(saved, huge_pages=False)
  assert calls == []
  load_model(saved, huge_pages=True)
  assert len(calls) == 1
