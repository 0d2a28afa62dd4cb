"""Test session setup: 8 simulated CPU devices (sharding tests), float32 everywhere.

Shared fixtures live in `tests/fixtures_*.py` modules listed in `pytest_plugins` below; they build
models once per session.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# main() of the CLI, called in-process by the tests, would otherwise turn on the persistent XLA
# compilation cache for the whole session (tests/test_cli_plumbing.py runs it in subprocesses)
os.environ.setdefault("JAX_SPECENS_NO_COMPILE_CACHE", "1")
# and nothing else may turn it on in this process either (subprocesses have their own config)
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_fusion",
    "tests.fixtures_real",
]
