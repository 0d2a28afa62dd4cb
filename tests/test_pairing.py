"""Models are paired by tokenizer, not by embedding size.

- Same tokenizer, tables padded to different sizes (Qwen2.5 0.5B / 7B): sd, ensemble and se run
  over the shared real vocabulary, decode exactly what the unpadded models decode, and never
  emit a padded id, even when the padded rows' logits are made the largest.
- Different tokenizers are refused before tracing, at equal table size too: the error names the
  model directories and points to cross-tokenizer CoSD.
Built from real tokenizers: a tiny word-level one (fast) and SmolLM2-135M-Instruct's (`real`).
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_specens import create_model, decode, load_model, vocab
from jax_specens.checkpoint import CONFIG_FILE, PARAMS_DIR, abstract_model, save_model
from jax_specens.cli.main import main
from jax_specens.models.layout import unrolled
from jax_specens.models.model import Model
from jax_specens.step import forward_prompt
from tests.decode_models import config, scaled
from tests.test_text_api import save_tokenizer

N = 8
PROMPT = np.array([[9, 10, 11, 12]], np.int32)
LENGTH = np.array([4], np.int32)


def padded_copy(model: Model, extra: int, boost) -> Model:
  """`model` with `extra` more embedding rows: row V + i is 2x the row of token `boost[i % n]`,
  so (tied embeddings) a padded id's logit is twice that token's: the largest wherever that
  token has the largest positive logit."""
  assert model.config.tie_embeddings
  v = model.config.vocab_size
  cfg = dataclasses.replace(model.config, vocab_size=v + extra)
  params = nnx.to_pure_dict(unrolled(model).params)  # as `cfg` builds them
  emb = params["embed"]["embedding"]
  rows = 2.0 * emb[np.resize(np.asarray(boost), extra)]
  params["embed"]["embedding"] = jnp.concatenate([emb, rows.astype(emb.dtype)], axis=0)
  abstract = abstract_model(cfg, emb.dtype)
  nnx.replace_by_pure_dict(abstract.params, params)
  return Model(config=cfg, graphdef=abstract.graphdef, params=abstract.params)


def raw_argmax(model: Model, prompt, length) -> int:
  """Argmax of the model's own (unrestricted) next-token logits."""
  logits, _ = forward_prompt(model, model.init_cache(1, prompt.shape[1]), jnp.asarray(prompt),
                             jnp.asarray(length))
  return int(jnp.argmax(logits[0]))


def swap_ids(tokenizer_json, a: str, b: str) -> None:
  tok = json.loads(tokenizer_json.read_text())
  v = tok["model"]["vocab"]
  v[a], v[b] = v[b], v[a]
  tokenizer_json.write_text(json.dumps(tok))


def check_padded_pair(base: Model, padded: Model, other: Model, prompt, length, n: int,
                      full: bool = True):
  """The padded copy decodes sd and se (full: also ar, ensemble, sampling, both sd roles)
  exactly like `base`, over its real ids."""
  real = vocab.of(padded).size
  assert padded.config.vocab_size > real == base.config.vocab_size
  assert raw_argmax(padded, prompt, length) >= real  # unrestricted, a padded id would win
  kw = dict(max_new_tokens=n, temperature=0.0)
  ref = decode(base, prompt, length, **kw).to_lists()
  if not full:  # one compile per method counts on a 30-layer model
    assert decode(padded, prompt, length, method="sd", draft=base, gamma=2, **kw).to_lists() == ref
    se = decode([padded, other], prompt, length, method="se", gamma=2, **kw).to_lists()
    assert se == ref and max(se[0]) < real  # identical members: the ensemble is the model
    return
  assert decode(padded, prompt, length, **kw).to_lists() == ref
  assert decode(padded, prompt, length, method="sd", draft=base, gamma=2, **kw).to_lists() == ref
  assert decode(base, prompt, length, method="sd", draft=padded, gamma=2, **kw).to_lists() == ref
  se = decode([padded, other], prompt, length, method="se", gamma=2, **kw)
  assert se.to_lists() == decode([base, other], prompt, length, method="se", gamma=2,
                                 **kw).to_lists()
  assert se.to_lists() == decode([padded, other], prompt, length, method="ensemble",
                                 **kw).to_lists()
  sampled = decode([padded, other], np.repeat(prompt, 4, 0), np.repeat(length, 4), method="se",
                   gamma=2, max_new_tokens=n, temperature=1.0, key=jax.random.key(1))
  assert np.asarray(sampled.tokens).max() < real


