"""Hand-written kernels behind `jax.ffi` (opt-in; see `cpu.py`)."""
