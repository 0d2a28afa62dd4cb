"""The user's cache directory, the paths model records name in it, and the persistent XLA
compilation cache of the CLI.

    ~/.cache/jax_specens/          ($XDG_CACHE_HOME/jax_specens, or $JAX_SPECENS_CACHE)
      xla/                         compiled XLA programs (jax's persistent compilation cache)
      models/                      real models the demo converted on its first run
      kernels/                     the opt-in CPU kernel, built once (`jax_specens.kernels`)

A draft records a target in models/ as `$JAX_SPECENS_CACHE/models/NAME` (`portable_path`), so the
record holds on any machine; `recorded_path` reads it back.

Every `jax-specens` command turns the compilation cache on, so a second identical call reuses the
programs the first one compiled instead of compiling them again (the decode loops take 4-30 s
each to compile on a CPU). `--no-compile-cache` or `JAX_SPECENS_NO_COMPILE_CACHE=1` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

NO_CACHE_ENV = "JAX_SPECENS_NO_COMPILE_CACHE"


def user_cache_dir() -> Path:
  """$JAX_SPECENS_CACHE, else $XDG_CACHE_HOME/jax_specens, else ~/.cache/jax_specens."""
  if os.environ.get("JAX_SPECENS_CACHE"):
    return Path(os.environ["JAX_SPECENS_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "jax_specens"


CACHE_TOKEN = "$JAX_SPECENS_CACHE"  # how a recorded path names the user cache (`portable_path`)


def portable_path(path: str | os.PathLike) -> str:
  """`path` as a model directory records another directory (a draft its target): inside the user
  cache (where the demo converts real models) as `$JAX_SPECENS_CACHE/models/NAME`, so the record
  holds on another machine or under another HOME; anywhere else its absolute path."""
  path = Path(path).absolute()
  try:
    return str(Path(CACHE_TOKEN) / path.relative_to(user_cache_dir().absolute()))
  except ValueError:
    return str(path)


def recorded_path(recorded: str) -> Path:
  """The directory a `portable_path` record names here (the user cache of this machine)."""
  if recorded == CACHE_TOKEN or recorded.startswith(CACHE_TOKEN + "/"):
    return user_cache_dir() / recorded[len(CACHE_TOKEN):].lstrip("/")
  return Path(recorded)


def compile_cache_disabled(flag: bool = False) -> bool:
  return flag or os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path:
  """Points jax's persistent compilation cache at `directory` (default: user_cache_dir()/xla).

  Every program is cached, however short its compile time or small its executable (jax's defaults
  skip programs compiled in under 1 s), so a repeated command compiles nothing at all.
  """
  import jax
  path = Path(directory) if directory is not None else user_cache_dir() / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path
