"""`jax-specens generate --mesh data=D,model=M`: the sharded CLI decodes the single-device tokens,
and a mesh that does not fit the batch or the heads is refused (exit 2) before any weight is
read."""

import json

import jax
import numpy as np
import pytest

from jax_specens import ModelConfig, create_model, decode
from jax_specens.checkpoint import save_model
from jax_specens.cli.main import main

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=8, num_kv_heads=4, head_dim=4)
PROMPTS = np.array([[5, 6, 7, 8], [9, 3, 0, 0]], np.int32)
LENGTHS = np.array([4, 2], np.int32)
N = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  model = create_model(CFG, seed=4)
  model = model.replace(params=jax.tree_util.tree_map(lambda x: 8 * x if x.ndim >= 2 else x,
                                                      model.params))  # no near-ties
  return str(save_model(model, tmp_path_factory.mktemp("mesh") / "m")), model


def generate(capsys, model_dir, *argv):
  code = main(["generate", "--model", model_dir, "--prompt-ids", "5,6,7,8", "--prompt-ids", "9,3",
               "--max-new-tokens", str(N), "--temperature", "0", "--no-stop", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_generate_on_a_mesh_prints_the_single_device_tokens(model_dir, capsys):
  code, out, err = generate(capsys, model_dir[0], "--mesh", "data=2,model=4", "--json")
  assert code == 0, err
  want = decode(model_dir[1], PROMPTS, LENGTHS, max_new_tokens=N, temperature=0.0).to_lists()
  assert json.loads(out)["tokens"] == want
  assert len(set(want[0])) > 1


@pytest.mark.parametrize("mesh, message", [
    ("data=4", "--mesh data=4: mesh axis 'data' has size 4, which does not divide the batch "
               "size 2"),
    ("model=3", "mesh axis 'model' has size 3, which does not divide num_heads=8"),
    ("data=2,model=8", "needs 16 devices but only 8"),
    ("tensor=2", "AXIS=SIZE"),
])
def test_a_mesh_that_does_not_fit_exits_2_naming_the_axis(model_dir, capsys, mesh, message):
  code, out, err = generate(capsys, model_dir[0], "--mesh", mesh)
  assert code == 2 and out == ""
  assert message in err


def test_single_device_modes_refuse_a_mesh():
  import argparse

  from jax_specens.cli import mesh_args
  with pytest.raises(ValueError, match="--mesh is not supported for cosd across two tokenizers"):
    mesh_args.refuse(argparse.Namespace(mesh="data=2"), "cosd across two tokenizers")
  mesh_args.refuse(argparse.Namespace(mesh=None), "cosd across two tokenizers")
