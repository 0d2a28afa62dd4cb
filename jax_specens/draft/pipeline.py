"""`train_draft`: target directory in, draft model directory out (what `jax-specens train-draft`
runs). Harvest the teacher labels (cached in the checkpoint directory), pick the K ids, build the
draft from the target, train it, save it as an ordinary model directory plus `distill.json`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_specens.builtin import resolve
from jax_specens.checkpoint import (atomic_dir, copy_tokenizer_files, load_model, load_tokenizer,
                                    write_model_files)
from jax_specens.draft import data as D
from jax_specens.draft.model import (SHARED, grown, init_from_target, own_bytes,
                                     read_bytes_per_token, tapped, target_layers,
                                     unrolled_params)
from jax_specens.draft.prompts import FAMILIES, held_out_count
from jax_specens.draft.train import TrainConfig, evaluate, train

DISTILL_FILE = "distill.json"
GREEDY_LABELS = ("tokens", "teacher")  # DraftRecipe.greedy_labels
# recipe fields added after the first label caches were written, with the value they then had
LATER_HARVEST_FIELDS = {"answer_temperatures": (0.0,), "greedy_labels": "tokens",
                        "prompt_family": "all"}


@dataclasses.dataclass(frozen=True)
class DraftRecipe:
  """The draft's shape and its distillation data (see `data.py`)."""

  # defaults: the recipe measured on SmolLM2-135M-Instruct (README "Distilling a draft")
  layers: tuple[int, ...] = (0, 1, 2, 3)  # target layers copied into the draft, in order
  vocab_k: int = 8192  # K: head over the K target ids most often the target's top-1
  seq_len: int = 160
  top: int = 32  # teacher labels: the target's top-T tokens per position
  # training prompts the target answers: the first N of `prompts.prompts("train", prompt_family)`
  # (of "all": 379 the first family; 820 the first two, with the descriptions and stories of the
  # second; 1148 all three, with the openings of stories and articles). Held-out prompts: the first
  # `eval_chat_prompts` of the family's test split
  chat_prompts: int = 379
  prompt_family: str = "all"  # prompts.FAMILIES
  answer_tokens: int = 128
  # the target answers every training prompt once per temperature (0: greedy, labelled by its own
  # tokens; > 0: sampled with a new key each time, labelled by the teacher's top-T); held-out
  # prompts are answered greedily. Three samples and 150k text tokens (355k training positions)
  # gave held-out agreement 0.492 where one sample and 60k (156k positions) gave 0.465.
  answer_temperatures: tuple[float, ...] = (0.0, 1.0, 1.0, 1.0)
  # labels of the greedy answers: "tokens" (the answer's own next token, probability 1; no teacher
  # pass) or "teacher" (the target's top-T, as for every other row). Continuing the SmolLM2 feature
  # draft on 820 greedy answers, "tokens" took held-out agreement from 0.494 to 0.449 in 100 steps
  # and 0.431 in 200, "teacher" to 0.480 (its usual warm-up dip) and then up; the teacher pass over
  # 820 answers cost 3.5 minutes, their generation 9.5.
  greedy_labels: str = "tokens"
  text_tokens: int = 150000  # stdlib prose + code tokens labelled by the teacher
  # None: every held-out prompt of the families the training prompts come from
  # (`prompts.held_out_count`: 27 for the first family's 379, 116 for all 1148). A fixed 27 (the
  # first family's) made the SmolLM2 fourth phase's held-out loss blind to what it learnt
  eval_chat_prompts: int | None = None
  eval_text_tokens: int = 3000
  harvest_batch: int = 16  # rows per teacher pass
  gen_batch: int = 32  # rows per generation call
  # a draft that reads the target's hidden states (EAGLE style, `ModelConfig.feature_input`):
  # its labels also hold the target's features (one more teacher pass over every row)
  features: bool = False
  # target layers whose outputs a feature draft also reads (EAGLE-3's low / middle / high
  # features, `ModelConfig.feature_taps`); their labels are one more file beside the features
  feature_taps: tuple[int, ...] = ()

  def __post_init__(self):
    if self.feature_taps and not self.features:
      raise ValueError(f"feature_taps {list(self.feature_taps)} are read by a feature draft: add "
                       "--features (DraftRecipe(features=True))")
    if self.vocab_k < 2:
      raise ValueError(f"vocab_k must be >= 2 (--vocab-k), got {self.vocab_k}")
    if not self.answer_temperatures or any(t < 0 for t in self.answer_temperatures):
      raise ValueError("answer_temperatures must be >= 0 and non-empty (--answer-temperatures "
                       f"0,1), got {self.answer_temperatures}")
    if self.greedy_labels not in GREEDY_LABELS:
      raise ValueError(f"greedy_labels must be one of {', '.join(GREEDY_LABELS)} "
                       f"(--greedy-labels), got {self.greedy_labels!r}")
    if self.prompt_family not in FAMILIES:
      raise ValueError(f"prompt_family must be one of {', '.join(FAMILIES)} (--prompt-family), "
                       f"got {self.prompt_family!r}")
    if self.eval_chat_prompts is None:
      object.__setattr__(self, "eval_chat_prompts",
                         held_out_count(self.chat_prompts, self.prompt_family))
    if self.seq_len < 8 or self.top < 1:
      raise ValueError("seq_len must be >= 8 (--seq-len) and top >= 1 (--top)")

  def harvest_key(self) -> dict:
    d = dataclasses.asdict(self)
    key = {k: d[k] for k in ("seq_len", "top", "chat_prompts", "answer_tokens", "text_tokens",
                             "eval_chat_prompts", "eval_text_tokens")}
    # fields that older label caches do not record: in the key only when not at their old value
    key.update({k: list(d[k]) if isinstance(d[k], tuple) else d[k]
                for k, old in LATER_HARVEST_FIELDS.items() if d[k] != old})
    return key


