"""Test session setup: 8 simulated CPU devices (sharding tests), float32 everywhere.

Shared fixtures live in `tests/fixtures_*.py` modules listed in `pytest_plugins` below; they build
models once per session.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run: LLVM at -O0 compiles the CPU programs ~30% faster and the
# matrix products are library calls either way (measured: a tiny model's 8 decode programs 53 -> 38
# s, SmolLM2's GGUF check 49 -> 38 s, its padded-vocabulary check 95 -> 72 s). Subprocesses (the
# README and CLI tests) inherit it. The library itself keeps XLA's default.
for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# main() of the CLI, called in-process by the tests, would otherwise point the persistent XLA
# compilation cache at the user's directory (tests/test_cli_plumbing.py runs it in subprocesses);
# the session's own cache is set up in pytest_configure below
os.environ.setdefault("JAX_SPECENS_NO_COMPILE_CACHE", "1")
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # what subprocesses inherit

import gc
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache for the whole test session, shared by both xdist workers:
# modules drop their in-memory programs (below), and a program that an earlier module or the other
# worker compiled is then loaded from disk instead of compiled again. The controller makes the
# directory (pytest_configure) and removes it at the end; the workers find it in this variable
# (set it to `off` to run without the cache).
# Subprocesses (README, CLI) keep their own cache settings: this only configures this process.
XLA_CACHE_ENV = "JAX_SPECENS_TEST_XLA_CACHE"

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_fusion",
    "tests.fixtures_real",
]


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


# Every compiled XLA CPU program keeps a few memory mappings of its own. A whole session compiles
# thousands of programs; past the kernel's vm.max_map_count (65530 by default) mmap fails and the
# LLVM JIT crashes (a segfault inside backend_compile_and_load, seen in CI at test 269). Programs
# are dropped after every module, and after any test that leaves more than 30000 mappings.
def _drop_compiled_programs() -> None:
  import jax
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
  yield
  _drop_compiled_programs()


@pytest.fixture(autouse=True)
def _drop_compiled_programs_when_mappings_pile_up():
  yield
  if _mapped_regions() > 30000:
    _drop_compiled_programs()


def pytest_configure(config):
  _per_test_compile_options()
  if os.environ.get(XLA_CACHE_ENV) == "off":  # to time the suite without it
    return
  if not hasattr(config, "workerinput") and XLA_CACHE_ENV not in os.environ:
    os.environ[XLA_CACHE_ENV] = tempfile.mkdtemp(prefix="jax_specens_test_xla_")
    config._jax_specens_xla_cache = os.environ[XLA_CACHE_ENV]  # ours to remove
  import jax
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", os.environ[XLA_CACHE_ENV])
  # programs that compile in under half a second are cheaper to compile than to look up
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_xla_cache_env() -> dict[str, str]:
  """Environment variables that point a subprocess (a README block, a notebook kernel) at this
  session's XLA compilation cache, so what the tests or an earlier block compiled is loaded there
  too; {} when the session runs without it."""
  path = os.environ.get(XLA_CACHE_ENV)
  if not path or path == "off":
    return {}
  return {"JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_COMPILATION_CACHE_DIR": path,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


# XLA's older (non-MLIR) loop emitters compile the tiny models' programs 35-45% faster (one
# tiny decode program at -O0, 2026-12-02: ar 2.2 -> 1.0 s, sd 7.0 -> 4.4 s, se of 3 models 13.1 ->
# 7.5 s) but real models' programs slower (the tests marked `real`, summed: 803 -> 932 s; CoSD on
# the scanned real pair 111 -> 170 s). So tests not marked `real` compile with them (a per-program
# compile option, below), and so do the subprocesses that build nothing but tiny models (README
# blocks and notebooks not marked real: XLA_FLAGS).
TINY_MODELS_XLA_OPTION = "xla_cpu_use_fusion_emitters"
TINY_MODELS_XLA_FLAG = f"--{TINY_MODELS_XLA_OPTION}=false"
_compile_options: dict = {}  # XLA options of the programs the running test compiles


def tiny_models_xla_env() -> dict[str, str]:
  """XLA_FLAGS for a subprocess that compiles tiny models only (see TINY_MODELS_XLA_FLAG)."""
  return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {TINY_MODELS_XLA_FLAG}".strip()}


def _per_test_compile_options() -> None:
  """Wraps jax's `get_compile_options` (private: when it moves, tests only compile slower) so
  that every program takes the running test's `_compile_options`."""
  try:
    from jax._src import compiler
  except ImportError:
    return
  original = compiler.get_compile_options
  if getattr(original, "_per_test", False):
    return

  def get_compile_options(*args, env_options_overrides=None, **kwargs):
    if _compile_options:
      env_options_overrides = {**_compile_options, **(env_options_overrides or {})}
    return original(*args, env_options_overrides=env_options_overrides, **kwargs)

  get_compile_options._per_test = True
  compiler.get_compile_options = get_compile_options


def pytest_runtest_setup(item):  # before the test's fixtures are built
  _compile_options.clear()
  if item.get_closest_marker("real") is None:
    _compile_options[TINY_MODELS_XLA_OPTION] = False


def pytest_unconfigure(config):
  made = getattr(config, "_jax_specens_xla_cache", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


def pytest_collection_modifyitems(items):
  """Under `pytest -n 2 --dist loadscope` (pytest-xdist; the README's test command) a module's
  tests stay in one worker, so module fixtures are built once (the real checkpoints are
  converted once for all workers: tests/fixtures_real.py). Not `--dist loadgroup` with
  `xdist_group` marks: pytest 9 derives `nodeid` from a field that xdist 3.8 does not rename, so
  every test was its own group and module fixtures were built in both workers (measured: the
  75 s draft distillation of tests/test_train_draft.py twice)."""
  # the longest modules first, so that no long module is left to start last in one worker
  # while the other worker idles (minutes each on a 2-core machine; the rest keeps its order)
  first = {m: i for i, m in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: first.get(item.module.__name__.rpartition(".")[2], len(first)))


# by their time in a CI-like run (`--durations=0`, summed per module), longest first
LONGEST_MODULES = ("test_readme", "test_notebooks", "test_cosd_cross_real", "test_pairing",
                   "test_train_draft", "test_gguf_real", "test_lossless_more",
                   "test_parallel_decode", "test_pricing", "test_cli_generate",
                   "test_cross_harvest", "test_autogamma", "test_decode_greedy",
                   "test_shape_contract", "test_models_parity", "test_text_api", "test_cli_plumbing")
