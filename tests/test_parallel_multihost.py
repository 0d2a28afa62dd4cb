"""Multi-host: two processes on this machine form one mesh through jax.distributed (gloo on CPU)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax

from jax_specens import ModelConfig, checkpoint, create_model

WORKER = Path(__file__).with_name("multihost_worker.py")
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_share_one_mesh_and_match_a_single_device(tmp_path):
  model = create_model(CFG, seed=3)  # weights scaled up: varied greedy tokens
  checkpoint.save_model(jax.tree_util.tree_map(lambda x: 3 * x, model), tmp_path / "m")
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  logs = [open(tmp_path / f"log{rank}", "w") for rank in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(rank), str(port), str(tmp_path / "m"),
       str(tmp_path / f"out{rank}.json")], env=env, stdout=logs[rank], stderr=subprocess.STDOUT)
      for rank in range(2)]
  try:
    # a process that fails leaves the other waiting in a collective: stop both at the first failure
    deadline = time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  for rank, p in enumerate(procs):
    log = (tmp_path / f"log{rank}").read_text()
    assert p.returncode == 0, f"process {rank} failed (rc {p.returncode}):\n{log[-3000:]}"
  for rank in range(2):
    r = json.loads((tmp_path / f"out{rank}.json").read_text())
    assert r["process_index"] == rank and r["process_count"] == 2
    assert r["global_devices"] == 4 and r["local_devices"] == 2
    # q kernel [32, 4 heads * 8] split over model=2, replicated over data=2: this process holds
    # two [32, 16] pieces and never the whole kernel
    assert not r["q_fully_addressable"]
    assert r["q_local_shards"] == [[32, 16], [32, 16]]
    assert r["tokens_local_shards"] == [[2, 6], [2, 6]]
    assert r["max_abs_diff"] < 2e-5 and r["argmax_equal"]
    # the whole batch decoded across both processes == decoded on one device
    assert r["decoded_is_numpy"] and r["decoded"] == r["want_decoded"]
    assert len({tuple(row) for row in r["decoded"]}) == 4 and len(r["decoded"][0]) == 5
