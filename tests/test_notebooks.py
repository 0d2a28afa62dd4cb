"""Every notebook in notebooks/ executes top to bottom on CPU (a real Jupyter kernel, via nbclient).

The kernel inherits this process's environment (conftest: CPU, 8 simulated devices, offline), and
runs in notebooks/ like Jupyter would. A failing cell fails the test with the cell's traceback.
"""

from pathlib import Path

import nbclient
import nbformat
import pytest

from jax_specens.cli.demo_real import DRAFT_NAME
from tests.conftest import shared_xla_cache_env, tiny_models_xla_env

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
  names = {p.stem for p in NOTEBOOKS}
  assert {"quickstart", "speculative_ensemble", "sharding", "fusion_finetune",
          "real_models"} <= names


REAL = {"real_models"}  # runs SmolLM2-135M-Instruct and Gemma-3-270M (marker `real`)
# marker `slow` (deselected by the test command, to keep CI within its time; `pytest -m slow`
# runs it, ~3 min): each of its calls is run on the same real models by a CI test: the chat
# (tests/test_cli_generate.py), sd / se with a draft of train-draft's shape
# (tests/test_train_draft.py), cross-tokenizer `cosd_text` (tests/test_cosd_cross_real.py)
SLOW = {"real_models"}


def save_draft(target_dir: Path, out: Path) -> None:
  """Where the notebook looks for a distilled SmolLM2 draft, a draft of `train-draft`'s shape
  (the recipe's target layers, a head over the first K ids: BPE's most frequent merges), copied
  from the target untrained: a user who ran `train-draft` gets this branch, and its programs
  compile 30 + 4 layers where SmolLM2 as its own draft compiles 30 + 30."""
  import numpy as np

  from jax_specens import load_model
  from jax_specens.checkpoint import save_model
  from jax_specens.draft.model import init_from_target
  from jax_specens.draft.pipeline import DraftRecipe
  recipe = DraftRecipe()
  draft = init_from_target(load_model(target_dir), recipe.layers, np.arange(recipe.vocab_k))
  save_model(draft, out, tokenizer_dir=target_dir)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=([pytest.mark.real] if p.stem in REAL else [])
                 + ([pytest.mark.slow] if p.stem in SLOW else [])) for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, request, tmp_path, monkeypatch):
  if path.stem in REAL:
    # the models this session converted once (tests/fixtures_real.py), where the notebook's
    # `model_dir` finds a converted model: the kernel inherits this variable
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    for name in ("smollm2", "gemma3"):
      (models / name).symlink_to(request.getfixturevalue(f"real_{name}"), target_is_directory=True)
    save_draft(request.getfixturevalue("real_smollm2"), models / DRAFT_NAME)
    monkeypatch.setenv("JAX_SPECENS_CACHE", str(tmp_path / "cache"))
  tiny = {} if path.stem in REAL else tiny_models_xla_env()
  for name, value in {**shared_xla_cache_env(), **tiny}.items():  # the session's compiled programs
    monkeypatch.setenv(name, value)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError at the first cell that fails
  code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
  assert code and all(c.execution_count is not None for c in code), "a code cell did not run"
  assert any(c.get("outputs") for c in code), "the notebook printed nothing"
