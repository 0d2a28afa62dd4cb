"""What every benchmark shares: timing, the environment record, JSON, a table and a PNG plot.

    secs = time_call(lambda: decode(...), repeats=3)      # median wall seconds, result blocked on
    print(table(rows, ["method", "batch", "ours tok/s", "peer tok/s", "ratio"]))
    write_results(out_dir, "peers", config, rows)         # peers.json (with environment())
    bar_plot(out_dir / "peers.png", ...)                  # skipped with a note without matplotlib
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

DEFAULT_OUT = Path("benchmarks") / "results"


def block(x):
  """Waits for every array in `x` (jax or torch results alike)."""
  return jax.block_until_ready(x)


@contextlib.contextmanager
def restored_env(name: str):
  """Whatever the body sets `os.environ[name]` to, it is as before afterwards (unset if it was)."""
  before = os.environ.get(name)
  try:
    yield
  finally:
    if before is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = before


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
  """`fn()` and its wall seconds (the first call of a jitted function: compile + run)."""
  t0 = time.perf_counter()
  out = block(fn())
  return out, time.perf_counter() - t0


def _version(pkg: str) -> str | None:
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  """Device and versions, recorded in every JSON so numbers can be compared."""
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "versions": {p: _version(p) for p in
                   ("jax", "jaxlib", "flax", "jax_specens", "torch", "transformers")},
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def write_results(out_dir: str | os.PathLike, name: str, config: dict, rows: list[dict],
                  **extra) -> Path:
  """Writes `<out_dir>/<name>.json` = {benchmark, environment, config, rows, **extra}."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  payload = {"benchmark": name, "environment": environment(), "config": config, "rows": rows,
             **extra}
  path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  return path


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if v != v:  # nan
      return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
  return str(v)


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (dicts) restricted to `columns` (missing cells print as -)."""
  cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
  sep = "| " + " | ".join("-" * w for w in widths) + " |"
  return "\n".join([line(columns), sep] + [line(r) for r in cells])


def _pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
  except ImportError:
    print("(matplotlib is not installed: no PNG written; pip install matplotlib)")
    return None


def bar_plot(path: str | os.PathLike, groups: Sequence[str], series: dict[str, Sequence[float]],
             ylabel: str, title: str) -> Path | None:
  """Grouped bars: one group per entry of `groups`, one bar per series. Returns the PNG path."""
  plt = _pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
  n = len(series)
  width = 0.8 / max(n, 1)
  xs = np.arange(len(groups))
  for i, (name, ys) in enumerate(series.items()):
    ax.bar(xs + (i - (n - 1) / 2) * width, [np.nan if y is None else y for y in ys], width,
           label=name)
  ax.set_xticks(xs, groups, rotation=20, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)


def line_plot(path: str | os.PathLike, x: Sequence[float], series: dict[str, Sequence[float]],
              xlabel: str, ylabel: str, title: str, styles: dict[str, dict] | None = None
              ) -> Path | None:
  """One line per series over `x` (`styles[name]`: extra `plot` kwargs, e.g. color, linestyle).
  Returns the PNG path (None without matplotlib)."""
  plt = _pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, ys in series.items():
    ax.plot(x, ys, marker="o", label=name, **(styles or {}).get(name, {}))
  ax.set_xticks(list(x))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)


def base_parser(description: str) -> argparse.ArgumentParser:
  """Options every benchmark takes: --small, --out, --repeats."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--small", action="store_true",
                 help="tiny models and few tokens: checks the script end to end in seconds "
                 "(numbers are then meaningless)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                 help="directory for the JSON results and the PNG plot")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed repetitions per measurement (the median is reported)")
  return p


def real_model(path: str | os.PathLike | None, name: str) -> Path:
  """`path`, or the real model `name` ("smollm2" / "gemma3") from the user cache that
  `jax-specens demo` fills, converted from its GGUF package on first use."""
  if path is not None:
    return Path(path)
  from jax_specens.cli.demo_real import model_dir
  return model_dir(name)


