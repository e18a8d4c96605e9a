"""Products and running folds inside ark.persistent against jax.jit: reduce_prod (float, and
integers wrapping as XLA's), cumprod, and cumlogsumexp (two running folds: max, then the shifted
sum) with infinities, NaN and both directions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ark as ark
from jax_ark._persistent._reference import interpret


@pytest.mark.parametrize("axis", [0, 1, (0, 2), None])
def test_float_product_matches_jit(rng, axis):
    x = rng.uniform(0.6, 1.6, (6, 40, 3)).astype(np.float32)
    x[0, 0, 0], x[1, 2, 1] = -0.0, np.nan  # a signed zero and a NaN reach some products
    fn = lambda x: jnp.prod(x, axis=axis)  # noqa: E731
    got, want = np.asarray(jax.jit(ark.persistent(fn))(x)), np.asarray(jax.jit(fn)(x))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32])
def test_integer_product_wraps_like_jit(rng, dtype):
    """Products of 24 factors up to 9 overflow 32 bits: exact equality checks the wrapping; the
    plan made for a GPU, run by the numpy reference interpreter, too."""
    x = rng.integers(-9, 10, (24, 7)).astype(np.int32)

    def fn(x):
        x = x.astype(dtype)
        return jnp.prod(x, axis=0), jnp.cumprod(x, axis=0), jnp.prod(x[:3], axis=1)

    want = jax.jit(fn)(x)
    gpu_plan = ark.plan(fn, x, platform="gpu", num_workers=16)
    for got in (jax.jit(ark.persistent(fn))(x), interpret(gpu_plan, x)):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumprod_and_its_gradient(rng, reverse):
    x = rng.uniform(0.5, 1.5, (5, 33)).astype(np.float32)

    def loss(x):
        return jnp.sum(jax.lax.cumprod(x, axis=1, reverse=reverse) * jnp.arange(33.0))

    fn = jax.value_and_grad(loss)
    for got, want in zip(jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5)


@pytest.mark.parametrize("axis,reverse", [(1, False), (1, True), (0, False), (0, True)])
def test_cumlogsumexp_matches_jit_with_infinities(rng, axis, reverse):
    x = (rng.standard_normal((12, 40)) * 4).astype(np.float32)
    x[0, 3] = -np.inf  # one -inf term
    x[1] = -np.inf  # a row of them: -inf throughout
    x[2, 5] = np.inf  # +inf from there on (not inf - inf = NaN)
    x[3, 7] = np.nan
    x[4, 2] = 85.0  # e^85 alone overflows float32; the shifted sum does not
    fn = lambda x: jax.lax.cumlogsumexp(x, axis=axis, reverse=reverse)  # noqa: E731
    got = np.asarray(jax.jit(ark.persistent(fn))(x), np.float64)
    want = np.asarray(jax.jit(fn)(x), np.float64)
    for special in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(special(got), special(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_cumlogsumexp_in_bfloat16_and_its_gradient(rng):
    """bfloat16: computed in float32 and rounded once, so within a bfloat16 ulp of the float64
    value (XLA folds step by step in bfloat16: several ulps off along a long axis, so jax.jit is
    not the reference here); the gradient (a softmax over each prefix) in float32 vs jax.jit."""
    x = (rng.standard_normal((6, 48)) * 3).astype(np.float32)
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    fn16 = lambda x: jax.lax.cumlogsumexp(x.astype(jnp.bfloat16), axis=1)  # noqa: E731
    got = np.asarray(jax.jit(ark.persistent(fn16))(x), np.float64)
    exact = np.logaddexp.accumulate(x16, axis=1)
    np.testing.assert_allclose(got, exact, rtol=2**-8, atol=2**-9)  # half an ulp, and rounding
    grad = jax.grad(lambda x: jnp.sum(jax.lax.cumlogsumexp(x, axis=1) * jnp.cos(x)))
    np.testing.assert_allclose(
        np.asarray(jax.jit(ark.persistent(grad))(x)), np.asarray(jax.jit(grad)(x)), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip


def test_lax_reduce_with_a_computation_of_its_own(rng):
    """lax.reduce whose computation is no monoid jax recognizes (the generic `reduce`
    primitive): a variadic max-with-index keeping the earlier index on ties (equal to XLA's
    in-order fold, index for index), an integer product that wraps, a float sum over two dims,
    and an empty reduced axis (the init values)."""
    x = rng.integers(-2, 2, (7, 33)).astype(np.float32)  # many ties
    x[0] = -np.inf

    def max_with_index(x, axis):
        index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)

        def pick(a, b):
            return jnp.maximum(a[0], b[0]), jnp.where(a[0] >= b[0], a[1], b[1])

        return jax.lax.reduce((x, index), (-jnp.inf, 0), pick, (axis,))

    def fn(x):
        return (
            max_with_index(x, 1),
            max_with_index(x, 0),
            jax.lax.reduce(x.astype(jnp.int32) + 3, 1, lambda a, b: a * b + 0, (1,)),
            jax.lax.reduce(x[1:].reshape(3, 2, 33), 0.0, lambda a, b: a + b * 1.0, (0, 2)),
            jax.lax.reduce(x[:, :0], 5.0, lambda a, b: a + b * 1.0, (1,)),
        )

    for got, want in zip(jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x), strict=True):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
