"""Benchmarks (not tests): `python -m jax_ark.bench {collectives,persistent}`."""