def _harvests(target, tok, recipe: DraftRecipe, ckpt: Path, progress: bool):
  """Train and held-out labels, read from `ckpt` when a previous run with the same recipe made
  them (so a resumed run skips the slow part), else computed and saved there."""
  key_file = ckpt / "harvest.json"
  key = recipe.harvest_key()
  if key_file.is_file() and json.loads(key_file.read_text()) != key:
    raise ValueError(f"{ckpt} holds teacher labels of another recipe "
                     f"({key_file.read_text()}); pass a new --checkpoint-dir")
  out = {}
  for split, n, text in (("test", recipe.eval_chat_prompts, recipe.eval_text_tokens),
                         ("train", recipe.chat_prompts, recipe.text_tokens)):
    path = ckpt / f"harvest_{split}.npz"
    if path.is_file():
      out[split] = D.Harvest.load(path)
      continue
    h = D.build_harvest(target, tok, split, chat_prompts_n=n, family=recipe.prompt_family,
                        answer_tokens=recipe.answer_tokens,
                        text_tokens=text, seq_len=recipe.seq_len, top=recipe.top,
                        temperatures=(0.0,) if split == "test" else recipe.answer_temperatures,
                        batch_size=recipe.harvest_batch, gen_batch_size=recipe.gen_batch,
                        soft_answers=split == "test" or recipe.greedy_labels == "teacher",
                        progress=progress)
    tmp = ckpt / f".harvest_{split}.tmp.npz"
    h.save(tmp)
    os.replace(tmp, path)
    key_file.write_text(json.dumps(key))
    out[split] = h
  if recipe.features:
    for split, h in out.items():
      out[split] = dataclasses.replace(h, features=_features(target, h, recipe, ckpt, split,
                                                             progress))
  return out["train"], out["test"]


def _features(target, h: D.Harvest, recipe: DraftRecipe, ckpt: Path, split: str, progress: bool
              ) -> np.ndarray:
  """The target's features over `h` (`[N, L, D]`), then its tapped layers' (`[N, L, taps D]`):
  two files in `ckpt`, read when a run made them before (the first serves drafts without taps)."""
  d = target.config.hidden_size
  taps = recipe.feature_taps
  paths = [ckpt / f"features_{split}.npy"]
  if taps:
    paths.append(ckpt / f"features_taps{'-'.join(map(str, taps))}_{split}.npy")
  if not all(p.is_file() for p in paths):
    x = D.target_features(target, h, taps=taps, batch_size=recipe.harvest_batch,
                          progress=progress, desc=f"target features {split}").features
    for path, part in zip(paths, (x[..., :d], x[..., d:])):
      if not path.is_file():
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, part)
        os.replace(tmp, path)
  out = [np.load(p) for p in paths]
  return np.concatenate(out, axis=-1) if taps else out[0]


