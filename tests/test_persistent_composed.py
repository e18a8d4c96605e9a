"""Float functions ark.persistent writes with other opcodes (exp2, sinh, cosh, tan, cbrt, atan,
atan2, asin, acos, asinh, acosh, atanh, lgamma, digamma: within a few float32 ulps of jax.jit,
signs, NaNs, IEEE special cases, poles and overflow points included), nextafter and the float
remainder (exact) and jnp.tile (exact). tests/test_lax_ops_suite.py runs JAX's own op records
through these too."""

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


def _gamma_inputs(rng) -> np.ndarray:
    """Both branches of the reflection, the poles (0, negative integers), the zeros of lgamma
    (1, 2), half integers, tiny and huge magnitudes, infinities and NaN."""
    special = [0.0, -0.0, 1.0, 2.0, 3.0, -1.0, -2.0, -7.0, 0.5, -0.5, -2.5, 1e-30, -1e-30, 3e38]
    special += [np.inf, -np.inf, np.nan, 1.4616321, 0.49999997, 0.50000006]
    spread = [rng.uniform(-20, 20, 400), rng.uniform(-3, 3, 400), 10.0 ** rng.uniform(-20, 30, 200)]
    return np.concatenate([special, *spread]).astype(np.float32)


@pytest.mark.parametrize("name", ["lgamma", "digamma"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lgamma_and_digamma_match_jit(rng, name, dtype):
    fn = lambda x: getattr(jax.lax, name)(x.astype(dtype))  # noqa: E731
    x = _gamma_inputs(rng)
    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float64)
    want = np.asarray(jax.jit(fn)(x), np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # digamma's poles
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))  # lgamma's, and +-inf
    finite = np.isfinite(want)
    # Relative to max(|value|, 1): near lgamma's zeros both are absolute-accurate, not relative.
    tolerance = 4e-6 if dtype == jnp.float32 else 2**-7
    err = np.abs(got[finite] - want[finite]) / np.maximum(np.abs(want[finite]), 1.0)
    assert err.max() <= tolerance, (x[finite][np.argmax(err)], err.max())


def test_scipy_log_densities_and_their_gradients(rng):
    """jax.scipy's Poisson / gamma / beta log densities (lgamma, betaln) and their gradients in the
    parameters (digamma), as a model's likelihood would use them."""

    def log_likelihood(rate, shape, a, k, x, p):
        return (
            jax.scipy.stats.poisson.logpmf(k, rate).sum()
            + jax.scipy.stats.gamma.logpdf(x, shape).sum()
            + jax.scipy.stats.beta.logpdf(p, a, 2.5).sum()
        )

    args = (
        rng.uniform(0.5, 20.0, 64).astype(np.float32),  # rate
        rng.uniform(0.3, 8.0, 64).astype(np.float32),  # shape
        rng.uniform(0.5, 5.0, 64).astype(np.float32),  # a
        rng.integers(0, 30, 64).astype(np.float32),  # k
        rng.uniform(0.1, 10.0, 64).astype(np.float32),  # x
        rng.uniform(0.05, 0.95, 64).astype(np.float32),  # p
    )
    fn = jax.value_and_grad(log_likelihood, argnums=(0, 1, 2))
    got = jax.jit(ark.persistent(fn))(*args)
    want = jax.jit(fn)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float_remainder_is_exact(rng, dtype):
    """lax.rem / jnp.fmod / jnp.mod of floats (fmod: exact, the dividend's sign; jnp.mod moves
    it to the divisor's), with zero and infinite operands."""
    special = np.array([0.0, -0.0, 5.5, -5.5, np.inf, -np.inf, np.nan, 1e-30, 3e38, 7.0])
    a = np.concatenate([(rng.standard_normal(300) * 50), special, special[::-1]]).astype(np.float32)
    b = np.concatenate([(rng.standard_normal(300) * 3), special[::-1], special]).astype(np.float32)

    def fn(a, b):
        a, b = a.astype(dtype), b.astype(dtype)
        return jax.lax.rem(a, b), jnp.mod(a, b), jnp.fmod(a, 0.7)

    for got, want in zip(jax.jit(ark.persistent(fn))(a, b), jax.jit(fn)(a, b), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            np.signbit(got[~np.isnan(want)]), np.signbit(want[~np.isnan(want)])
        )


@pytest.mark.parametrize("name", ["arcsin", "arccos", "arcsinh", "arccosh", "arctanh"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_inverse_trigonometric_functions_match_jit(rng, name, dtype):
    """At and next to +-1, signed zeros, tiny and huge magnitudes (x^2 overflows), the domains'
    edges (NaN beyond), infinities and NaN."""
    edges = [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 0.9999999, -0.9999999, 1e-30, -1e-30]
    edges += [1e-8, 3e38, -3e38, 2e19, np.inf, -np.inf, np.nan, 0.5, -0.5, 2.0]
    x = np.concatenate([
        edges, rng.uniform(-1, 1, 300), rng.standard_normal(300) * 50,
        10.0 ** rng.uniform(-30, 38, 200) * rng.choice([-1, 1], 200),
    ]).astype(np.float32)  # fmt: skip
    fn = lambda x: getattr(jnp, name)(x.astype(dtype))  # noqa: E731
    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float64)
    want = np.asarray(jax.jit(fn)(x), np.float64)
    for special in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(special(got), special(want))
    number = ~np.isnan(want)
    np.testing.assert_array_equal(np.signbit(got[number]), np.signbit(want[number]))
    finite = np.isfinite(want)
    # bfloat16: rounded once from float32, one bfloat16 ulp from XLA's at most.
    rtol = 4e-7 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=1e-37)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_nextafter_is_bit_exact(rng, dtype):
    """Towards larger, smaller and equal values, from and to signed zeros (the smallest
    subnormal), from the largest finite value to inf, and NaN in either operand."""
    big = float(jnp.finfo(dtype).max)
    x = [0.0, -0.0, 0.0, -0.0, 1.0, 1.0, -1.0, big, -big, np.inf, 2.0, np.nan, 3.0, 1e-30, -np.inf]
    y = [
        1.0,
        1.0,
        -1.0,
        -0.0,
        1.0,
        -5.0,
        -5.0,
        np.inf,
        -np.inf,
        0.0,
        np.nan,
        2.0,
        3.0,
        -1.0,
        np.inf,
    ]
    x = np.concatenate([x, rng.standard_normal(200) * 10]).astype(np.float32)
    y = np.concatenate([y, rng.standard_normal(200) * 10]).astype(np.float32)
    fn = lambda x, y: jax.lax.nextafter(x.astype(dtype), y.astype(dtype))  # noqa: E731
    got = np.asarray(jax.jit(ark.persistent(fn))(x, y), np.float32)
    want = np.asarray(jax.jit(fn)(x, y), np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
