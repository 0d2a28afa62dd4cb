"""Chat prompts shipped for distillation: the target answers them, the draft learns its answers.

Prompts are built from templates x topics (a mix of programming, science and everyday questions,
the kind of chat an instruct model is used for). Each prompt is a document of the held-out split
rule of `jax_specens.builtin.data.split_of` (key `chat:<prompt>`): prompts in its `test` split
are never trained on and serve as the held-out chat prompts of every measurement.
"""

from __future__ import annotations

from jax_specens.builtin.data import split_of

TOPICS = (
    "recursion", "a hash table", "binary search", "the Python GIL", "list comprehensions",
    "decorators in Python", "a linked list", "Big O notation", "unit tests", "git branches",
    "photosynthesis", "the water cycle", "gravity", "black holes", "climate change", "vaccines",
    "the French Revolution", "the Roman Empire", "democracy", "inflation", "compound interest",
    "healthy sleep", "a balanced diet", "meditation", "time management", "learning a language",
    "the solar system", "volcanoes", "earthquakes", "electric cars", "solar panels",
    "machine learning", "neural networks", "the internet", "encryption", "passwords",
    "cloud computing", "databases", "SQL joins", "regular expressions", "sorting algorithms",
    "the theory of evolution", "DNA", "the immune system", "the human heart", "bees",
    "coffee", "tea", "chess", "football", "music theory", "poetry", "Shakespeare", "the moon",
    "rainbows", "the ocean tides", "a job interview", "public speaking", "writing an email",
    "recycling", "electricity", "magnets", "prime numbers", "fractions", "the Pythagorean theorem",
)

TEMPLATES = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "How would you explain {t} to a child?",
)

CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the words in a sentence", "merges two sorted lists",
    "removes duplicates from a list", "finds the largest element of a list",
    "converts Celsius to Fahrenheit", "checks whether a string is a palindrome",
    "flattens a nested list", "sums the digits of an integer", "reads a file and counts its lines",
    "sorts a dictionary by value", "computes the mean of a list of numbers",
    "returns the greatest common divisor of two numbers",
)


def all_prompts() -> list[str]:
  prompts = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
  prompts += [f"Write a Python function that {task}." for task in CODE_TASKS]
  return prompts


def prompts(split: str) -> list[str]:
  """The prompts of `split` ("train", or "test" = held out); the "fusion" split trains too."""
  if split == "test":
    return [p for p in all_prompts() if split_of(f"chat:{p}") == "test"]
  return [p for p in all_prompts() if split_of(f"chat:{p}") != "test"]