def rounded(draft, store_dtype):
  """`draft` with its own parameters (not the shared embedding) rounded to `store_dtype` and back:
  what loading it from `save_draft(..., store_dtype=...)` gives."""
  if store_dtype is None:
    return draft
  own = lambda path: getattr(path[0], "key", None) not in SHARED
  return draft.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: x.astype(store_dtype).astype(x.dtype) if own(p) else x, draft.params))


def save_draft(out_dir: str | os.PathLike, draft, target_dir: str | os.PathLike, metrics: dict,
               *, store_dtype=None, overwrite: bool = False, borrow_tokenizer: bool = False
               ) -> Path:
  """Writes `draft` as an ordinary model directory (atomically) that shares the target's
  embedding instead of carrying a copy, with `metrics` as its `distill.json`.

  store_dtype: None keeps the parameters' dtype; "bfloat16" halves a float32 draft's files
  (70 -> 35 MB for the default SmolLM2 draft), and the directory still loads in the dtype the
  draft had (`checkpoint.write_model_files`' load_dtype). borrow_tokenizer: no copy of the
  target's tokenizer files (Gemma 3's tokenizer.json is 33 MB, more than its draft), only their
  fingerprint and the target's directory (`checkpoint.copy_tokenizer_files(..., borrow=True)`).
  """
  pure = unrolled_params(draft)  # a checkpoint's layout, however the draft was loaded
  own = {k: v for k, v in pure.items() if k not in SHARED}
  (trained,) = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(own)}
  store = trained if store_dtype is None else jnp.dtype(store_dtype)
  own = jax.tree_util.tree_map(lambda x: x.astype(store), own)
  with atomic_dir(out_dir, overwrite) as tmp:  # the embedding stays the target's: not written
    write_model_files(tmp, draft.config, {**pure, **own},
                      share=([g for g in SHARED if g in pure], Path(target_dir)),
                      load_dtype=None if store == trained else trained)
    copy_tokenizer_files(target_dir, tmp, borrow=borrow_tokenizer)
    (tmp / DISTILL_FILE).write_text(json.dumps({**metrics, "stored_dtype": str(store)},
                                               indent=2))
  return Path(out_dir)


def _continued(init_from, target, recipe: DraftRecipe):
  """(draft, its distill.json record) of the draft `init_from` continues, checked to be a draft of
  `target` of the recipe's kind."""
  draft = load_model(init_from, share_from=target)
  c, t = draft.config, target.config
  if not c.vocab_subset or c.vocab_size != t.vocab_size or c.hidden_size != t.hidden_size:
    raise ValueError(f"--init-from {init_from} is not a reduced-vocabulary draft of this target "
                     f"(vocab {c.vocab_size}, hidden {c.hidden_size}, K {len(c.vocab_subset)}; the "
                     f"target: vocab {t.vocab_size}, hidden {t.hidden_size}); give a directory "
                     "that train-draft wrote for this target")
  if c.feature_input != recipe.features:
    raise ValueError(f"--init-from {init_from} is {'a' if c.feature_input else 'not a'} feature "
                     f"draft; {'add' if c.feature_input else 'drop'} --features to continue it")
  if c.feature_taps and c.feature_taps != recipe.feature_taps:
    raise ValueError(f"--init-from {init_from} reads the target's layers {list(c.feature_taps)}: "
                     f"pass --feature-taps {','.join(map(str, c.feature_taps))} to continue it")
  record = Path(resolve(init_from)) / DISTILL_FILE
  previous = json.loads(record.read_text()) if record.is_file() else {}
  return draft, {k: previous[k] for k in ("phases", "recipe", "train_config", "steps",
                                          "train_seconds", "final_eval", "continued_from")
                 if k in previous}


def _own_layers(previous: dict, grow_layers) -> list[int] | None:
  """The target layers a continued draft started from: its parent's, after `grow_layers`."""
  parent = previous.get("recipe", {}).get("layers")
  return None if parent is None else [*map(int, grow_layers), *parent]


