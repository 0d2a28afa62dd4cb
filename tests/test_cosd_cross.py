"""Cross-tokenizer CoSD: two tiny models whose BPE tokenizers (trained here, offline) differ."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from jax_specens.cache import init_cache
from jax_specens.checkpoint import save_model
from jax_specens.cli.main import main
from jax_specens.fusion import ConstantVerifier, RuleVerifier, SidePrompts, cosd_text
from jax_specens.fusion.cross_rows import Row, Side
from jax_specens.models.model import create_model
from jax_specens.step import forward
from tests.fixtures_fusion import tiny_config

K = 3
NEW = 12
WIDTH = 48  # reference forward width
CORPUS_A = ["the cat sat on the mat and the dog ran to the park"] * 20 + ["a cat, a dog; a mat."]
CORPUS_B = ["dogs and cats like to nap in the sun on a warm mat"] * 20 + ["sun, nap; cats ran!"]
PROMPTS = ["the cat", "a dog ran", "sun"]
ALPHABET = set(string.ascii_lowercase + " ,;.!")


def bpe_tokenizer(directory, corpus, vocab_size):
  """A byte-level BPE over ALPHABET only (so every token is ASCII text and both tokenizers can
  spell every text the other writes)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  alphabet = sorted(ALPHABET - {" "}) + ["\u0120"]  # byte-level BPE writes a space as "Ġ"
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size,
                                                      special_tokens=["<eos>"],
                                                      initial_alphabet=alphabet))
  directory.mkdir()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}))
  return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def tiny_cross_pair(root):
  """A tiny draft and assistant with two different byte-level BPE tokenizers (trained under
  root/d and root/a): (draft, assistant, draft tokenizer, assistant tokenizer)."""
  tok_d = bpe_tokenizer(root / "d", CORPUS_A, 60)
  tok_a = bpe_tokenizer(root / "a", CORPUS_B, 90)
  draft = create_model(tiny_config(vocab=len(tok_d), tie_embeddings=False), seed=3)
  assistant = create_model(tiny_config(vocab=len(tok_a), tie_embeddings=False), seed=4)
  return draft, assistant, tok_d, tok_a


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("cross")
  draft, assistant, tok_d, tok_a = tiny_cross_pair(root)
  save_model(draft, root / "draft", tokenizer_dir=root / "d")
  save_model(assistant, root / "assistant", tokenizer_dir=root / "a")
  return draft, assistant, tok_d, tok_a, root


@jax.jit
def _last_logits(model, ids, length):
  cache = init_cache(model.config, 1, WIDTH)
  logits, _ = forward(model, cache, ids[None], jnp.zeros((1,), jnp.int32))
  return logits[0, length - 1]


def greedy_text(model, tok, prompt):
  """The model's own greedy continuation (NEW tokens) of a string or of prompt ids, decoded."""
  ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
  base = tok.decode(ids, skip_special_tokens=True)
  for _ in range(NEW):
    padded = jnp.asarray(np.pad(ids, (0, WIDTH - len(ids))), jnp.int32)
    ids = ids + [int(jnp.argmax(_last_logits(model, padded, len(ids))))]
  return tok.decode(ids, skip_special_tokens=True)[len(base):]


def test_the_tokenizers_differ(pair):
  _, _, tok_d, tok_a, _ = pair
  assert len(tok_d) != len(tok_a)
  assert tok_d.convert_ids_to_tokens(tok_d("the cat sat")["input_ids"]) != \
      tok_a.convert_ids_to_tokens(tok_a("the cat sat")["input_ids"])


def test_cross_tokenizer_cosd_produces_valid_text(pair):
  draft, assistant, tok_d, tok_a, _ = pair
  out = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS, max_new_tokens=NEW, window=K,
                  temperature=0.0, verifier=RuleVerifier(jnp.float32(0.9), jnp.float32(0.5)))
  assert len(out.texts) == len(PROMPTS)
  for text, reason, st in zip(out.texts, out.finish, out.stats):
    assert isinstance(text, str) and text and set(text) <= ALPHABET, text
    # the text survives both tokenizers
    for tok in (tok_d, tok_a):
      assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    if reason == "length":
      assert st.draft_tokens + st.assistant_tokens == NEW
    assert st.assistant_calls == st.windows and st.draft_calls == K * st.windows
    assert st.replacements == st.assistant_tokens  # no bonus tokens
  # these random models are unsure everywhere: the assistant's text gets in
  assert sum(st.replacements for st in out.stats) > 0


def test_never_replacing_gives_the_drafts_own_text(pair):
  draft, assistant, tok_d, tok_a, _ = pair
  out = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS, max_new_tokens=NEW, window=K,
                  temperature=0.0, verifier=RuleVerifier(jnp.float32(0.0), jnp.float32(0.5)))
  assert out.texts == [greedy_text(draft, tok_d, p) for p in PROMPTS]
  assert all(st.replacements == 0 and st.draft_tokens == NEW for st in out.stats)


