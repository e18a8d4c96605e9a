"""lax.sort inside ark.persistent (jax_ark/_persistent/_sort.py): jnp.sort, argsort and
sort_key_val equal to jax.jit bit for bit, including jax's comparator on -0.0 / NaN / inf, stable
ties, every supported dtype and axis, and an MoE dispatch that groups tokens by expert with a
stable argsort; long axes and several keys (radix sorts, _radix.py), a top-p sampler;
jnp.searchsorted (total-order comparisons)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_ark as ark
from jax_ark._persistent._reference import interpret


def _check_exact(fn, *args):
    """ark.persistent and the plan's reference interpretation equal jax.jit exactly (NaNs in
    the same places, same dtypes)."""
    want = [np.asarray(w) for w in jax.tree.leaves(jax.jit(fn)(*args))]
    got = [np.asarray(g) for g in jax.tree.leaves(jax.jit(ark.persistent(fn))(*args))]
    plan = ark.plan(fn, *args, platform="cpu")
    plan.validate()
    ref = interpret(plan, *[np.asarray(a) for a in args])
    for g, r, w in zip(got, ref, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(r.reshape(w.shape).astype(w.dtype), w)


def _specials(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[:8] = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.5, 1.5]
    return x


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_sort_and_argsort_with_specials(rng, axis):
    x = _specials(rng, (5, 37))
    _check_exact(lambda a: jnp.sort(a, axis=axis), x)
    _check_exact(lambda a: jnp.argsort(a, axis=axis), x)  # stable: ties keep their order
    _check_exact(lambda a: jnp.sort(a, axis=axis, descending=True), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint32, jnp.bool_])
def test_sort_dtypes(rng, dtype):
    x = rng.integers(-6, 6, (4, 3, 20)).astype(np.int32)  # many ties
    _check_exact(lambda a: jnp.sort(a.astype(dtype), axis=2), x)
    _check_exact(lambda a: jnp.argsort(a.astype(dtype), axis=1), x)


def test_sort_key_val_carries_values(rng):
    keys = rng.integers(0, 4, (3, 50)).astype(np.int32)
    vals = rng.standard_normal((3, 50)).astype(np.float32)
    _check_exact(lambda k, v: lax.sort_key_val(k, v, dimension=1), keys, vals)


def test_moe_dispatch_groups_tokens_by_expert(rng):
    """Tokens sorted by their top-1 expert (a stable argsort of the router's choice), the
    expert MLP on the grouped rows, and the results scattered back by the inverse order."""
    tokens, d, experts = 64, 16, 4
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    router = rng.standard_normal((d, experts)).astype(np.float32)
    w = (rng.standard_normal((d, d)) / 4).astype(np.float32)

    def dispatch(x, router, w):
        expert = jnp.argmax(x @ router, axis=1)
        order = jnp.argsort(expert, stable=True)
        grouped = jnp.take(x, order, axis=0)
        y = jnp.tanh(grouped @ w) * (1 + jnp.take(expert, order)[:, None])
        return jnp.take(y, jnp.argsort(order), axis=0), order

    got = jax.jit(ark.persistent(dispatch))(x, router, w)
    want = jax.jit(dispatch)(x, router, w)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [1537, 5000])
def test_long_axes_are_radix_sorted_exactly(rng, length):
    """Past the rank sort's 1,536 (CPU plans): a radix sort, bit for bit, stable, with jax's
    comparator on -0.0 / NaN / inf, along either axis; a GPU plan of the same (ranks up to
    4,096, then radix) through the reference interpreter."""
    x = _specials(rng, (2, length))
    x[0, 100:400] = 0.0  # long runs of ties: stability over many passes
    x[1, 50:300:2] = -0.0
    _check_exact(lambda a: (jnp.sort(a, axis=1), jnp.argsort(a, axis=1)), x)
    _check_exact(lambda a: jnp.argsort(a.T, axis=0, descending=True), x)
    fn = lambda a: jnp.argsort(a, axis=1)  # noqa: E731
    plan = ark.plan(fn, x, platform="gpu", num_workers=8)
    np.testing.assert_array_equal(interpret(plan, x)[0], np.asarray(jax.jit(fn)(x)))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint32, jnp.int8, jnp.uint16, jnp.bool_]
)
def test_radix_sort_dtypes(rng, dtype):
    """Each dtype's key width (1 to 32 passes), with many ties."""
    x = rng.integers(-100, 100, (2, 1600)).astype(np.int32)
    if dtype == jnp.uint32:
        x = x * 40_000_000  # negative ones wrap to the top of the range
    _check_exact(lambda a: (jnp.sort(a.astype(dtype), axis=1), jnp.argsort(a.astype(dtype))), x)


def test_rank_6_arrays_are_radix_sorted(rng):
    """The rank sort's pairs need one dim more than the array: rank 6 (the format's most) takes
    the radix sort, along any axis."""
    x = rng.integers(-3, 3, (2, 2, 3, 2, 2, 9)).astype(np.float32)
    _check_exact(lambda a: (jnp.sort(a, axis=-1), jnp.argsort(a, axis=2)), x)


def test_sorts_by_several_keys(rng):
    """lax.sort with num_keys = 2 and 3 (jnp.lexsort): lexicographic, stable, the other operands
    carried along; short axes too (ranks take one key only)."""
    a = rng.integers(0, 3, (3, 40)).astype(np.int32)
    b = _specials(rng, (3, 40))
    c = rng.integers(-2, 2, (3, 40)).astype(np.int8)
    pos = np.broadcast_to(np.arange(40, dtype=np.int32), (3, 40)).copy()
    _check_exact(lambda a, b, p: lax.sort((a, b, p), dimension=1, num_keys=2), a, b, pos)
    _check_exact(lambda a, b, c: jnp.lexsort((c, b, a), axis=1), a, b, c)
    _check_exact(lambda a, c: lax.sort((c.T, a.T), dimension=0, num_keys=2), a, c)


def test_top_p_sampler_over_a_vocabulary(rng):
    """A top-p (nucleus) sampler over 32,000 logits: a sort of the probabilities, their running
    sum and the cutoff, then a categorical draw; the same token as jax.jit."""
    logits = (rng.standard_normal((2, 32000)) * 2).astype(np.float32)

    def sample(key, logits):
        probs = jax.nn.softmax(logits, axis=-1)
        ranked = jnp.sort(probs, axis=-1)[:, ::-1]
        cutoff_at = jnp.argmax(jnp.cumsum(ranked, axis=-1) > 0.9, axis=-1)
        cutoff = jnp.take_along_axis(ranked, cutoff_at[:, None], axis=-1)
        return jax.random.categorical(key, jnp.where(probs >= cutoff, logits, -jnp.inf))

    key = jax.random.key(3)
    np.testing.assert_array_equal(
        jax.jit(ark.persistent(sample))(key, logits), jax.jit(sample)(key, logits)
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_searchsorted_matches_jit(rng, side, dtype):
    """jnp.searchsorted (a scan of total-order comparisons, le_to / lt_to / eq_to), with ties,
    -0.0 / +0.0 and NaN among the sorted values and the queries."""
    if dtype == np.float32:
        table = np.sort(np.concatenate([rng.standard_normal(29), [0.0, -0.0, 1.0, 1.0, np.nan]]))
        queries = np.concatenate([rng.standard_normal(20), [0.0, -0.0, 1.0, np.nan, np.inf]])
    else:
        table = np.sort(rng.integers(-5, 5, 34))
        queries = rng.integers(-7, 7, 25)
    fn = lambda t, q: jnp.searchsorted(t, q, side=side)  # noqa: E731
    _check_exact(fn, table.astype(dtype), queries.astype(dtype))
