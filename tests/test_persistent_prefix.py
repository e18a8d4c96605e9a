"""Cumulative ops along long axes inside ark.persistent (blocked scans, _prefix.py) against
jax.jit: every running fold and direction, odd lengths (a partial last block), lengths that
recurse several levels, integers exactly (wrapping too), floats with infinities and NaN, bf16,
gradients, and a plan made for the GPU run by the reference interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._prefix import _BLOCK
from jax_ark._persistent._reference import interpret

PRIMS = {
    "cumsum": jax.lax.cumsum,
    "cumprod": jax.lax.cumprod,
    "cummax": jax.lax.cummax,
    "cummin": jax.lax.cummin,
    "cumlogsumexp": jax.lax.cumlogsumexp,
}


def _both(fn, *args):
    return jax.jit(ark.persistent(fn))(*args), jax.jit(fn)(*args)


@pytest.mark.parametrize("prim", sorted(PRIMS))
@pytest.mark.parametrize("length", [_BLOCK + 1, 3 * _BLOCK, 1000, 4099])
@pytest.mark.parametrize("reverse", [False, True])
def test_float_running_folds_along_long_axes(rng, prim, length, reverse):
    x = rng.standard_normal((3, length)).astype(np.float32)
    if prim == "cumprod":  # products of many factors near 1 stay finite and non-zero
        x = (1.0 + 0.01 * x).astype(np.float32)
    fn = lambda x: PRIMS[prim](x, axis=1, reverse=reverse)  # noqa: E731
    got, want = _both(fn, x)
    assert got.dtype == want.dtype
    # sums of up to 4,099 terms: rounding grows with the length in either association
    assert_close(got, want, 1e-5 if prim in ("cummax", "cummin") else 2e-5)
    if prim in ("cummax", "cummin"):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint32])
@pytest.mark.parametrize("prim", ["cumsum", "cumprod", "cummax", "cummin"])
def test_integer_running_folds_are_exact(rng, dtype, prim):
    """Along axis 0 of a (2,000, 3) array; int8 sums and every product wrap, as XLA's do."""
    low, high = (0, 50) if dtype == np.uint32 else (-50, 50)
    x = rng.integers(low, high, (2000, 3)).astype(dtype)
    for reverse in (False, True):
        fn = lambda x: PRIMS[prim](x, axis=0, reverse=reverse)  # noqa: B023, E731
        got, want = _both(fn, x)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_specials_propagate_as_in_jit(rng):
    """-inf, +inf and NaN in rows of 300: max / min / logsumexp / sum see them from their
    position on, in either direction."""
    x = (rng.standard_normal((5, 300)) * 3).astype(np.float32)
    x[0, 17], x[1, 250], x[2, 99], x[3] = -np.inf, np.inf, np.nan, -np.inf
    for prim in ("cummax", "cummin", "cumlogsumexp", "cumsum"):
        for reverse in (False, True):
            fn = lambda x: PRIMS[prim](x, axis=1, reverse=reverse)  # noqa: B023, E731
            got, want = (np.asarray(a, np.float64) for a in _both(fn, x))
            for special in (np.isnan, np.isposinf, np.isneginf):
                np.testing.assert_array_equal(special(got), special(want), err_msg=prim)
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=1e-4)


def test_bfloat16_sum_is_rounded_once(rng):
    """bfloat16 cumsum of 2,000 terms: run in float32 and rounded at the end, so within a
    bfloat16 ulp of the float64 sums (XLA adds in bfloat16 step by step, drifting further)."""
    x = rng.standard_normal((2, 2000)).astype(np.float32)
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    fn = lambda x: jnp.cumsum(x.astype(jnp.bfloat16), axis=1)  # noqa: E731
    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float64)
    exact = np.cumsum(x16, axis=1)
    np.testing.assert_allclose(got, exact, rtol=2**-8, atol=2**-8 * np.abs(exact).max() * 0.05)


def test_gradient_and_three_dimensions(rng):
    """A running fold along the middle axis of a 3-D array, and the gradient through it (the
    transpose of a cumsum is a reversed cumsum: planned blocked as well)."""
    x = rng.standard_normal((4, 500, 3)).astype(np.float32)
    w = rng.standard_normal((4, 500, 3)).astype(np.float32)

    def loss(x):
        return jnp.sum(jnp.cumsum(x, axis=1) * w) + jnp.sum(jax.lax.cumlogsumexp(x, axis=1) * w)

    got, want = _both(jax.value_and_grad(loss), x)
    for g, v in zip(got, want, strict=True):
        assert_close(g, v, 2e-5)


def test_gpu_plan_through_the_reference(rng):
    x = rng.standard_normal((2, 777)).astype(np.float32)
    xi = rng.integers(-9, 9, (2, 777)).astype(np.int32)

    def fn(x, xi):
        return jnp.cumsum(x, axis=1), jax.lax.cummax(xi, axis=1, reverse=True)

    plan = ark.plan(fn, x, xi, platform="gpu", num_workers=16)
    got, want = interpret(plan, x, xi), jax.jit(fn)(x, xi)
    assert_close(got[0], want[0], 2e-5)
    np.testing.assert_array_equal(got[1], want[1])


def test_top_p_sampler_cumulative_probabilities(rng):
    """A top-p sampler's cutoff over a 32,000-word vocabulary: the cumulative probabilities of
    the sorted-by-index probabilities (the running sum a sampler thresholds)."""
    logits = rng.standard_normal((2, 32000)).astype(np.float32)

    def fn(logits):
        cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
        return cdf, jnp.argmax(cdf > 0.9, axis=-1)

    got, want = _both(fn, logits)
    assert_close(got[0], want[0], 1e-5)
    # the crossing may move by one position where cdf is within rounding of 0.9
    np.testing.assert_allclose(got[1], want[1], atol=1)


def test_argmax_and_argmin_of_booleans(rng):
    """The first True (argmax) / first False (argmin) of a mask, -1 never: index 0 where none."""
    x = rng.standard_normal((6, 50)).astype(np.float32)
    x[0] = -1.0  # no True in this row: argmax is 0
    x[1] = 1.0  # no False: argmin is 0

    def fn(x):
        mask = x > 0.5
        return jnp.argmax(mask, axis=1), jnp.argmin(mask, axis=1), jnp.argmax(mask, axis=0)

    for got, want in zip(*_both(fn, x), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


HIGH_RANK = [((1, 1, 1, 2, 20), -1), ((1, 1, 1, 1, 2, 3), -1), ((1, 2, 1, 3, 1, 40), 5),
             ((2, 1, 13, 1, 2, 3), 2)]  # fmt: skip


@pytest.mark.parametrize(("shape", "axis"), HIGH_RANK)
def test_high_rank_inputs(rng, shape, axis):
    """Rank 5 and 6 (the format's most): the scans flatten the other dims into rows, so neither
    the blocks nor a direct fold's pair space (one dim more than x) exceed the format's rank.
    Before, rank 5 with a long axis failed at the runtime's plan check."""
    x = rng.integers(-50, 50, shape).astype(np.int32)
    for prim in ("cumsum", "cummax"):
        for reverse in (False, True):
            fn = lambda x: PRIMS[prim](x, axis=axis % len(shape), reverse=reverse)  # noqa: B023, E731
            got, want = _both(fn, x)
            np.testing.assert_array_equal(got, want)
