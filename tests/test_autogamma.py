"""gamma="auto": a calibrated schedule fixed before decoding, so the output is that of the chosen
explicit gamma (greedy: ar's tokens); chosen once per models and shape; refused where it cannot
work, with a message naming the fix."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from jax_specens import autogamma, pricing
from jax_specens.decoding.api import decode, decode_stream
from tests import decode_models as dm
from tests.test_cli_generate import cli, model_dirs  # noqa: F401 (a fixture)

N = 12


@pytest.fixture(autouse=True)
def fresh_cache():
  autogamma.clear_cache()
  yield
  autogamma.clear_cache()


@pytest.fixture
def count_calibrations(monkeypatch):
  calls = []
  real = pricing.measure_pass_costs
  monkeypatch.setattr(pricing, "measure_pass_costs",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def test_sd_auto_greedy_is_ar_and_the_chosen_gamma(count_calibrations, monkeypatch):
  a, b, _ = dm.models()
  kw = dict(max_new_tokens=N, temperature=0.0)
  auto = decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma="auto", **kw)
  choice = auto.gamma_choice
  assert isinstance(choice.gamma, int) and 1 <= choice.gamma <= autogamma.MAX_GAMMA
  assert not choice.cached and choice.seconds > 0 and 0.0 <= choice.alpha <= 1.0
  assert choice.predicted_speedup == max(s for _, s in choice.candidates)
  ar = decode(b, dm.PROMPTS, dm.LENGTHS, method="ar", **kw)
  explicit = decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma=choice.gamma, **kw)
  np.testing.assert_array_equal(auto.tokens, ar.tokens)
  np.testing.assert_array_equal(auto.tokens, explicit.tokens)
  assert explicit.gamma_choice is None
  again = decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma="auto", **kw)
  assert again.gamma_choice.cached and again.gamma_choice.gamma == choice.gamma
  assert len(count_calibrations) == 1  # the second call did not recalibrate
  # another batch size is another shape: calibrated anew
  decode(b, dm.PROMPTS[:2], dm.LENGTHS[:2], method="sd", draft=a, gamma="auto", **kw)
  assert len(count_calibrations) == 2
  # the opt-in CPU kernel prices passes differently: its own entry
  monkeypatch.setenv("JAX_SPECENS_CPU_KERNELS", "1")
  decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma="auto", **kw)
  assert len(count_calibrations) == 3


def test_identical_models_accept_everything_and_the_json_says_so():
  a = dm.models()[0]
  out = decode([a, a], dm.PROMPTS, dm.LENGTHS, method="se", gamma="auto", max_new_tokens=N,
               temperature=0.0)
  choice = out.gamma_choice
  assert choice.alpha == 1.0 and choice.probe_rejections == 0
  assert isinstance(choice.gamma, tuple) and len(choice.gamma) == 2
  d = out.to_dict()["stats"]["gamma_auto"]
  assert d["gamma"] == list(choice.gamma) and d["calibration_s"] > 0
  assert len(d["candidates"]) == autogamma.MAX_GAMMA ** 2
  assert set(d["pass_costs"]["seconds"][0]) == {str(w) for w in autogamma.TIMED_WIDTHS}


def test_se_auto_sampled_is_the_explicit_gamma_token_for_token():
  a, b, _ = dm.models()
  kw = dict(max_new_tokens=N, temperature=1.0, key=jax.random.key(3), weights=(0.3, 0.7))
  auto = decode([a, b], dm.PROMPTS, dm.LENGTHS, method="se", gamma="auto", **kw)
  explicit = decode([a, b], dm.PROMPTS, dm.LENGTHS, method="se", gamma=auto.gamma_choice.gamma,
                    **kw)
  np.testing.assert_array_equal(auto.tokens, explicit.tokens)
  np.testing.assert_array_equal(auto.lengths, explicit.lengths)
  # greedy and sampled are separate cache entries
  greedy = decode([a, b], dm.PROMPTS, dm.LENGTHS, method="se", gamma="auto",
                  **dict(kw, temperature=0.0))
  assert not greedy.gamma_choice.cached
  stream = decode_stream([a, b], dm.PROMPTS, dm.LENGTHS, method="se", gamma="auto", **kw)
  list(stream)
  assert stream.gamma_choice.cached
  np.testing.assert_array_equal(stream.output.tokens, auto.tokens)


@pytest.mark.parametrize("method,extra,match", [
    ("ar", {}, "gamma='auto' chooses the speculation length of methods 'sd' and 'se', not 'ar'"),
    ("ensemble", {}, "not 'ensemble'; pass an explicit gamma"),
    ("cosd", {"draft_first": True}, "not 'cosd'"),
    ("se", {"three": True}, "two models, got 3; pass one explicit gamma per model"),
])
def test_auto_is_refused_where_it_does_not_apply(method, extra, match, count_calibrations):
  a, b, c = dm.models()
  models = [a, b, c] if extra.get("three") else [a, b] if method != "ar" else a
  with pytest.raises(ValueError, match=match):
    decode(models, dm.PROMPTS, dm.LENGTHS, method=method, gamma="auto", max_new_tokens=N)
  assert not count_calibrations


def test_auto_under_jit_and_unknown_strings_are_refused():
  a, b, _ = dm.models()

  @jax.jit
  def inside(prompts):
    return decode(b, prompts, dm.LENGTHS, method="sd", draft=a, gamma="auto",
                  max_new_tokens=N).tokens

  with pytest.raises(ValueError, match="traced values.*outside jit.*gamma_choice.gamma"):
    inside(dm.PROMPTS)
  with pytest.raises(ValueError, match="or 'auto', got 'fast'"):
    decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma="fast", max_new_tokens=N)


def test_cli_gamma_auto_reports_its_choice(model_dirs, capsys):
  code, out, err = cli(capsys, "--model", model_dirs[1], "--draft", model_dirs[0], "--method", "sd",
                       "--gamma", "auto", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                       "--temperature", "0", "--json")
  assert code == 0, err
  g = json.loads(out)["stats"]["gamma_auto"]
  assert 1 <= g["gamma"] <= autogamma.MAX_GAMMA and g["probe_gamma"] == 4 and not g["cached"]
  code, out, err = cli(capsys, "--model", model_dirs[1], "--draft", model_dirs[0], "--method", "sd",
                       "--gamma", "auto", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                       "--temperature", "0")
  # the choice is timed: a second calibration on a loaded machine may pick another gamma
  chosen = re.search(r"-- gamma auto: (\d+) \(acceptance alpha", err)
  assert code == 0 and chosen and 1 <= int(chosen.group(1)) <= autogamma.MAX_GAMMA, err


@pytest.mark.parametrize("argv,message", [
    (["--gamma", "auto"], "not --method ar; drop --gamma auto"),
    (["--gamma", "auto", "--method", "cosd", "--draft", "{m1}"],
     "--gamma auto chooses the speculation length of methods 'sd' and 'se', not 'cosd'"),
])
def test_cli_gamma_auto_refused_exit_2(model_dirs, capsys, argv, message):
  argv = [x.format(m1=model_dirs[1]) for x in argv]
  code, out, err = cli(capsys, "--model", model_dirs[0], "--prompt-ids", "1,2",
                       "--max-new-tokens", "4", *argv)
  assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_cli_says_when_no_gamma_is_priced_faster_than_the_baseline(model_dirs, capsys,
                                                                   monkeypatch):
  """Where every gamma is priced slower than ar (here forced: the best prediction 0.8x), the
  choice says so and the CLI names the faster method; decode still runs sd with the best gamma."""
  real = pricing.best_gammas
  monkeypatch.setattr(pricing, "best_gammas", lambda *a, **k: (
      lambda best, grid: (best, [(g, 0.8 if g == best else 0.5) for g, _ in grid]))(*real(*a, **k)))
  code, out, err = cli(capsys, "--model", model_dirs[1], "--draft", model_dirs[0], "--method", "sd",
                       "--gamma", "auto", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                       "--temperature", "0")
  assert code == 0, err
  assert "no gamma is priced faster than ar here (best 0.80x of ar): --method ar" in err
  assert "-- sd:" in err
  a, b, _ = dm.models()
  choice = decode(b, dm.PROMPTS, dm.LENGTHS, method="sd", draft=a, gamma="auto",
                  max_new_tokens=N, temperature=0.0).gamma_choice
  assert choice.baseline == "ar" and choice.baseline_faster and choice.predicted_speedup == 0.8
  assert choice.to_dict()["baseline_faster"]


def test_the_gamma_auto_benchmark_runs_end_to_end_on_a_tiny_pair(tmp_path, capsys):
  """`python -m benchmarks.gamma_auto --small`: both pairs (identical models, then a draft) are
  calibrated, compared with every gamma of the grid and written out (the script shares
  `draft_bench.load_pair`, which takes every option by name: a missing one fails here too)."""
  from benchmarks import gamma_auto
  assert gamma_auto.main(["--small", "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "gamma_auto_small.json").read_text())
  assert [s["pair"] for s in result["summaries"]] == ["identical", "draft"]
  for s in result["summaries"]:
    assert s["choice"]["gamma"] == s["chosen"] >= 1
    assert set(s["decode_s"]) >= {"ar", "1", "3", str(s["chosen"])}
  assert "chosen_over_best" in capsys.readouterr().out
