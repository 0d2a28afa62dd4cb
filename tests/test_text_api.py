"""`generate_text`: strings and chat conversations in one ragged batch, tokenized as transformers
does it (BOS rule, chat template), decoded with any method, stopped at every declared EOS id and
the template's end-of-turn token, returned as text without the stop token; prompt widths bucketed
so new prompts reuse the compiled program."""

import dataclasses
import json

import numpy as np
import pytest

from jax_specens import create_model, decode, generate_text, load_model, load_tokenizer, text
from jax_specens.checkpoint import save_model
from jax_specens.decoding import api as decoding_api
from tests.decode_models import config, scaled
from tests.fixtures_real import gguf_parsed_once

WORDS = "the cat sat on a mat and dog ran far away to big red house".split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<eot>", "<unk>", "<system>", "<user>", "<assistant>"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eot> {% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
N = 8


def ids(*tokens):
  vocab = SPECIAL + WORDS
  return [vocab.index(t) for t in tokens]


def save_tokenizer(directory, chat_template=TEMPLATE):
  """A word-level tokenizer that prepends <bos> (like Llama/Gemma) and has a chat template whose
  turns end with the special token <eot> (not declared as EOS anywhere)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
  vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
      ("<bos>", vocab["<bos>"])])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>",
                                 additional_special_tokens=SPECIAL[3:4] + SPECIAL[5:])
  fast.chat_template = chat_template
  fast.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  save_tokenizer(root / "tok")
  cfg = dataclasses.replace(config(), eos_token_ids=(ids("<eos>")[0],))
  d = save_model(scaled(create_model(cfg, seed=0), 15.0), root / "m", tokenizer_dir=root / "tok")
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 40]}))
  return d


def test_bucket_widths():
  assert [text.bucket(n) for n in (1, 31, 32, 33, 64, 65, 200)] == [32, 32, 32, 64, 64, 128, 256]


def test_encode_applies_bos_and_chat_template_as_transformers(model_dir):
  tok = load_tokenizer(model_dir)
  conv = [{"role": "user", "content": "the cat"}]
  rows = text.encode(tok, ["the cat", conv])
  assert rows == [ids("<bos>", "the", "cat"),  # __call__: the BOS post-processor
                  ids("<user>", "the", "cat", "<eot>", "<assistant>")]  # template: no extra BOS
  assert rows == [tok("the cat")["input_ids"], tok.apply_chat_template(
      conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
  # chat=True: every string is one user message, after the system message
  assert text.encode(tok, ["the cat"], chat=True, system="a dog") == [
      ids("<system>", "a", "dog", "<eot>", "<user>", "the", "cat", "<eot>", "<assistant>")]


def test_stop_ids_are_every_declared_eos_and_the_end_of_turn(model_dir):
  model, tok = load_model(model_dir), load_tokenizer(model_dir)
  assert text.end_of_turn_ids(tok) == ids("<eot>")
  # config.json EOS, generation_config.json's list, the tokenizer's EOS; + <eot> for chat
  assert text.stop_ids([model], tok) == [2, 40]
  assert text.stop_ids([model], tok, chat=True) == sorted([2, 40] + ids("<eot>"))


def test_ragged_batch_of_text_and_chat_equals_decode(model_dir):
  model, tok = load_model(model_dir), load_tokenizer(model_dir)
  conv = [{"role": "system", "content": "big red"}, {"role": "user", "content": "a dog ran"}]
  inputs = ["the cat sat on", conv, "a"]
  out = generate_text(model, inputs, max_new_tokens=N, temperature=0)
  rows = text.encode(tok, inputs)
  assert out.prompt_ids == rows
  stops = text.stop_ids([model], tok, chat=True)  # a conversation in the batch: <eot> stops too
  prompts, lengths = text.pad(rows)
  ref = decode(model, prompts, lengths, max_new_tokens=N, temperature=0, stop_ids=stops)
  assert out.token_ids == ref.to_lists()
  assert out.finish_reasons == ref.finish_reasons()
  for t, ids_, reason in zip(out.texts, out.token_ids, out.finish_reasons):
    assert (ids_[-1] in stops) == (reason == "stop")
    assert t == tok.decode(ids_[:-1] if reason == "stop" else ids_, skip_special_tokens=True)
  assert out.stats["model_calls"] == [max(len(t) for t in out.token_ids)]
  d = out.to_dict()
  assert set(d) == {"texts", "tokens", "lengths", "finish_reasons", "stats"}


def test_stops_at_a_stop_id_and_drops_it_from_the_text(model_dir):
  model, tok = load_model(model_dir), load_tokenizer(model_dir)
  free = generate_text(model, ["the cat sat on"], max_new_tokens=N, temperature=0, stop=False)
  toks = free.token_ids[0]
  assert free.finish_reasons == ["length"] and len(toks) == N
  stop_at = toks[2]
  first = toks.index(stop_at)
  out = generate_text(model, ["the cat sat on"], max_new_tokens=N, temperature=0,
                      extra_stop_ids=[stop_at])
  assert out.token_ids == [toks[:first + 1]] and out.finish_reasons == ["stop"]
  assert out.texts == [tok.decode(toks[:first], skip_special_tokens=True)]


def test_speculative_methods_through_the_text_api(model_dir):
  model = load_model(model_dir)
  other = model.replace(params=scaled(model, 0.9).params)
  ar = generate_text(model, ["the cat", "a dog ran far"], max_new_tokens=N, temperature=0)
  sd = generate_text(model, ["the cat", "a dog ran far"], method="sd", draft=other, gamma=3,
                     max_new_tokens=N, temperature=0)
  assert sd.token_ids == ar.token_ids and sd.texts == ar.texts
  se = generate_text([model, other], ["the cat"], method="se", gamma=2, max_new_tokens=N,
                     temperature=0)
  ens = generate_text([model, other], ["the cat"], method="ensemble", max_new_tokens=N,
                      temperature=0)
  assert se.token_ids == ens.token_ids


def test_new_prompts_in_a_bucket_do_not_recompile(model_dir):
  model = load_model(model_dir)
  n = N + 3  # a max_new_tokens (static) no other test uses: the program count starts clean
  programs = decoding_api._generate._cache_size
  generate_text(model, ["the cat"], max_new_tokens=n, temperature=0)
  before = programs()
  for prompt in ("a", "the cat sat on a mat and dog ran far away", "red house"):
    generate_text(model, [prompt], max_new_tokens=n, temperature=0)
  assert programs() == before
  generate_text(model, [" ".join(WORDS * 3)], max_new_tokens=n, temperature=0)  # 45 > 32
  assert programs() == before + 1


def test_the_tokenizer_beside_a_model_is_loaded_once_until_its_files_change(model_dir, tmp_path):
  import os
  import shutil
  d = shutil.copytree(model_dir, tmp_path / "copy")
  first = text.tokenizer_of(load_model(d))
  assert text.tokenizer_of(load_model(d)) is first  # generate_text calls: one load
  path = d / "tokenizer_config.json"
  conf = json.loads(path.read_text())
  path.write_text(json.dumps({**conf, "model_max_length": 7}))
  os.utime(path, ns=(1, 1))  # a changed file, whatever the clock's resolution
  second = text.tokenizer_of(load_model(d))
  assert second is not first and second.model_max_length == 7


def test_bad_inputs(model_dir, tmp_path):
  model = load_model(model_dir)
  with pytest.raises(ValueError, match=r"wrap one string as \[text\]"):
    generate_text(model, "the cat", max_new_tokens=2)
  with pytest.raises(ValueError, match="system message needs the chat template"):
    generate_text(model, ["the cat"], system="be brief", max_new_tokens=2)
  save_tokenizer(tmp_path / "plain", chat_template=None)
  plain = save_model(model, tmp_path / "m", tokenizer_dir=tmp_path / "plain")
  with pytest.raises(ValueError, match="no chat template"):
    generate_text(load_model(plain), ["the cat"], chat=True, max_new_tokens=2)
  with pytest.raises(ValueError, match="none of the models has tokenizer files"):
    generate_text(create_model(config()), ["the cat"], max_new_tokens=2)


@pytest.mark.real
def test_real_tokenization_equals_the_gguf_tokenizer(real_smollm2, smollm2_gguf, real_gemma3):
  """Our converted directory's tokenizer encodes text and chat exactly like transformers' own
  tokenizer of the GGUF file; Gemma 3 prepends <bos> to plain text."""
  from transformers import AutoTokenizer
  with gguf_parsed_once():
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
  tok = load_tokenizer(real_smollm2)
  conv = [{"role": "user", "content": "What is the capital of France?"}]
  got = text.encode(tok, ["Hello world", conv, conv], system=None)
  assert got[0] == ref("Hello world")["input_ids"]
  assert got[1] == got[2] == list(ref.apply_chat_template(
      conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
  # the end of turn, and <|endoftext|>: the GGUF import keeps llama.cpp's end-of-generation set
  assert text.stop_ids([load_model(real_smollm2)], tok, chat=True) == sorted(
      tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
  gemma = load_tokenizer(real_gemma3)
  assert text.encode(gemma, ["Hello"])[0][0] == gemma.bos_token_id == 2
  assert np.all(np.diff([len(r) for r in text.encode(gemma, ["a", "a b c"])]) > 0)
