"""A fixed, offline held-out set for measuring fusion on real models: code, prose and QA.

Three domains, each split by document into a `fusion` part (verifiers are trained on it) and a
`test` part (only ever scored), once and deterministically:

- **code**: Python standard library sources without docstrings, and **prose**: their docstrings,
  the language reference topics and the stdlib's text files, both read by
  `jax_specens.builtin.data` (whose split, a hash of each file's key, decides the part: its
  `fusion` split here, its `test` split here). Each document is cut to one excerpt of at most
  `max_bytes` UTF-8 bytes at line boundaries, starting at the first `def`/`class` for code.
- **qa**: short questions with known short answers, written once below (`QA`); a hash of the
  question decides its part (`QA_TEST_PERCENT` percent go to `test`).

Nothing is downloaded; the code and prose depend only on this interpreter's standard library.
"""

from __future__ import annotations

import dataclasses
import re

from jax_specens.builtin import data as stdlib_data

DOMAINS = ("code", "prose", "qa")
PARTS = ("fusion", "test")
QA_TEST_PERCENT = 60

# (question, accepted answers): the first answer is the reference the teacher-forced text uses.
QA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 3 plus 5?", ("8", "eight")),
    ("What is 10 minus 3?", ("7", "seven")),
    ("What is 6 times 7?", ("42", "forty-two", "forty two")),
    ("What is 9 times 9?", ("81", "eighty-one", "eighty one")),
    ("What is 12 times 12?", ("144",)),
    ("What is 100 divided by 4?", ("25", "twenty-five", "twenty five")),
    ("What is half of 50?", ("25", "twenty-five", "twenty five")),
    ("How many days are in a week?", ("7", "seven")),
    ("How many months are in a year?", ("12", "twelve")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of big?", ("small", "little")),
    ("What is the opposite of fast?", ("slow",)),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of open?", ("closed", "close", "shut")),
    ("What color is grass?", ("green",)),
    ("What color is snow?", ("white",)),
    ("What color is a banana?", ("yellow",)),
    ("What color do you get by mixing blue and yellow?", ("green",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the closest star to the Earth?", ("the Sun", "sun")),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What gas do plants take in from the air?", ("carbon dioxide", "CO2")),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("What is the boiling point of water in degrees Celsius?", ("100", "one hundred")),
    ("Who wrote Romeo and Juliet?", ("William Shakespeare", "Shakespeare")),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci", "Leonardo")),
    ("What is the largest ocean on Earth?", ("the Pacific Ocean", "Pacific")),
    ("What is the longest river in Africa?", ("the Nile", "Nile")),
    ("What is the tallest mountain in the world?", ("Mount Everest", "Everest")),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is the past tense of go?", ("went",)),
    ("What animal is known as the king of the jungle?", ("the lion", "lion")),
    ("What do bees make?", ("honey",)),
    ("What is frozen water called?", ("ice",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is the first letter of the English alphabet?", ("A",)),
    ("Which keyword defines a function in Python?", ("def",)),
    ("What does the Python function len return for the list [1, 2, 3]?", ("3", "three")),
    ("Which Python keyword leaves a loop early?", ("break",)),
)


@dataclasses.dataclass(frozen=True)
class Item:
  """One held-out document. `text` is the teacher-forced reference; positions before byte
  `scored_from` are context only (a QA item scores its answer). QA items also carry the
  `prompt` a model answers and the accepted `answers`."""

  key: str
  domain: str
  text: str
  scored_from: int = 0
  prompt: str = ""
  answers: tuple[str, ...] = ()


def qa_prompt(question: str) -> str:
  """The plain-text prompt every model (and CoSD) answers: no chat template, no examples."""
  return f"Question: {question}\nAnswer:"


def part_of(key: str, test_percent: int) -> str:
  return "test" if stdlib_data.hash_percent(key) < test_percent else "fusion"


def excerpt(text: str, max_bytes: int, code: bool) -> str:
  """Whole lines from the first `def`/`class` line (code) or the start, up to `max_bytes`."""
  lines = text.splitlines(keepends=True)
  if code:
    first = next((n for n, line in enumerate(lines) if re.match(r"\s*(def|class) ", line)), 0)
    lines = lines[first:]
  out, size = [], 0
  for line in lines:
    n = len(line.encode())
    if size + n > max_bytes:
      break
    out.append(line)
    size += n
  if not out and lines:  # one very long first line: whole characters up to max_bytes
    out = [lines[0].encode()[:max_bytes].decode(errors="ignore")]
  return "".join(out).rstrip() + "\n"


def items(domain: str, part: str, limit: int | None = None, max_bytes: int = 600) -> list[Item]:
  """The first `limit` documents of `domain` in `part` ("fusion" or "test"), in key order."""
  if domain not in DOMAINS or part not in PARTS:
    raise ValueError(f"unknown domain/part {domain!r}/{part!r}; domains: {', '.join(DOMAINS)}; "
                     f"parts: {', '.join(PARTS)}")
  if domain == "qa":
    out = []
    for question, answers in QA:
      if part_of(question, QA_TEST_PERCENT) != part:
        continue
      prompt = qa_prompt(question)
      out.append(Item(question, "qa", f"{prompt} {answers[0]}", len(prompt.encode()), prompt,
                      answers))
  else:
    out = []
    for doc in stdlib_data.documents(domain, part):
      text = excerpt(doc.text, max_bytes, domain == "code")
      if len(text.strip()) >= 40:
        out.append(Item(doc.key, domain, text))
      if limit is not None and len(out) >= limit:
        break
  return out[:limit]


def normalize(text: str) -> str:
  """Lower case, punctuation as spaces, single spaces."""
  return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def exact_match(generated: str, answers: tuple[str, ...]) -> bool:
  """Whether an accepted answer appears, as whole words, in the first non-empty line written."""
  line = next((s for s in generated.strip().splitlines() if s.strip()), "")
  got = f" {normalize(line)} "
  return any(f" {normalize(a)} " in got for a in answers)
