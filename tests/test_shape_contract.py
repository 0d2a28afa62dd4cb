"""The jaxtyping annotations are a contract: every method decodes with them checked (beartype)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared_xla_cache_env, tiny_models_xla_env

WORKER = Path(__file__).with_name("shape_check_worker.py")


def test_every_method_decodes_with_its_shapes_checked():
  env = {**os.environ, **shared_xla_cache_env(), **tiny_models_xla_env()}  # tiny models only
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # the checker is live: a call with a wrong shape is refused, naming the argument
  assert result["control_refused"]
  runs = result["runs"]
  assert len(runs) == 15  # llama greedy and sampled (run), mistral (ring caches) greedy (traced)
  for name, rows in runs.items():
    if name.startswith("mistral"):
      assert rows == [2, 10], name  # the traced output's shape
    else:
      assert [len(r) for r in rows] == [10, 10], name
  # and the checked code is the real code: greedy speculation is lossless
  assert runs["llama sd 0.0"] == runs["llama ar 0.0"]
  assert runs["llama se 0.0"] == runs["llama ensemble 0.0"]
