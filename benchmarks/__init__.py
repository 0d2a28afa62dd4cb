"""Benchmark scripts (run from the repository root: `python -m benchmarks.<name>`, or
`jax-specens bench <name>`). Results go to benchmarks/results/ by default."""
