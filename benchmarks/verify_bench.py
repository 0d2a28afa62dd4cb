"""sd's per-step math outside the model passes, against the vocabulary size.

Every sd step turns the target's `[B, gamma + 1, V]` logits and the draft's gamma `[B, V]` rows
into sampling distributions (`sampling.log_probs`) and runs `acceptance.verify` over them. The
pricing (`jax_specens.pricing`) counts model passes only; this times the rest, jitted, on random
logits, for SmolLM2's and Gemma 3's vocabularies (greedy: the one-hot distributions sd uses at
temperature 0). Writes `results/verify.json`.

    python -m benchmarks.verify_bench [--vocab 49152,262144] [--batches 1,8] [--gamma 1,2,3]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import base_parser, table, time_call, write_results
from jax_specens import acceptance
from jax_specens.sampling import SamplingParams, log_probs


def step_math(b: int, g: int, v: int, temperature: float):
  """A jitted function of (key, target logits `[b, g+1, v]`, draft logits `[b, g, v]`,
  proposals `[b, g]`) doing what an sd step does with them outside the model passes."""
  sp = SamplingParams.make(b, temperature=temperature)

  @jax.jit
  def f(key, target_logits, draft_logits, proposals):
    logr = log_probs(target_logits, sp)
    logq = jnp.stack([log_probs(draft_logits[:, i], sp) for i in range(g)], 1)
    out = acceptance.verify(key, proposals, logq, logr[:, :g], jnp.full((b,), g, jnp.int32))
    return out.num_accepted, out.token

  return f


def main(argv=None) -> None:
  p = base_parser(__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
  p.add_argument("--vocab", type=ints, default=[49152, 262144])
  p.add_argument("--batches", type=ints, default=[1, 8])
  p.add_argument("--gamma", type=ints, default=[1, 2, 3])
  p.add_argument("--temperature", type=float, default=0.0)
  args = p.parse_args(argv)
  if args.small:
    args.vocab, args.batches, args.gamma = [256], [1, 2], [1]
  rows = []
  key = jax.random.key(0)
  for v in args.vocab:
    for b in args.batches:
      for g in args.gamma:
        f = step_math(b, g, v, args.temperature)
        target = jax.random.normal(key, (b, g + 1, v))
        draft = jax.random.normal(key, (b, g, v))
        proposals = jnp.zeros((b, g), jnp.int32)
        seconds = time_call(lambda: f(key, target, draft, proposals), repeats=args.repeats)
        rows.append({"vocab": v, "batch": b, "gamma": g, "ms": 1e3 * seconds})
  print(table(rows, ["vocab", "batch", "gamma", "ms"]))
  path = write_results(args.out, "verify", vars(args) | {"out": str(args.out)}, rows)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