# ---- tiny models with a real (word-level) tokenizer --------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairing")
  save_tokenizer(root / "tok")
  base = scaled(create_model(config(), seed=0), 15.0)
  greedy = decode(base, PROMPT, LENGTH, max_new_tokens=N, temperature=0).to_lists()[0]
  dirs = {"base": save_model(base, root / "base", tokenizer_dir=root / "tok"),
          "padded": save_model(padded_copy(base, 8, greedy), root / "padded",
                               tokenizer_dir=root / "tok"),
          "other": save_model(scaled(base, 0.9), root / "other", tokenizer_dir=root / "tok")}
  shutil.copytree(dirs["base"], root / "swapped")
  swap_ids(root / "swapped" / "tokenizer.json", "cat", "dog")
  dirs["swapped"] = root / "swapped"
  return dirs


def test_fingerprint_is_tokenizer_content(tiny, tmp_path):
  ids = {k: vocab.identify(d, 64) for k, d in tiny.items()}
  assert ids["base"].fingerprint == ids["padded"].fingerprint == ids["other"].fingerprint
  assert ids["swapped"].fingerprint != ids["base"].fingerprint
  assert ids["base"] == ids["padded"] and ids["base"].size == 64
  # BOS/EOS choices and max length (tokenizer_config.json) are not the vocabulary
  shutil.copytree(tiny["base"], tmp_path / "cfg")
  conf = tmp_path / "cfg" / "tokenizer_config.json"
  conf.write_text(json.dumps(dict(json.loads(conf.read_text()), model_max_length=7,
                                  eos_token="<eot>")))
  assert vocab.identify(tmp_path / "cfg", 64) == ids["base"]


def test_recorded_fingerprint_is_reused_until_the_files_change(tiny, tmp_path, monkeypatch):
  d = shutil.copytree(tiny["base"], tmp_path / "m")
  rec = json.loads((d / vocab.FINGERPRINT_FILE).read_text())
  assert rec["fingerprint"] == vocab.identify(tiny["base"], 64).fingerprint
  calls = []
  content = vocab._content
  monkeypatch.setattr(vocab, "_content", lambda p: calls.append(p) or content(p))
  vocab.identify(d, 64)
  assert calls == []  # read from the record
  swap_ids(d / "tokenizer.json", "cat", "dog")  # edited after the record was written
  assert vocab.identify(d, 64).fingerprint == vocab.identify(tiny["swapped"], 64).fingerprint
  assert len(calls) == 2
  (d / vocab.FINGERPRINT_FILE).unlink()  # an old directory without the record
  assert vocab.identify(d, 64).fingerprint == vocab.identify(tiny["swapped"], 64).fingerprint


def test_padded_tiny_model_decodes_like_the_unpadded(tiny):
  base, padded, other = (load_model(tiny[k]) for k in ("base", "padded", "other"))
  assert padded.config.vocab_size == 72 and vocab.of(padded).size == 64
  check_padded_pair(base, padded, other, PROMPT, LENGTH, N)


