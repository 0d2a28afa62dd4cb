"""`jax-specens` entry point: dispatches to one module per subcommand.

Each module in SUBCOMMANDS defines `add_parser(subparsers)` (registers its parser and help) and
`run(args) -> int`. Modules are imported lazily, so `jax-specens --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under jax_specens.cli
SUBCOMMANDS = {
    "bench": "bench",
    "convert": "convert",
    "demo": "demo",
    "eval-fusion": "eval_fusion",
    "generate": "generate",
    "train-builtin": "train_builtin",
    "train-fusion": "train_fusion",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jax-specens",
      description="Several LLMs decoding together in JAX: Speculative Ensemble, Collaborative "
      "Speculative Decoding (CoSD) and speculative decoding.",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, module in SUBCOMMANDS.items():
    importlib.import_module(f"jax_specens.cli.{module}").add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return int(args.run(args) or 0)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"jax-specens {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
