"""CoSD's assistant candidate x^ is its top token at any temperature (docs/algorithms.md §4).

Consequence used as the specification: a verifier that replaces every disagreement emits, at each
position, the assistant's own argmax (a kept draft token agreed with it, a replaced one is it), so
at temperature 1 (sampled drafts) it still gives exactly the assistant's greedy decode.
"""

import jax
import numpy as np

from jax_specens.decoding.api import decode
from jax_specens.fusion import ConstantVerifier
from tests.test_cosd_greedy import K, LENGTHS, NEW, PROMPTS


def test_always_replacing_at_temperature_one_is_the_assistants_greedy_decode(grammar_models):
  draft, assistant = grammar_models[0], grammar_models[1]
  greedy = decode(assistant, PROMPTS, LENGTHS, max_new_tokens=NEW, temperature=0.0).to_lists()
  for seed in (0, 1):
    out = decode(assistant, PROMPTS, LENGTHS, method="cosd", draft=draft, gamma=K,
                 verifier=ConstantVerifier(True), max_new_tokens=NEW, temperature=1.0,
                 key=jax.random.key(seed))
    assert out.to_lists() == greedy
    # the drafts were sampled and disagreed somewhere: the assistant's tokens got in
    assert int(np.asarray(out.stats.accepted)[1]) > 0
