"""lax.reduce_precision inside ark.persistent (_precision.py) against jax.jit on every pattern
that matters: float32 bit for bit over 20,000 random bit patterns plus the boundaries (ties to
even, the carry into the exponent, overflow to infinity, underflow to zero, NaN payloads), and
every bfloat16 / float16 bit pattern, for formats narrower than, equal to and wider than the
operand's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ark as ark

FORMATS = [(5, 10), (8, 7), (4, 3), (5, 2), (8, 23), (3, 1), (6, 12), (2, 0)]


def _float32_patterns(rng) -> np.ndarray:
    edges = [0x7FC00001, 0xFFC00000, 0x7F800001, 0x00000001, 0x00800000, 0x38000000, 0x37FFFFFF,
             0x477FEFFF, 0x477FF000, 0x3F800FFF, 0x3F801000, 0x3F803000, 0x7F7FFFFF, 0x80000000,
             0xFF800000, 0x387FFFFF]  # fmt: skip
    random = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([random, np.asarray(edges, np.uint32)]).view(np.float32)


@pytest.mark.parametrize(("exponent_bits", "mantissa_bits"), FORMATS)
def test_float32_is_bit_identical(rng, exponent_bits, mantissa_bits):
    x = _float32_patterns(rng)
    fn = lambda x: jax.lax.reduce_precision(x, exponent_bits, mantissa_bits)  # noqa: E731
    got, want = jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("exponent_bits", "mantissa_bits"), FORMATS)
def test_every_16_bit_pattern(dtype, exponent_bits, mantissa_bits):
    """All 65,536 patterns (float16 denormals rounded as float16 rounds them): equal bits, except
    that a NaN stays a NaN with a payload of its own (ark's 16-bit loads quiet signaling NaNs;
    XLA's answer differs by format)."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype)
    fn = lambda x: jax.lax.reduce_precision(x, exponent_bits, mantissa_bits)  # noqa: E731
    got, want = np.asarray(jax.jit(ark.persistent(fn))(x)), np.asarray(jax.jit(fn)(x))
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
