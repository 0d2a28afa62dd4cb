"""The install cell that opens every notebook picks the right source in each place it runs:
nothing where jax_specens is importable (CI), `-e ..[notebooks]` in a checkout, an uploaded wheel on
Colab, `JAX_SPECENS_SOURCE` when set, and a clear error otherwise."""

import importlib.util
import subprocess
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def install_cell(path: Path) -> str:
  nb = nbformat.read(path, as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_opens_with_the_same_install_cell():
  cells = {install_cell(p) for p in NOTEBOOKS}
  assert len(NOTEBOOKS) >= 4 and len(cells) == 1
  assert "<owner>" not in cells.pop()


def _run_cell(monkeypatch, cwd: Path, importable=False, env=None) -> list[list[str]] | Exception:
  calls = []
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (real(name, *a) if importable or name != "jax_specens"
                                        else None))
  monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args[5:]) or 0)
  monkeypatch.delenv("JAX_SPECENS_SOURCE", raising=False)
  for k, v in (env or {}).items():
    monkeypatch.setenv(k, v)
  monkeypatch.chdir(cwd)
  try:
    exec(install_cell(NOTEBOOKS[0]), {})
  except RuntimeError as e:
    return e
  return calls


def test_ci_installs_nothing(monkeypatch, tmp_path):
  assert _run_cell(monkeypatch, tmp_path, importable=True) == []


def test_checkout_installs_the_parent_directory_editable(monkeypatch, tmp_path):
  (tmp_path / "pyproject.toml").write_text("[project]\nname = 'jax_specens'\n")
  (tmp_path / "jax_specens").mkdir()
  (tmp_path / "notebooks").mkdir()
  assert _run_cell(monkeypatch, tmp_path / "notebooks") == [["-e", "..[notebooks]"]]


def test_colab_installs_an_uploaded_wheel(monkeypatch, tmp_path):
  (tmp_path / "jax_specens-0.1.0-py3-none-any.whl").write_bytes(b"")
  assert _run_cell(monkeypatch, tmp_path) == [["jax_specens-0.1.0-py3-none-any.whl[notebooks]"]]


def test_source_from_the_environment_wins(monkeypatch, tmp_path):
  (tmp_path / "jax_specens-0.1.0-py3-none-any.whl").write_bytes(b"")
  url = "git+https://example.org/me/jax_specens"
  assert _run_cell(monkeypatch, tmp_path, env={"JAX_SPECENS_SOURCE": url}) == [[url]]


def test_nowhere_to_install_from_is_a_clear_error(monkeypatch, tmp_path):
  err = _run_cell(monkeypatch, tmp_path)
  assert isinstance(err, RuntimeError)
  assert "JAX_SPECENS_SOURCE" in str(err) and "wheel" in str(err)
