"""`jax-specens train-builtin`: retrains the built-in models (see `jax_specens.builtin.train`)."""

from __future__ import annotations

import argparse

from jax_specens.builtin import train


def add_parser(subparsers) -> argparse.ArgumentParser:
  doc = train.__doc__
  p = subparsers.add_parser(
      "train-builtin",
      help="train the built-in code / prose / draft models on the standard library",
      description=doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_arguments(p)
  p.set_defaults(run=train.run)
  return p


def run(args: argparse.Namespace) -> int:
  return train.run(args)