def test_each_model_can_read_its_own_prompt(pair, monkeypatch):
  """SidePrompts: the draft reads a conversation through its chat template, the assistant plain
  text; the shared text starts empty. Never replacing gives the draft's own greedy answer to its
  templated prompt; the assistant's prompt changes what it replaces, never the prompt tokens."""
  draft, assistant, tok_d, tok_a, _ = pair
  monkeypatch.setattr(tok_d, "chat_template", "{% for m in messages %}<eos>{{ m['content'] }}: "
                      "{% endfor %}", raising=False)
  chat = [{"role": "user", "content": "the cat"}]
  templated = tok_d.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
  assert templated[0] == tok_d.convert_tokens_to_ids("<eos>")  # a special token in the prompt
  kw = dict(max_new_tokens=NEW, window=K, temperature=0.0)
  never = cosd_text(draft, assistant, tok_d, tok_a, [SidePrompts(chat, "dogs and")],
                    verifier=ConstantVerifier(False), **kw)
  assert never.texts == [greedy_text(draft, tok_d, templated)]
  always = {p: cosd_text(draft, assistant, tok_d, tok_a, [SidePrompts(chat, p)],
                         verifier=ConstantVerifier(True), **kw) for p in ("dogs and", "sun, nap;")}
  assert all(o.stats[0].replacements > 0 and set(o.texts[0]) <= ALPHABET
             for o in always.values())
  assert always["dogs and"].texts != always["sun, nap;"].texts
  # the prompt tokens span no text: the row's assistant sequence starts with them, unchanged
  row = Row(Side(draft, tok_d, "draft"), Side(assistant, tok_a, "assistant"),
            SidePrompts(chat, "sun, nap;"))
  own = tok_a("sun, nap;")["input_ids"]
  plan = row.assistant_plan(np.asarray(tok_d(" the cat")["input_ids"][:K]))
  assert plan.start == 0 and plan.feed[:len(own)] == own and row.a.ids[:len(own)] == own
  assert row.d.ids == templated and row.text == b"" and row.a.text.startswith(b" the")


def test_sampled_and_bonus_cross_cosd(pair):
  draft, assistant, tok_d, tok_a, _ = pair
  kw = dict(max_new_tokens=NEW, window=K, temperature=1.0, verifier=ConstantVerifier(True))
  a = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS[:1], key=jax.random.key(1), **kw)
  b = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS[:1], key=jax.random.key(1), **kw)
  assert a.texts == b.texts and set(a.texts[0]) <= ALPHABET
  # the key reaches every row's drafts: other keys give other texts (never replacing, so the
  # text is the draft's own samples)
  keep = dict(kw, verifier=ConstantVerifier(False))
  texts = {k: cosd_text(draft, assistant, tok_d, tok_a, PROMPTS[:2] * 2, key=jax.random.key(k),
                        **keep).texts for k in (1, 2)}
  assert all(x != y for x, y in zip(texts[1], texts[2])), texts
  assert texts[1][:2] != texts[1][2:]  # and rows of one batch draw independently
  never = cosd_text(draft, assistant, tok_d, tok_a, PROMPTS[:1], bonus=True, max_new_tokens=NEW,
                    window=K, temperature=0.0, verifier=ConstantVerifier(False))
  st = never.stats[0]
  assert st.replacements == 0 and st.assistant_tokens == st.windows - (NEW % (K + 1) != 0)


def test_cross_bad_inputs(pair):
  draft, assistant, tok_d, tok_a, _ = pair
  with pytest.raises(ValueError, match="needs the assistant's Hugging Face tokenizer"):
    cosd_text(draft, assistant, tok_d, None, "the", max_new_tokens=4)
  with pytest.raises(ValueError, match=f"assistant's tokenizer has {len(tok_a)} tokens but its "
                     f"model only {len(tok_d)}"):
    cosd_text(draft, draft, tok_d, tok_a, "the", max_new_tokens=4)
  with pytest.raises(ValueError, match="non-empty strings"):
    cosd_text(draft, assistant, tok_d, tok_a, [""], max_new_tokens=4)
  with pytest.raises(ValueError, match="unknown verifier 'oracle'"):
    cosd_text(draft, assistant, tok_d, tok_a, "the", max_new_tokens=4, verifier="oracle")
  with pytest.raises(ValueError, match="window must be >= 1"):
    cosd_text(draft, assistant, tok_d, tok_a, "the", max_new_tokens=4, window=0)


def test_generate_cli_switches_to_cross_tokenizer_mode(pair, capsys):
  draft, _, tok_d, _, root = pair
  args = ["generate", "--method", "cosd", "--draft", str(root / "draft"), "--model",
          str(root / "assistant"), "--max-new-tokens", str(NEW), "--window", str(K),
          "--temperature", "0", "--alpha", "0"]
  assert main(args + ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json"]) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["texts"] == [greedy_text(draft, tok_d, p) for p in PROMPTS[:2]]
  assert [s["replacements"] for s in got["stats"]] == [0, 0]
  assert main(args + ["--prompt-ids", "1,2"]) == 2
  assert "different tokenizers: give text with --prompt" in capsys.readouterr().err
  # --chat: each model through its own chat template; these tokenizers have none
  assert main(args + ["--prompt", PROMPTS[0], "--chat"]) == 2
  assert "has no chat template" in capsys.readouterr().err
