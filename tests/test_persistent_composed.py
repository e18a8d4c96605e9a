"""Float functions ark.persistent writes with other opcodes (exp2, sinh, cosh, tan, cbrt, atan,
atan2: within a few float32 ulps of jax.jit, signs, NaNs, IEEE special cases and overflow points
included), and jnp.tile (exact)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ark as ark

SPECIALS = [0.0, -0.0, 1e-6, -1e-7, 3e-3, 40.0, -40.0, 89.0, -89.2, 100.0]


@pytest.mark.parametrize("name", ["exp2", "sinh", "cosh", "tan", "cbrt", "arctan"])
def test_composed_functions_match_jit(rng, name):
    fn = getattr(jnp, name)
    x = (rng.standard_normal((8, 40)) * 3).astype(np.float32)
    x[0, : len(SPECIALS)] = SPECIALS
    if name == "exp2":
        x[1, :3] = [127.5, -149.0, -160.0]  # overflow / subnormal / underflow
    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float64)
    want = np.asarray(jax.jit(fn)(x), np.float64)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize("name", ["exp2", "sinh", "cosh", "tan", "cbrt", "arctan"])
def test_composed_functions_in_bfloat16(rng, name):
    """Computed in float32 and rounded once to bfloat16: at most one bfloat16 ulp from jax.jit."""
    x = (rng.standard_normal((4, 64)) * 2).astype(np.float32)

    def fn(x):
        return getattr(jnp, name)(x.astype(jnp.bfloat16))

    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float32)
    want = np.asarray(jax.jit(fn)(x), np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-30)


def test_atan2_special_cases_and_quadrants(rng):
    """Every pair of zeros (both signs), infinities, NaN, the reduction's break points and random
    values in all four quadrants."""
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 1e-30, 1e30, 2.4142135, 0.41421356]
    y = np.concatenate([np.repeat(special, len(special)), rng.standard_normal(300) * 10])
    x = np.concatenate([np.tile(special, len(special)), rng.standard_normal(300) * 10])
    y, x = y.astype(np.float32), x.astype(np.float32)
    got = np.asarray(jax.jit(ark.persistent(jnp.arctan2))(y, x), np.float64)
    want = np.asarray(jax.jit(jnp.arctan2)(y, x), np.float64)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got[~nan]), np.signbit(want[~nan]))  # a NaN's: any
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize("reps", [(2, 3), (3,), (2, 1, 2), (1, 1)])
def test_tile_matches_jit(rng, reps):
    x = rng.integers(-100, 100, (4, 5)).astype(np.int32)
    fn = lambda x: jnp.tile(x, reps) * 2  # noqa: E731
    np.testing.assert_array_equal(jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x))
