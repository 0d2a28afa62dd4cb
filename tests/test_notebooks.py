"""Every notebook in notebooks/ executes top to bottom on CPU (a real Jupyter kernel, via nbclient).

The kernel inherits this process's environment (conftest: CPU, 8 simulated devices, offline), and
runs in notebooks/ like Jupyter would. A failing cell fails the test with the cell's traceback.
"""

from pathlib import Path

import nbclient
import nbformat
import pytest

from tests.conftest import shared_xla_cache_env

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
  names = {p.stem for p in NOTEBOOKS}
  assert {"quickstart", "speculative_ensemble", "sharding", "fusion_finetune",
          "real_models"} <= names


REAL = {"real_models"}  # runs SmolLM2-135M-Instruct and Gemma-3-270M (marker `real`)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=[pytest.mark.real] if p.stem in REAL else []) for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, request, tmp_path, monkeypatch):
  if path.stem in REAL:
    # the models this session converted once (tests/fixtures_real.py), where the notebook's
    # `model_dir` finds a converted model: the kernel inherits this variable
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    for name in ("smollm2", "gemma3"):
      (models / name).symlink_to(request.getfixturevalue(f"real_{name}"), target_is_directory=True)
    monkeypatch.setenv("JAX_SPECENS_CACHE", str(tmp_path / "cache"))
  for name, value in shared_xla_cache_env().items():  # the session's compiled programs
    monkeypatch.setenv(name, value)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError at the first cell that fails
  code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
  assert code and all(c.execution_count is not None for c in code), "a code cell did not run"
  assert any(c.get("outputs") for c in code), "the notebook printed nothing"
