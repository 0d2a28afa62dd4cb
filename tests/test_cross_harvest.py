"""The cross-tokenizer teacher-forced harvest sees what cross-tokenizer CoSD sees at decode time.

Specification: on a text the draft wrote itself, every verifiable position of `cosd_text` (a draft
token starting where an assistant token starts) is a harvested position at the same byte offset,
with the same features (the verifier's input), and is labelled keep; alignment is by byte
offsets, so a draft token inside an assistant token is never a position.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_specens.checkpoint import load_model, load_tokenizer, save_model
from jax_specens.cli.main import main
from jax_specens.fusion import cosd_text
from jax_specens.fusion import cross_rows
from jax_specens.fusion.cross_harvest import aligned_positions, harvest_cross, segments
from jax_specens.fusion.token_text import TokenText, token_bytes
from tests.test_cosd_cross import CORPUS_A, CORPUS_B, tiny_cross_pair


@flax.struct.dataclass
class Spy:
  """A verifier that never replaces and records every feature array it is shown (host side)."""

  def scores(self, features):
    return jnp.zeros(features.shape[:-1], jnp.float32)

  def __call__(self, features):
    jax.debug.callback(lambda f: SEEN.append(np.asarray(f)), features)
    return jnp.zeros(features.shape[:-1], bool)


SEEN: list = []


def decode_time_features(pair, prompt: str, new: int, k: int, monkeypatch):
  """(prompt + the text cosd_text wrote, the draft's ids of it, {byte offset: (assistant token
  there, features)}) for one prompt, from what its verifier was shown at each verifiable
  position."""
  draft, assistant, tok_d, tok_a = pair
  plans = []
  plan = cross_rows.Row.assistant_plan
  monkeypatch.setattr(cross_rows.Row, "assistant_plan",
                      lambda self, drafts: plans.append(plan(self, drafts)) or plans[-1])
  SEEN.clear()
  out = cosd_text(draft, assistant, tok_d, tok_a, [prompt], max_new_tokens=new, window=k,
                  temperature=0.0, verifier=Spy())
  assert len(SEEN) == len(plans)
  seen, ids = {}, list(tok_d(prompt)["input_ids"])
  for p, f in zip(plans, SEEN):
    end = k if p.stop_at is None else p.stop_at
    ids += [int(x) for x in p.drafts[:end]]
    for j in range(end):
      if p.index[j] is not None:
        seen[p.offsets[j]] = (int(p.own[j]), f[0, j])
  return prompt + out.texts[0], ids, seen


def check_harvest_matches_decode(pair, prompt, new, k, monkeypatch, min_share=0.75):
  """new: a multiple of k (every window whole, so the ids of all windows are the text)."""
  draft, assistant, tok_d, tok_a = pair
  reference, ids, seen = decode_time_features(pair, prompt, new, k, monkeypatch)
  got = harvest_cross(draft, assistant, tok_d, tok_a, [reference], draft_ids=[ids],
                      scored_from=[len(prompt.encode())], progress=False)
  at = {int(o): n for n, o in enumerate(got.offset)}
  ref_a = TokenText.encode(tok_a, reference)
  same = [o for o, (own, _) in seen.items()
          if o in at and ref_a.ids[ref_a.index_at(o)] == own]
  # a decode-time assistant token at a window's end can still grow with the next window's text
  assert len(same) >= min_share * len(seen) > 0, (len(same), len(seen))
  for o in same:
    np.testing.assert_allclose(got.harvest.features[at[o]], seen[o][1], rtol=1e-3, atol=1e-4,
                               err_msg=f"features at byte {o}")
  # the draft wrote these tokens greedily: its top token is the reference's everywhere: keep
  assert got.draft_ok.all() and (got.harvest.labels == 0).all()
  assert set(at) >= set(seen)  # every position decoding could verify was harvested
  return got


# ---- tiny pair: two byte-level BPE tokenizers trained here --------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  return tiny_cross_pair(tmp_path_factory.mktemp("harvest"))


def test_positions_are_draft_tokens_that_start_where_an_assistant_token_starts(tiny_pair):
  _, _, tok_d, tok_a = tiny_pair
  text = "the cat sat on the mat and dogs nap in the sun"
  d, a = TokenText.encode(tok_d, text), TokenText.encode(tok_a, text)
  starts_a = {a.start(i) for i in range(len(a.ids))}
  want = [(j, a.index_at(d.start(j))) for j in range(1, len(d.ids)) if d.start(j) in starts_a]
  got = aligned_positions(d, a)
  assert got == want and 0 < len(got) < len(d.ids) - 1  # the tokenizers differ somewhere
  for j, i in got:
    assert token_bytes(tok_d)[d.ids[j]][:1] == token_bytes(tok_a)[a.ids[i]][:1]
  assert all(d.start(j) >= 20 for j, _ in aligned_positions(d, a, scored_from=20))


def test_segments_cut_at_line_ends_and_keep_offsets():
  text = "def f(x):\n    return x\n\n# é comment that is long\nz = 1\n"
  pieces = segments(text, 24)
  data = text.encode()
  for piece, start in pieces:
    assert len(piece.encode()) <= 24 and data[start:start + len(piece.encode())] == piece.encode()
  assert "".join(p for p, _ in pieces).replace("\n", "") == text.replace("\n", "")


def test_harvest_matches_decode_time_features_tiny(tiny_pair, monkeypatch):
  got = check_harvest_matches_decode(tiny_pair, "the cat", 15, 3, monkeypatch)
  assert len(got) > 3


def test_train_fusion_cli_on_a_cross_pair_refuses_weights_and_bad_sizes(tiny_pair, tmp_path,
                                                                        capsys):
  draft, assistant, tok_d, tok_a = tiny_pair
  for name, model, tok in (("draft", draft, tok_d), ("assistant", assistant, tok_a)):
    tok.save_pretrained(tmp_path / f"{name}_tok")
    save_model(model, tmp_path / name, tokenizer_dir=tmp_path / f"{name}_tok")
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(CORPUS_A[:3] + CORPUS_B[:3]))
  base = ["train-fusion", "--draft", str(tmp_path / "draft"), "--model",
          str(tmp_path / "assistant"), "--data", str(corpus), "--out", str(tmp_path / "o"),
          "--quiet"]
  for extra, message in ((["--head", "weights"], "use --head verifier"),
                         (["--max-bytes", "8"], "--max-bytes must be >= 16")):
    assert main(base + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- the real pair -----------------------------------------------------------------------------

@pytest.mark.real
def test_harvest_matches_decode_time_features_real(real_smollm2, real_gemma3, monkeypatch):
  # layers scanned: each program compiles one block per layer kind (as tests/test_cosd_cross_real)
  pair = (load_model(real_smollm2, scan_layers=True), load_model(real_gemma3, scan_layers=True),
          load_tokenizer(real_smollm2), load_tokenizer(real_gemma3))
  got = check_harvest_matches_decode(pair, "The capital of France is", 16, 4, monkeypatch)
  assert len(got) >= 8
