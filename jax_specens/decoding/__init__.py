"""Decoding methods: a registry of name -> `Method` (init + one loop step), their shared loop
(`loop.py`) and the public `decode()` / `decode_stream()` (`api.py`).

Adding a method is one line here: `METHODS["name"] = module.METHOD`.
"""

from jax_specens.decoding import ar, cosd, ensemble, sd, se
from jax_specens.decoding.loop import Config, LoopState, Method, Request, generate
from jax_specens.decoding.outputs import FINISH_REASONS, DecodeOutput, DecodeStats

METHODS: dict[str, Method] = {
    "ar": ar.METHOD,
    "sd": sd.METHOD,
    "ensemble": ensemble.METHOD,
    "se": se.METHOD,
    "cosd": cosd.METHOD,
}
