"""Autoregressive decoding with one model: the one-model case of the plain ensemble loop, whose
target is that model's own sampling distribution (`select`)."""

from jax_specens.decoding import ensemble
from jax_specens.decoding.loop import Method

METHOD = Method(init=ensemble.init, step=ensemble.step, num_models=(1, 1), target=0)