def random_prompts(batch: int, max_len: int, vocab: int, seed: int = 0,
                   min_token: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """`[B, T]` right-padded random prompts (ids >= min_token, so no special ids) and lengths `[B]`
  between max_len/2 and max_len (the first row is full length)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, max_len // 2), max_len + 1, size=batch)
  lengths[0] = max_len
  prompts = np.zeros((batch, max_len), np.int32)
  for b, n in enumerate(lengths):
    prompts[b, :n] = rng.integers(min_token, vocab, size=n)
  return prompts, lengths.astype(np.int32)


def tokens_per_s(num_tokens: int, secs: float) -> float:
  return num_tokens / secs if secs > 0 else float("nan")


def step_seconds(model, batch: int, context: int, repeats: int = 5) -> float:
  """Median seconds of one jitted decode step (W = 1) of `model` at `batch` rows, with `context`
  tokens already in the cache (`jax_specens.pricing.measure_pass_costs` at one width)."""
  from jax_specens import pricing
  return pricing.measure_pass_costs([model], [[1]], batch, context + 8, repeats,
                                    context=context).of(0, 1)


def pass_costs(models, gammas_list, batch: int, cache_len: int, context: int, prompt_width: int,
               repeats: int = 5, temperature: float = 0.0):
  """`pricing.PassCosts` of every width the loops of `gammas_list` run (`pricing.step_passes`),
  width 1 (ar / ensemble) and the prefill width, for `models` in method order, with the sampling
  and verification math of each step and of the baseline's token at `temperature`
  (`pricing.measure_math_costs`)."""
  from jax_specens import pricing, vocab
  widths = [{1, prompt_width} for _ in models]
  for gammas in gammas_list:
    for k, w in pricing.step_passes(gammas, models[0].config.feature_input):
      widths[k].add(w)
  costs = pricing.measure_pass_costs(models, [sorted(w) for w in widths], batch, cache_len,
                                     repeats, context=context)
  math = pricing.measure_math_costs(vocab.shared_size(models), batch,
                                    [g[0] for g in gammas_list], temperature, repeats)
  return dataclasses.replace(costs, math=math)


def priced(out, seconds: float, base_seconds: float, gammas, costs, method: str,
           new_tokens: int, prompt_width: int) -> dict:
  """The measured speed-up of a decode (`base_seconds / seconds`, ar or ensemble as the base) next
  to its `jax_specens.pricing` predictions from the decode's own acceptance and `costs`:
  predicted = tokens per step / priced step (docs/algorithms.md §3, per round); predicted_run =
  this call (the slowest of the batch's rows, new_tokens, each model's prefill); predicted_loop =
  `predicted` with the baseline's token priced from its own loop ((base_seconds - its prefill) /
  new_tokens) instead of a 1-token pass timed alone, which can cost more than a step of the loop;
  predicted_rows = the baseline's measured seconds over this call's priced seconds
  (`pricing.run_seconds`: the steps the slowest row needs given each row's own alpha, at the
  priced step, plus the prefills), so ratio_rows = priced seconds / measured seconds: what
  remains when acceptance (per row), pass costs and the baseline are all taken as measured."""
  from jax_specens import pricing
  st = out.stats.to_dict()
  b = int(out.tokens.shape[0])
  alpha = pricing.alpha_from_stats(st["accepted"], st["rejections"])
  prefill = [costs.of(k, prompt_width) for k in range(len(costs.seconds))]
  measured = base_seconds / seconds
  pred = pricing.speedup(alpha, gammas, costs, method)
  loop_token = (base_seconds - pricing.baseline_prefill(prefill, method)) / new_tokens
  pred_loop = pred * loop_token / pricing.baseline_seconds(costs, method)
  run = pricing.run_speedup(alpha, gammas, costs, method, new_tokens, b, prefill)
  rows = pricing.row_alphas_from_stats(st)
  run_rows = pricing.run_seconds(alpha, gammas, costs, method, new_tokens, b, prefill, rows)
  return {"gamma": list(gammas), "alpha": alpha, "measured": measured, "predicted": pred,
          "ratio": measured / pred, "predicted_run": run, "ratio_run": measured / run,
          "predicted_loop": pred_loop, "ratio_loop": measured / pred_loop,
          "predicted_rows": base_seconds / run_rows, "ratio_rows": run_rows / seconds,
          "steps": st["steps"],
          "steps_predicted": pricing.expected_steps(alpha, gammas, new_tokens, b, method),
          "steps_rows": pricing.expected_steps(alpha, gammas, new_tokens, b, method, rows),
          "row_alpha": rows,
          "step_ms_priced": 1e3 * pricing.step_seconds(gammas, costs),
          "step_ms_measured": 1e3 * (seconds - sum(prefill)) / max(st["steps"], 1)}