def train_draft(target_dir: str | os.PathLike, out_dir: str | os.PathLike,
                recipe: DraftRecipe = DraftRecipe(), config: TrainConfig = TrainConfig(), *,
                checkpoint_dir: str | os.PathLike | None = None, overwrite: bool = False,
                store_dtype=None, progress: bool = True,
                init_from: str | os.PathLike | None = None, borrow_tokenizer: bool = False,
                grow_layers: tuple[int, ...] = ()) -> dict:
  """Distils a draft of the model in `target_dir` into `out_dir`; returns the metrics written
  to `out_dir/distill.json`. checkpoint_dir (default `<out_dir>.ckpt`): teacher labels and
  training state; an interrupted run resumes from it. store_dtype: see `save_draft` (the
  held-out numbers are of the stored, rounded parameters); borrow_tokenizer: see `save_draft`.

  init_from: a draft directory of this target (or `builtin:NAME`) to continue training instead of
  starting from the target's layers: its layers and K ids are kept (`recipe.layers` and
  `recipe.vocab_k` are not used), e.g. a second phase with a longer `config.unroll`. Its training
  state goes to `<checkpoint_dir>/continue-<out name>`, so the first phase's labels are reused
  when `checkpoint_dir` is the first phase's. grow_layers (with init_from): target layers inserted
  before the continued draft's own, each starting as the identity (`model.grown`)."""
  out = Path(out_dir)
  if config.unroll > 1 and not recipe.features:
    raise ValueError(f"--unroll {config.unroll} trains a draft along its own features: add "
                     "--features (DraftRecipe(features=True)), or leave --unroll at 1")
  if grow_layers and init_from is None:
    raise ValueError("--grow-layers deepens a trained draft: give the draft to grow with "
                     "--init-from (a new draft takes its layers from --layers)")
  if out.exists() and not overwrite:
    raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it")
  t0 = time.time()
  target = load_model(target_dir)
  tok = load_tokenizer(target_dir)
  if tok is None:
    raise FileNotFoundError(f"{target_dir} has no tokenizer files; the draft is distilled on "
                            "text tokenized by the target's tokenizer (convert the target with its "
                            "tokenizer)")
  target_layers(recipe.layers, target.config)
  if grow_layers:
    target_layers(grow_layers, target.config, "--grow-layers")
  if recipe.feature_taps:
    target_layers(recipe.feature_taps, target.config, "--feature-taps")
  start = None if init_from is None else _continued(init_from, target, recipe)
  ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out.parent / f"{out.name}.ckpt"
  ckpt.mkdir(parents=True, exist_ok=True)
  train_h, test_h = _harvests(target, tok, recipe, ckpt, progress)
  t_harvest = time.time() - t0
  if start is None:
    subset = D.frequent_ids(train_h, recipe.vocab_k, target.config.vocab_size,
                            always=target.config.eos_token_ids)
    np.save(ckpt / "vocab_subset.npy", subset)
    draft, train_dir = init_from_target(target, recipe.layers, subset, recipe.features,
                                        recipe.feature_taps), "train"
  else:
    (draft, previous), train_dir = start, f"continue-{out.name}"
    if grow_layers:
      draft = grown(draft, target, grow_layers)
    if recipe.feature_taps != draft.config.feature_taps:
      draft = tapped(draft, target, recipe.feature_taps)
    subset = np.asarray(draft.config.vocab_subset)
  draft, history = train(draft, train_h, test_h, config, checkpoint_dir=ckpt / train_dir,
                         progress=progress)
  draft = rounded(draft, store_dtype)
  final = evaluate(draft, test_h, config.batch_size, config.unroll)
  top1 = test_h.top_ids[..., 0][test_h.mask > 0]
  kept = {} if start is None else {  # a continued draft's own layers and K, not the recipe's
      "layers": _own_layers(previous, grow_layers), "vocab_k": len(subset)}
  metrics = {
      "target": str(Path(target_dir).absolute()),
      "recipe": dataclasses.asdict(recipe) | kept, "train_config": dataclasses.asdict(config),
      "train_tokens": train_h.num_tokens, "eval_tokens": test_h.num_tokens,
      "subset_coverage_eval": float(np.isin(top1, subset).mean()),
      "initial_eval": history["initial_eval"], "final_eval": final,
      "steps": history["steps"], "train_seconds": history["seconds"],
      "harvest_seconds": round(t_harvest, 1), "resumed_from": history.get("resumed_from"),
      "evals": history["evals"],
      "draft_own_bytes": own_bytes(draft),
      "read_bytes_ratio": read_bytes_per_token(draft.config) / read_bytes_per_token(target.config),
  }
  if start is not None:  # the earlier phases' record, newest first
    metrics["continued_from"] = {"draft": str(init_from), **previous}
  save_draft(out, draft, target_dir, metrics, store_dtype=store_dtype, overwrite=overwrite,
             borrow_tokenizer=borrow_tokenizer)
  return metrics
