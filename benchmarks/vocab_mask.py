"""Padded embedding tables: cut the logits to the real vocabulary, or mask the padding with -inf?

Both keep padded ids out of every draw. This times, side by side in one run, what a decoding pass
does with a model's logits `[B, W, V_table]` under each choice: the cut (`vocab.restrict`) or a
-inf mask over ids >= the real size, followed by the work every method does next (log-softmax,
argmax, a gather). Vocabulary pairs of real checkpoints: SmolLM2 49152 padded to a
multiple of 128 more, Qwen2.5 151665 ids in 151936 / 152064 rows, Gemma 3 262144 in 262208.

    python -m benchmarks.vocab_mask [--small] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import DEFAULT_OUT, environment, table, time_call, write_results
from jax_specens.vocab import restrict

CASES = (("smollm2+128", 49152, 49280), ("qwen2.5-0.5b", 151665, 151936),
         ("qwen2.5-7b", 151665, 152064), ("gemma3-4b", 262144, 262208))


def _after(logits, key):
  lp = jax.nn.log_softmax(logits, axis=-1)
  pick = jax.random.randint(key, lp.shape[:-1] + (1,), 0, lp.shape[-1])
  return jnp.argmax(lp, -1), jnp.take_along_axis(lp, pick, -1)


@jax.jit
def _cut(logits, key, size):
  return _after(restrict(logits, size.shape[0]), key)


@jax.jit
def _mask(logits, key, size):
  ids = jnp.arange(logits.shape[-1])
  return _after(jnp.where(ids < size.shape[0], logits, -jnp.inf), key)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--small", action="store_true", help="one small case, batch 1")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--out", default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  cases = CASES[:1] if args.small else CASES
  shapes = ((1, 1),) if args.small else ((1, 1), (4, 5), (8, 1))
  rows = []
  key = jax.random.key(0)
  for name, real, padded in cases:
    for b, w in shapes:
      logits = jax.random.normal(key, (b, w, padded), jnp.float32)
      size = jnp.zeros((real,), jnp.int8)  # the real size as a static shape
      cut = time_call(lambda: _cut(logits, key, size), repeats=args.repeats, warmup=2)
      mask = time_call(lambda: _mask(logits, key, size), repeats=args.repeats, warmup=2)
      rows.append({"vocab": name, "real": real, "table": padded, "B x W": f"{b} x {w}",
                   "cut us": cut * 1e6, "mask us": mask * 1e6, "mask / cut": mask / cut})
  print(table(rows, list(rows[0])))
  write_results(args.out, "vocab_mask", {"repeats": args.repeats, "small": args.small}, rows)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
