"""`jax-specens` entry point: dispatches to one module per subcommand.

Each module in SUBCOMMANDS defines `add_parser(subparsers)` (registers its parser and help) and
`run(args) -> int`. Modules are imported lazily, so `jax-specens --help` stays fast.

For every command: the persistent XLA compilation cache is on (`jax_specens/user_cache.py`;
`--no-compile-cache` or JAX_SPECENS_NO_COMPILE_CACHE=1 turns it off), and transformers' advisory
notice "PyTorch was not found..." is silenced (torch is only needed by the tests).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jax_specens import user_cache

# subcommand name -> module under jax_specens.cli
SUBCOMMANDS = {
    "bench": "bench",
    "convert": "convert",
    "demo": "demo",
    "eval-fusion": "eval_fusion",
    "generate": "generate",
    "train-builtin": "train_builtin",
    "train-draft": "train_draft",
    "train-fusion": "train_fusion",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jax-specens",
      description="Several LLMs decoding together in JAX: Speculative Ensemble, Collaborative "
      "Speculative Decoding (CoSD) and speculative decoding.",
  )
  parser.add_argument("--version", action="version", version=f"jax_specens {_version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, module in SUBCOMMANDS.items():
    importlib.import_module(f"jax_specens.cli.{module}").add_parser(sub)
  for p in sub.choices.values():
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent XLA compilation cache in "
                   f"{user_cache.user_cache_dir() / 'xla'} (also: "
                   f"{user_cache.NO_CACHE_ENV}=1)")
  return parser


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("jax_specens")
  except metadata.PackageNotFoundError:
    import jax_specens
    return jax_specens.__version__


def main(argv: list[str] | None = None) -> int:
  # before transformers is imported anywhere: its torch notice is advice, not an error
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  if not user_cache.compile_cache_disabled(getattr(args, "no_compile_cache", False)):
    user_cache.enable_compile_cache()
  try:
    return int(args.run(args) or 0)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"jax-specens {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