def test_different_tokenizers_are_refused_at_equal_size(tiny, capsys):
  base, swapped = load_model(tiny["base"]), load_model(tiny["swapped"])
  assert base.config.vocab_size == swapped.config.vocab_size
  for call in (lambda: decode(base, PROMPT, LENGTH, method="sd", draft=swapped, max_new_tokens=2),
               lambda: decode([base, swapped], PROMPT, LENGTH, method="se", max_new_tokens=2),
               lambda: decode([swapped, base], PROMPT, LENGTH, method="ensemble",
                              max_new_tokens=2)):
    with pytest.raises(ValueError, match="different tokenizers") as e:
      call()
    assert str(tiny["swapped"]) in str(e.value) and str(tiny["base"]) in str(e.value)
    assert "cross-tokenizer CoSD" in str(e.value) and "--method cosd" in str(e.value)
  code = main(["generate", "--model", str(tiny["base"]), "--draft", str(tiny["swapped"]),
               "--method", "sd", "--prompt-ids", "9,10", "--max-new-tokens", "2"])
  err = capsys.readouterr().err
  assert code == 2 and "different tokenizers" in err and str(tiny["swapped"]) in err
  assert "--method cosd" in err


def test_models_without_tokenizers_pair_by_table_size():
  a, b = create_model(config()), create_model(config(vocab=72))
  assert vocab.check_shared([a, create_model(config(), seed=1)]) == 64
  with pytest.raises(ValueError, match="different vocabulary sizes"):
    vocab.check_shared([a, b])


# ---- SmolLM2-135M-Instruct ---------------------------------------------------------------------

def first_layers(model: Model, n: int) -> Model:
  """`model` cut to its first n layers (embedding, norm and head kept)."""
  types = model.config.layer_types
  cfg = dataclasses.replace(model.config, num_layers=n, layer_types=types and types[:n])
  params = nnx.to_pure_dict(unrolled(model).params)  # [d_in, d_out] kernels, as `cfg` builds them
  params["layers"] = {i: params["layers"][i] for i in range(n)}
  abstract = abstract_model(cfg, model.dtype)
  nnx.replace_by_pure_dict(abstract.params, params)
  return Model(config=cfg, graphdef=abstract.graphdef, params=abstract.params)


@pytest.mark.real
def test_padded_smollm2_decodes_like_smollm2(real_smollm2, tmp_path):
  """SmolLM2's real tokenizer, embedding table and head; its first 2 of 30 layers (the pairing
  is about the vocabulary, and each method compiles 2 layers instead of 30)."""
  base = save_model(first_layers(load_model(real_smollm2), 2), tmp_path / "base",
                    tokenizer_dir=real_smollm2)
  base = load_model(base)
  prompt, length = np.array([[1, 4093, 198, 1780, 314, 260, 3575]], np.int32), np.array([7])
  greedy = decode(base, prompt, length, max_new_tokens=6, temperature=0).to_lists()[0]
  padded = save_model(padded_copy(base, 64, greedy), tmp_path / "padded",
                      tokenizer_dir=real_smollm2)
  padded = load_model(padded)
  assert padded.config.vocab_size == 49216 and vocab.of(padded) == vocab.of(base)
  assert vocab.of(base) == vocab.of(load_model(real_smollm2))
  check_padded_pair(base, padded, base, prompt, length, 6, full=False)


@pytest.mark.real
def test_smollm2_with_two_ids_swapped_is_refused(real_smollm2, tmp_path):
  swapped = tmp_path / "swapped"
  swapped.mkdir()
  for f in real_smollm2.iterdir():  # the weights are shared, the tokenizer is copied and edited
    (swapped / f.name).symlink_to(f) if f.name in (PARAMS_DIR, CONFIG_FILE) else shutil.copy(
        f, swapped / f.name)
  swap_ids(swapped / "tokenizer.json", "the", "Ġthe")
  base, other = load_model(real_smollm2), load_model(swapped)
  assert base.config.vocab_size == other.config.vocab_size == 49152
  with pytest.raises(ValueError, match="different tokenizers") as e:
    decode(base, np.array([[1, 2]], np.int32), np.array([2]), method="sd", draft=other,
           max_new_tokens=2)
  assert str(swapped) in str(e.value) and "--method cosd" in str(e.value)
