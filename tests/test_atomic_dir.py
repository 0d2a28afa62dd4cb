"""`atomic_dir` (every checkpoint write: convert, save_model, train-fusion): a failure at any step
leaves either the old complete output or the new complete output, and no temporary directory.

Each step (writing, fsync of a file, fsync of a directory, the atomic exchange, the fallback's
renames) is made to fail in turn by monkeypatching the os function it calls.
"""

import os

import pytest

from jax_specens import checkpoint
from jax_specens.checkpoint import atomic_dir

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "sub/b.txt": "new b", "sub/c.txt": "new c"}


def write(root, files):
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def contents(root):
  return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(out):
  return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture
def out(tmp_path):
  out = tmp_path / "model"
  out.mkdir()
  write(out, OLD)
  return out


class Boom(OSError):
  pass


def fail_on_call(monkeypatch, name: str, n: int, module=os):
  """Makes the n-th call (1-based) of `module.name` raise Boom; earlier calls go through."""
  real = getattr(module, name)
  calls = {"n": 0}

  def fake(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == n:
      raise Boom(f"injected failure of {name} call {n}")
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, fake)
  return calls


def overwrite(out):
  with atomic_dir(out, overwrite=True) as tmp:
    write(tmp, NEW)


def test_success_replaces_the_old_output_and_leaves_nothing(out):
  overwrite(out)
  assert contents(out) == NEW
  assert leftovers(out) == []


def test_new_output_without_an_old_one(tmp_path):
  with atomic_dir(tmp_path / "fresh") as tmp:
    write(tmp, NEW)
  assert contents(tmp_path / "fresh") == NEW and leftovers(tmp_path / "fresh") == []


def test_existing_output_is_refused_without_overwrite(out):
  with pytest.raises(FileExistsError, match="--overwrite"):
    with atomic_dir(out):
      raise AssertionError("never reached")
  assert contents(out) == OLD


def test_failure_while_writing_keeps_the_old_output(out):
  with pytest.raises(RuntimeError):
    with atomic_dir(out, overwrite=True) as tmp:
      write(tmp, {"a.txt": "half"})
      raise RuntimeError("interrupted")
  assert contents(out) == OLD and leftovers(out) == []


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_failed_fsync_keeps_the_old_output(out, monkeypatch, n):
  """fsync calls 1-3: the new files, 4-5: `sub/` then the new root; any failure: old kept."""
  fail_on_call(monkeypatch, "fsync", n)
  with pytest.raises(Boom):
    overwrite(out)
  assert contents(out) == OLD and leftovers(out) == []


def test_failed_exchange_keeps_the_old_output(out, monkeypatch):
  def exchange(a, b):
    raise Boom("renameat2 failed")
  monkeypatch.setattr(checkpoint, "_exchange", exchange)
  with pytest.raises(Boom):
    overwrite(out)
  assert contents(out) == OLD and leftovers(out) == []


@pytest.mark.parametrize("n", [1, 2])
def test_fallback_renames_failing_keep_the_old_output(out, monkeypatch, n):
  """Without an atomic exchange: old -> trash, then new -> out; when rename n fails the old output
  is (back) in place."""
  monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
  fail_on_call(monkeypatch, "rename", n)
  with pytest.raises(Boom):
    overwrite(out)
  assert contents(out) == OLD and leftovers(out) == []


def test_fallback_succeeds(out, monkeypatch):
  monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
  overwrite(out)
  assert contents(out) == NEW and leftovers(out) == []


def test_failure_after_the_swap_leaves_the_new_output(out, monkeypatch):
  """The parent directory's fsync after the exchange fails: the new output is complete in place."""
  calls = {"n": 0}
  real = os.fsync

  def fsync(fd):
    calls["n"] += 1
    if calls["n"] > 5:  # 3 files + 2 directories of the new output went through
      raise Boom("fsync of the parent")
    return real(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(Boom):
    overwrite(out)
  assert contents(out) == NEW and leftovers(out) == []


def test_every_file_and_directory_is_fsynced_before_the_swap(out, monkeypatch):
  synced, order = [], []
  real_fsync, real_exchange = os.fsync, checkpoint._exchange
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                               real_fsync(fd))[1])
  monkeypatch.setattr(checkpoint, "_exchange",
                      lambda a, b: (order.append(len(synced)), real_exchange(a, b))[1])
  overwrite(out)
  before = [os.path.basename(p) for p in synced[:order[0]]]
  assert sorted(before) == sorted(["a.txt", "b.txt", "c.txt", "sub", before[-1]])
  assert before[-1].startswith(".model.tmp-")  # the new tree's root, last
  assert os.path.basename(synced[-1]) == out.parent.name  # the parent, after the swap
