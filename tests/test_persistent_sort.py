"""lax.sort inside ark.persistent (jax_ark/_persistent/_sort.py): jnp.sort, argsort and
sort_key_val equal to jax.jit bit for bit, including jax's comparator on -0.0 / NaN / inf, stable
ties, every supported dtype and axis, and an MoE dispatch that groups tokens by expert with a
stable argsort; jnp.searchsorted (total-order comparisons)."""

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


def test_sorts_it_cannot_plan_are_refused(rng):
    x = rng.standard_normal((2, 8)).astype(np.float32)
    two_keys = ark.persistent(lambda a, b: lax.sort((a, b), dimension=1, num_keys=2))
    with pytest.raises(ark.UnsupportedError, match="sort by 2 keys"):
        jax.jit(two_keys)(x, x)
    long = np.zeros((1, 5000), np.float32)
    with pytest.raises(ark.UnsupportedError, match="axis of 5000"):
        jax.jit(ark.persistent(jnp.sort))(long)


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
