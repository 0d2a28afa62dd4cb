"""sd's per-step math outside the model passes, against the vocabulary size.

An sd step turns the draft's gamma `[B, V]` rows into proposals and verifies them against the
target's `[B, gamma + 1, V]` logits. Timed jitted on random logits, for SmolLM2's and Gemma 3's
vocabularies: `ms`, every row through its sampling distribution (`sampling.log_probs`, then
`acceptance.verify`: what every step did before greedy rows took the ids-only path); `now_ms`,
what the loops do now (`pricing.measure_math_costs`: `sampling.draw_with_dist` and
`acceptance.verify_logits`, which at temperature 0 compare argmax ids); `token_ms`, the
baseline's draw of one token (`sampling.draw`). The pricing adds `now_ms` to every priced step
and `token_ms` to every baseline token. Writes `results/verify.json`.

    python -m benchmarks.verify_bench [--vocab 49152,262144] [--batches 1,8] [--gamma 1,2,3]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import base_parser, table, time_call, write_results
from jax_specens import acceptance, pricing
from jax_specens.sampling import SamplingParams, log_probs


def step_math(b: int, g: int, v: int, temperature: float):
  """A jitted function of (key, target logits `[b, g+1, v]`, the draft's g logits `[b, v]` (one
  array a pass, as the chain makes them), proposals `[b, g]`): every row's distribution, then
  `acceptance.verify` (the path every step took before the ids-only one)."""
  sp = SamplingParams.make(b, temperature=temperature)

  @jax.jit
  def f(key, target_logits, draft_logits, proposals):
    logr = log_probs(target_logits, sp)
    logq = jnp.stack([log_probs(d, sp) for d in draft_logits], 1)
    out = acceptance.verify(key, proposals, logq, logr[:, :g], jnp.full((b,), g, jnp.int32))
    return out.num_accepted, out.token

  return f


def main(argv=None) -> None:
  p = base_parser(__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
  p.add_argument("--vocab", type=ints, default=[49152, 262144],
                 help="vocabulary sizes, comma-separated (SmolLM2's and Gemma 3's)")
  p.add_argument("--batches", type=ints, default=[1, 8], help="batch sizes, comma-separated")
  p.add_argument("--gamma", type=ints, default=[1, 2, 3], help="draft lengths, comma-separated")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0: greedy (now_ms then takes the ids-only path); > 0: sampled")
  args = p.parse_args(argv)
  if args.small:
    args.vocab, args.batches, args.gamma = [256], [1, 2], [1]
  rows = []
  key = jax.random.key(0)
  for v in args.vocab:
    for b in args.batches:
      for g in args.gamma:
        target = jax.random.normal(key, (b, g + 1, v))
        draft = [jax.random.normal(jax.random.fold_in(key, i), (b, v)) for i in range(g)]
        proposals = jnp.zeros((b, g), jnp.int32)
        f = step_math(b, g, v, args.temperature)
        full = time_call(lambda: f(key, target, draft, proposals), repeats=args.repeats)
        now = dict(pricing.measure_math_costs(v, b, [g], args.temperature, args.repeats))
        rows.append({"vocab": v, "batch": b, "gamma": g, "ms": 1e3 * full,
                     "now_ms": 1e3 * now[g], "token_ms": 1e3 * now[0]})
  print(table(rows, ["vocab", "batch", "gamma", "ms", "now_ms", "token_ms"]))
  path = write_results(args.out, "verify", vars(args) | {"out": str(args.out)}, rows)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
