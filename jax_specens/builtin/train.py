"""Trains the built-in models: a code specialist, a prose specialist and a small general draft.

    python -m jax_specens.builtin.train            # or: jax-specens train-builtin

Reads the two corpora of `jax_specens.builtin.data` (the interpreter's own standard library), trains
one shared byte-level BPE tokenizer, then three small Llama-architecture models with optax, and
saves each with `jax_specens.checkpoint.save_model` (orbax, bf16) into OUT/{code,prose,draft}/ — the
same format as a converted Hugging Face model. Each model is trained in two phases
(`jax_specens.builtin.unlikelihood`): `steps` updates of cross-entropy plus a token-level
unlikelihood term, then `repetition_steps` sequence-level unlikelihood updates on its own greedy
text. Without them, models this small loop under greedy decoding ("the number of the number of").
OUT/training.json records the recipes, the wall time and the held-out loss of every model on both
domains. The shipped models were trained on 2 CPU cores with the defaults, in two commands:
`--repetition-steps 0` (1,200 steps each, 44 minutes), then `--repetition-only` (400 updates each);
`--steps-scale 0.01` makes a smoke run of a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int
from tqdm.auto import tqdm

from jax_specens.builtin import data, evaluate
from jax_specens.builtin import unlikelihood as ul
from jax_specens.builtin import tokenizer as tokenizers_lib
from jax_specens.checkpoint import load_model, save_model
from jax_specens.models.config import ModelConfig
from jax_specens.models.model import Model, create_model
from jax_specens.step import forward

MODELS_DIR = Path(__file__).parent / "models"
EVAL_WINDOWS = 32  # held-out windows per domain scored after training


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one built-in model is built and trained. Rows of a batch alternate over `domains`."""

  domains: tuple[str, ...]
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  steps: int
  batch_size: int = 8
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 60
  weight_decay: float = 0.1
  seed: int = 0
  time_share: float = 1 / 3  # this model's part of a --time-budget
  unlikelihood: float = 0.0  # weight of the token-level unlikelihood term (`loss_fn`)
  # then this many sequence-level unlikelihood updates (`finetune_repetition`)
  repetition_steps: int = 0


  def model_config(self, vocab_size: int, eot: int) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_heads,
        head_dim=self.hidden_size // self.num_heads, max_position_embeddings=self.seq_len,
        norm_eps=1e-5, tie_embeddings=True, bos_token_id=eot, eos_token_ids=(eot,),
        pad_token_id=eot)

  def scaled(self, factor: float) -> "Recipe":
    steps = max(2, round(self.steps * factor))
    repetition = max(1, round(self.repetition_steps * factor)) if self.repetition_steps else 0
    return dataclasses.replace(self, steps=steps, warmup_steps=min(self.warmup_steps, steps // 2),
                               repetition_steps=repetition)


_AGAINST_REPETITION = dict(unlikelihood=1.0, repetition_steps=400)
RECIPES = {
    "code": Recipe(("code",), hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                   steps=1200, time_share=0.4, **_AGAINST_REPETITION),
    "prose": Recipe(("prose",), hidden_size=128, num_layers=4, num_heads=4,
                    intermediate_size=384, steps=1200, time_share=0.4, **_AGAINST_REPETITION),
    "draft": Recipe(("code", "prose"), hidden_size=96, num_layers=2, num_heads=3,
                    intermediate_size=256, steps=1200, time_share=0.2, **_AGAINST_REPETITION),
}
VOCAB_SIZE = 4096


def sample_batch(rng: np.random.Generator, streams: dict[str, np.ndarray], recipe: Recipe
                 ) -> np.ndarray:
  """`[batch, seq_len + 1]` random windows; row i comes from domain `domains[i % len(domains)]`."""
  rows = []
  for i in range(recipe.batch_size):
    stream = streams[recipe.domains[i % len(recipe.domains)]]
    start = rng.integers(0, len(stream) - recipe.seq_len - 1)
    rows.append(stream[start:start + recipe.seq_len + 1])
  return np.stack(rows)


def logits_of(model: Model, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
  """The model's logits at every position of `tokens` (one pass over a fresh cache)."""
  cache = model.init_cache(tokens.shape[0], tokens.shape[1], grad=True)
  logits, _ = forward(model, cache, tokens, jnp.zeros((tokens.shape[0],), jnp.int32))
  return logits


def loss_fn(model: Model, batch: Int[Array, "B T+1"], unlikelihood: float = 0.0,
            continued: Int[Array, "B P+L"] | None = None,
            negative: Bool[Array, "B P+L"] | None = None) -> jax.Array:
  """Mean next-token cross-entropy of `batch[:, :-1]` predicting `batch[:, 1:]`, plus
  `unlikelihood` times the token-level unlikelihood term (`unlikelihood.token_term`), plus, when
  given, the sequence-level term on the model's own greedy continuations `continued` (prefix +
  continuation) with `negative` marking the repeats (`unlikelihood.sequence_term`)."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits = logits_of(model, inputs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  if unlikelihood:
    loss = loss + unlikelihood * ul.token_term(logits, inputs, targets)
  if continued is not None:
    loss = loss + ul.sequence_term(logits_of(model, continued[:, :-1]), continued[:, 1:],
                                   negative[:, 1:])
  return loss


def learning_rate(recipe: Recipe, step: int, progress: float) -> float:
  """Linear warm-up over `warmup_steps`, then cosine decay to 10% as `progress` goes 0 -> 1."""
  if step < recipe.warmup_steps:
    return recipe.learning_rate * (step + 1) / recipe.warmup_steps
  cosine = 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0)))
  return recipe.learning_rate * (0.1 + 0.9 * cosine)


def optimizer(recipe: Recipe) -> optax.GradientTransformation:
  """AdamW (clipped) whose learning rate is a traced hyperparameter set every step."""
  decay_matrices = lambda model: jax.tree_util.tree_map(lambda x: x.ndim >= 2, model)
  return optax.inject_hyperparams(lambda learning_rate: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=recipe.weight_decay,
                  mask=decay_matrices)))(learning_rate=recipe.learning_rate)


@functools.partial(jax.jit, static_argnames="recipe", donate_argnames=("model", "opt_state"))
def update(model: Model, opt_state, batch: jax.Array, recipe: Recipe, continued=None,
           negative=None):
  """One AdamW step on `loss_fn` (compiled once per recipe, and once more with `continued`;
  the learning rate is in `opt_state`)."""
  loss, grads = jax.value_and_grad(loss_fn)(model, batch, recipe.unlikelihood, continued,
                                            negative)
  updates, opt_state = optimizer(recipe).update(grads, opt_state, model)
  return optax.apply_updates(model, updates), opt_state, loss


REPETITION_PREFIX, REPETITION_TOKENS, REPETITION_N = 32, 64, 4


def finetune_repetition(model: Model, recipe: Recipe, streams: dict[str, np.ndarray],
                        desc: str = "repetition", progress: bool = True
                        ) -> tuple[Model, list[float], list[float]]:
  """`recipe.repetition_steps` sequence-level unlikelihood updates of a trained model (a new
  AdamW state, at the training schedule's final rate).

  Each update: the model continues `batch_size` training prefixes of REPETITION_PREFIX tokens
  greedily for REPETITION_TOKENS tokens (`decode`, the same jitted program every time: the model
  is an argument); every continuation token that completes a REPETITION_N-gram seen earlier in
  the continuation is a negative (`unlikelihood.repeated_ngrams`). Returns the model, the losses
  and the share of repeated positions in each step's continuations (it falls as the loops go).
  The model passed in is donated: use the one returned.
  """
  from jax_specens.decoding.api import decode
  if recipe.seq_len < REPETITION_PREFIX + REPETITION_TOKENS:
    raise ValueError(f"the repetition phase decodes {REPETITION_PREFIX} + {REPETITION_TOKENS} "
                     f"positions, past this recipe's seq_len {recipe.seq_len}: raise seq_len or "
                     "set repetition_steps=0")
  opt_state = optimizer(recipe).init(model)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate(recipe, recipe.steps, 1.0))
  rng = np.random.default_rng(recipe.seed + 1)
  prefix = dataclasses.replace(recipe, seq_len=REPETITION_PREFIX - 1)
  lengths = np.full((recipe.batch_size,), REPETITION_PREFIX, np.int32)
  losses, repeated = [], []
  for i in tqdm(range(recipe.repetition_steps), desc=desc, disable=not progress, mininterval=2.0):
    prompts = sample_batch(rng, streams, prefix)
    out = decode(model, prompts, lengths, method="ar", max_new_tokens=REPETITION_TOKENS,
                 temperature=0.0)
    continued = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    negative = ul.repeated_ngrams(continued, REPETITION_PREFIX, REPETITION_N)
    repeated.append(float(negative[:, REPETITION_PREFIX:].mean()))
    model, opt_state, loss = update(
        model, opt_state, jnp.asarray(sample_batch(rng, streams, recipe)), recipe,
        jnp.asarray(continued), jnp.asarray(negative))
    if i % 10 == 0 or i == recipe.repetition_steps - 1:
      losses.append(float(loss))
  return model, losses, repeated


def train_model(recipe: Recipe, streams: dict[str, np.ndarray], vocab_size: int, eot: int,
                desc: str = "train", progress: bool = True, seconds: float | None = None
                ) -> tuple[Model, list[float], int]:
  """Trains one model from random init; returns it (float32), its training losses and steps.

  Runs `recipe.steps` steps, or fewer when `seconds` is given and runs out first: the cosine
  decay then follows max(step / steps, elapsed / seconds), so the schedule always completes (a run
  on a busy machine trains fewer steps; `training.json` records how many).
  """
  for domain in recipe.domains:
    if len(streams[domain]) <= recipe.seq_len + 1:
      raise ValueError(f"the {domain} training text has {len(streams[domain])} tokens, too few "
                       f"for seq_len={recipe.seq_len}")
  model = create_model(recipe.model_config(vocab_size, eot), recipe.seed)
  opt = optimizer(recipe)
  opt_state = opt.init(model)

  rng = np.random.default_rng(recipe.seed)
  losses = []
  bar = tqdm(range(recipe.steps), desc=desc, disable=not progress, mininterval=2.0)
  start = time.time()
  for i in bar:
    frac = i / recipe.steps
    if seconds is not None and i > 0:  # always at least one step
      frac = max(frac, (time.time() - start) / seconds)
      if frac >= 1.0:
        break
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate(recipe, i, frac))
    batch = jnp.asarray(sample_batch(rng, streams, recipe))
    model, opt_state, loss = update(model, opt_state, batch, recipe)
    if i % 10 == 0 or i == recipe.steps - 1:
      losses.append(float(loss))
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  bar.close()
  return model, losses, i + 1 if frac < 1.0 else i


def to_bfloat16(model: Model) -> Model:
  cast = lambda x: x.astype(jnp.bfloat16)
  return model.replace(params=jax.tree_util.tree_map(cast, model.params))


def token_streams(tok, split: str) -> dict[str, np.ndarray]:
  return {d: tokenizers_lib.encode_documents(tok, [doc.text for doc in data.documents(d, split)])
          for d in data.DOMAINS}


def get_tokenizer(out: Path, vocab_size: int):
  """OUT/tokenizer if it exists (so models trained separately share it), else a new one."""
  tok_dir = out / "tokenizer"
  if (tok_dir / "tokenizer.json").is_file():
    print(f"reusing the tokenizer in {tok_dir}")
    return tokenizers_lib.load(tok_dir), tok_dir
  prose = [d.text for d in data.documents("prose", "train")]
  budget = sum(map(len, prose))
  code = []
  for doc in data.documents("code", "train"):  # as much code as prose, so neither dominates
    if budget <= 0:
      break
    code.append(doc.text)
    budget -= len(doc.text)
  tok = tokenizers_lib.train_tokenizer(prose + code, vocab_size)
  tok_dir.mkdir(parents=True, exist_ok=True)
  tokenizers_lib.save_tokenizer(tok, tok_dir)
  return tok, tok_dir


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("--out", type=Path, default=MODELS_DIR,
                      help="directory receiving tokenizer/, code/, prose/, draft/ and "
                      f"training.json (default: the package's own {MODELS_DIR})")
  parser.add_argument("--models", default=",".join(RECIPES),
                      help="comma-separated subset of " + ", ".join(RECIPES) + " (default: all)")
  parser.add_argument("--steps-scale", type=float, default=1.0,
                      help="multiply every recipe's number of steps (0.01: a quick smoke run)")
  parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                      help="stop early when training takes longer than this many minutes in all "
                      "(each model gets its recipe's time_share of it; the learning-rate schedule "
                      "follows the elapsed time, so it always completes). Default: no limit")
  parser.add_argument("--unlikelihood", type=float, default=None, metavar="W",
                      help="weight of the token-level unlikelihood term against repetition "
                      "(default: each recipe's, 1.0; 0 trains on cross-entropy alone)")
  parser.add_argument("--repetition-steps", type=int, default=None, metavar="N",
                      help="sequence-level unlikelihood updates after training (default: each "
                      "recipe's, 400; 0 skips them)")
  parser.add_argument("--repetition-only", action="store_true",
                      help="do not train: fine-tune the models already in OUT with the recipes' "
                      "sequence-level unlikelihood updates alone (`finetune_repetition`)")
  parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                      help="BPE vocabulary size when a new tokenizer is trained (an existing "
                      "OUT/tokenizer is reused so that all models share one)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace existing model directories in OUT")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def run(args: argparse.Namespace) -> int:
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  unknown = sorted(set(names) - set(RECIPES))
  if unknown or not names:
    raise ValueError(f"unknown built-in model(s) {unknown}; choose from {', '.join(RECIPES)}")
  if args.steps_scale <= 0:
    raise ValueError(f"--steps-scale must be > 0, got {args.steps_scale}")
  if args.unlikelihood is not None and args.unlikelihood < 0:
    raise ValueError(f"--unlikelihood must be >= 0, got {args.unlikelihood}")
  if args.repetition_steps is not None and args.repetition_steps < 0:
    raise ValueError(f"--repetition-steps must be >= 0, got {args.repetition_steps}")
  if args.repetition_only and args.repetition_steps == 0:
    raise ValueError("--repetition-only with --repetition-steps 0 has nothing to do")
  out = Path(args.out)
  for name in names:
    if args.repetition_only and not (out / name / "jax_specens.json").is_file():
      raise FileNotFoundError(f"--repetition-only fine-tunes a trained model, and {out / name} "
                              "has none: train it first (without --repetition-only)")
    if (out / name).exists() and not (args.overwrite or args.repetition_only):
      raise FileExistsError(f"{out / name} already exists; pass --overwrite to replace it")
  t0 = time.time()
  tok, tok_dir = get_tokenizer(out, args.vocab_size)
  eot = tokenizers_lib.eot_id(tok)
  train_streams, test_streams = token_streams(tok, "train"), token_streams(tok, "test")
  print("tokens: " + ", ".join(f"{d} train {len(train_streams[d])} / test {len(test_streams[d])}"
                               for d in data.DOMAINS), flush=True)
  record_path = out / "training.json"
  record = json.loads(record_path.read_text()) if record_path.is_file() else {}
  record.update(corpus=data.summary(), vocab_size=tok.get_vocab_size())
  for name in names:
    recipe = RECIPES[name].scaled(args.steps_scale)
    if args.unlikelihood is not None:
      recipe = dataclasses.replace(recipe, unlikelihood=args.unlikelihood)
    if args.repetition_steps is not None:
      recipe = dataclasses.replace(recipe, repetition_steps=args.repetition_steps)
    t = time.time()
    entry = record.setdefault("models", {}).get(name, {}) if args.repetition_only else {}
    if args.repetition_only:
      model = load_model(out / name, jnp.float32)
    else:
      budget = None if args.time_budget is None else args.time_budget * 60 * recipe.time_share
      model, losses, steps = train_model(recipe, train_streams, tok.get_vocab_size(), eot,
                                         desc=name, progress=not args.no_progress, seconds=budget)
      entry.update(steps_trained=steps, final_train_loss=losses[-1])
    if recipe.repetition_steps:
      model, seq_losses, repeated = finetune_repetition(
          model, recipe, train_streams, desc=f"{name} repetition", progress=not args.no_progress)
      entry.update(repetition_final_loss=seq_losses[-1],
                   repeated_share_first_last=[repeated[0], repeated[-1]],
                   repetition_after_saved_model=bool(args.repetition_only))
    seconds = time.time() - t
    model = to_bfloat16(model)
    held_out = {d: evaluate.mean_nll([model], evaluate.windows(
        test_streams[d], recipe.seq_len, EVAL_WINDOWS))[0] for d in data.DOMAINS}
    save_model(model, out / name, tokenizer_dir=tok_dir, overwrite=True)
    seconds_key = "repetition_seconds" if args.repetition_only else "train_seconds"
    entry.update({"recipe": dataclasses.asdict(recipe), seconds_key: round(seconds, 1),
                  "held_out_nll": held_out,
                  "held_out_ppl": {d: float(np.exp(v)) for d, v in held_out.items()}})
    record.setdefault("models", {})[name] = entry
    print(f"{name}: {seconds:.0f}s, held-out nll " +
          ", ".join(f"{d} {v:.3f}" for d, v in held_out.items()), flush=True)
    record_path.write_text(json.dumps(record, indent=2))
  print(f"done in {time.time() - t0:.0f}s; models in {out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jax_specens.builtin.train",
                                   description=__doc__.split("\n\n")[0] + "\n\n" +
                                   __doc__.split("\n\n", 2)[2],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
