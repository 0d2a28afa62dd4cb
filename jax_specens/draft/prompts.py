"""Chat prompts shipped for distillation: the target answers them, the draft learns its answers.

Prompts are built from templates x topics, in three families (`all_prompts`): the first a mix of
programming, science and everyday questions and small code tasks, the second descriptions and
stories of places, people, animals, food and everyday life, the third the openings of stories and
articles (unfinished text: a base model continues it; a chat model reads it as a message). Each
prompt is a document of the held-out split rule of `jax_specens.builtin.data.split_of` (key
`chat:<prompt>`): prompts in its `test` split are never trained on and serve as the held-out chat
prompts of every measurement.
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

# A second family (added for the SmolLM2 draft's third phase, 2026-12-03): places, people, animals,
# food, pastimes and everyday life, asked for descriptions and stories, the open-ended prose the
# first family lacked (the first draft accepted 13-15% of its proposals at gamma 3 describing a
# city). Listed after the first family, so `prompts("train")[:379]` and `prompts("test")[:27]` are
# the prompts of the earlier phases. The demo's question (Paris) is in neither family.
GENERAL_TOPICS = (
    "London", "Tokyo", "New York", "Rome", "Venice", "the Amazon rainforest", "the Sahara desert",
    "Mount Everest", "the Great Wall of China", "the pyramids of Egypt", "Japan", "Brazil",
    "Canada", "Australia", "India", "Iceland", "dogs", "cats", "elephants", "dolphins", "owls",
    "sharks", "horses", "pizza", "baking bread", "chocolate", "pasta", "sushi", "gardening",
    "hiking", "photography", "painting", "knitting", "cycling", "swimming", "running a marathon",
    "yoga", "the Olympic Games", "basketball", "tennis", "jazz", "the piano", "the guitar",
    "movies", "video games", "social media", "smartphones", "airplanes", "trains",
    "the printing press", "the wheel", "Albert Einstein", "Marie Curie", "Leonardo da Vinci",
    "Isaac Newton", "Abraham Lincoln", "Cleopatra", "Mozart", "the Renaissance",
    "the Industrial Revolution", "ancient Greece", "the Vikings", "winter", "autumn",
    "a rainy day", "friendship", "happiness", "kindness", "a birthday party", "a road trip",
    "a library", "a city park", "a farmers market", "the first day at a new school",
    "moving to a new city", "saving money", "starting a small business", "teamwork",
    "volunteering", "a lighthouse", "a thunderstorm", "the night sky",
)

GENERAL_TEMPLATES = (
    "Describe {t} in two sentences.",
    "Tell me about {t}.",
    "Write a short story about {t}.",
    "What are some interesting things about {t}?",
    "Write a few sentences about {t}.",
    "What do people love about {t}?",
)


# A third family (added for Gemma-3-270M's draft, 2026-12-03): the openings of stories and
# articles. A base model reads a question as text to continue, and often continues the second
# family's requests by repeating them ("Write a short story about the Vikings.\n\nWrite a short
# story about the Vikings. ..."); its stories and articles start from openings like these. Its
# draft, trained on the first family, agreed with it on 12-17% of the tokens of a story or a
# history (teacher-forced) against 73% on a description of Paris. Listed after the second family,
# so `prompts("train")[:820]` stays the first two families. The demo's continuation ("Once upon a
# time, in a small village,") is in no family.
OPENING_CHARACTERS = (
    "a young girl", "an old fisherman", "a curious cat", "a lonely robot", "a brave knight",
    "a shy boy", "a poor farmer", "a little bird", "a wise old woman", "a clever detective",
    "a young sailor", "a baker", "a new teacher", "a small dragon", "a proud king",
    "a princess", "a hungry fox", "a sleepy bear", "two best friends", "a large family",
)

OPENING_TEMPLATES = (
    "Once upon a time, there was {t} who",
    "Long ago, in a land far away, there lived {t}.",
    "It was early in the morning when {t}",
    "Every day, {t} would",
    "One summer afternoon, {t}",
    "This is the story of {t}.",
)

OPENING_TOPIC_TEMPLATES = (  # over GENERAL_TOPICS
    "Here are a few facts about {t}:",
    "In this article, we will talk about {t}.",
    "The first thing you notice about {t} is",
)

FAMILIES = ("all", "first", "general", "openings")


def all_prompts(family: str = "all") -> list[str]:
  """Every shipped prompt of `family`: "first" (programming, science, everyday questions, code),
  "general" (descriptions and stories), "openings" (the beginnings of stories and articles) or
  "all" (the first, the general, then the openings)."""
  if family not in FAMILIES:
    raise ValueError(f"unknown prompt family {family!r}; one of {', '.join(FAMILIES)}")
  first = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
  first += [f"Write a Python function that {task}." for task in CODE_TASKS]
  general = [tpl.format(t=t) for t in GENERAL_TOPICS for tpl in GENERAL_TEMPLATES]
  openings = [tpl.format(t=t) for t in OPENING_CHARACTERS for tpl in OPENING_TEMPLATES]
  openings += [tpl.format(t=t) for t in GENERAL_TOPICS for tpl in OPENING_TOPIC_TEMPLATES]
  return {"all": first + general + openings, "first": first, "general": general,
          "openings": openings}[family]


def prompts(split: str, family: str = "all") -> list[str]:
  """The prompts of `split` ("train", or "test" = held out; the "fusion" split trains too) of
  `family` (`all_prompts`)."""
  test = split == "test"
  return [p for p in all_prompts(family) if (split_of(f"chat:{p}") == "test") == test]


def held_out_count(train_n: int, family: str = "all") -> int:
  """How many held-out prompts match the first `train_n` training prompts of `family`: every
  held-out prompt of each family those come from. Families come in order, so they are
  `prompts("test", family)[:count]`: of "all", 379 (the first family) -> 27, 820 (the first two)
  -> 78, 1148 (all three) -> 116."""
  trained = set(prompts("train", family)[:train_n])
  families = FAMILIES[1:] if family == "all" else (family,)
  return sum(len(prompts("test", f)) for f in families if trained & set(all_prompts(f)))
