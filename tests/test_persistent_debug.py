"""jax.debug.print / jax.debug.callback inside ark.persistent: a kernel cannot print, so the
persistent call computes the callbacks' operands and runs the callbacks after it. Each against
jax.jit of the same function: the same values reach the callbacks, the same text is printed, the
results are unchanged. Before, such a function crashed the planner with an IndexError. Callbacks
inside jax.jit functions the function calls count as top level (the calls are inlined)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark as ark


def _collecting(fn_with_sink):
    """(fn, seen): fn's callbacks append (tag, value) pairs to seen."""
    seen: list = []

    def sink(tag):
        return lambda *values: seen.append((tag, [np.asarray(v) for v in values]))

    return fn_with_sink(sink), seen


def _model(sink):
    def fn(x, w):
        h = jnp.tanh(x @ w)
        jax.debug.callback(sink("hidden"), h)
        jax.debug.callback(sink("stats"), h.mean(), jnp.argmax(h, axis=1), jnp.int32(7))
        return jax.nn.softmax(h, axis=-1)

    return fn


def test_callbacks_see_the_values_jit_gives_them(rng):
    x = rng.standard_normal((4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    ref_fn, ref_seen = _collecting(_model)
    ark_fn, ark_seen = _collecting(_model)
    want = jax.jit(ref_fn)(x, w)
    got = jax.jit(ark.persistent(ark_fn))(x, w)
    jax.effects_barrier()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert sorted(tag for tag, _ in ark_seen) == sorted(tag for tag, _ in ref_seen)
    ref = dict(ref_seen)
    for tag, values in ark_seen:
        assert len(values) == len(ref[tag])
        for g, v in zip(values, ref[tag], strict=True):
            assert g.dtype == v.dtype and g.shape == v.shape
            np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-6)


def test_printed_text_matches_jit(rng, capsys):
    x = rng.integers(-5, 5, (3, 4)).astype(np.int32)

    def fn(x):
        jax.debug.print("total {t} rows {r}", t=x.sum(), r=x.sum(axis=1), ordered=True)
        y = x * 3
        jax.debug.print("first {} last {}", y[0, 0], y[-1, -1], ordered=True)
        return y

    want = jax.jit(fn)(x)
    jax.effects_barrier()
    printed_by_jit = capsys.readouterr().out
    got = jax.jit(ark.persistent(fn))(x)
    jax.effects_barrier()
    np.testing.assert_array_equal(got, want)
    assert capsys.readouterr().out == printed_by_jit
    assert "total" in printed_by_jit


def test_a_planned_function_with_callbacks_runs_from_its_plan(rng):
    x = rng.standard_normal((5,)).astype(np.float32)
    seen = []

    def fn(x):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), jnp.cumsum(x))
        return x * 2

    plan = ark.plan(fn, x)
    assert len(plan.outputs) == 2  # fn's result, then the callback's operand
    assert "jax.debug operand" in plan.tensors[plan.outputs[1]].name
    got = jax.jit(ark.persistent(fn, plan=plan))(x)
    jax.effects_barrier()
    np.testing.assert_allclose(got, x * 2, rtol=1e-6)
    np.testing.assert_allclose(seen[0], np.cumsum(x), rtol=1e-5)


def test_callbacks_inside_nested_jit_functions(rng):
    """A jax.jit helper with a callback, called twice: both calls' values reach the callback, as
    in jax.jit (the order of unordered callbacks is not specified: compared as sets)."""
    x = rng.standard_normal((4,)).astype(np.float32)

    def make(seen):
        @jax.jit
        def helper(v):
            jax.debug.callback(lambda s: seen.append(float(s)), jnp.sum(v * v))
            return jnp.tanh(v) * 2.0

        return lambda x: helper(helper(x) + 1.0)

    ref_seen, ark_seen = [], []
    want = jax.jit(make(ref_seen))(x)
    got = jax.jit(ark.persistent(make(ark_seen)))(x)
    jax.effects_barrier()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(ark_seen) == 2
    np.testing.assert_allclose(sorted(ark_seen), sorted(ref_seen), rtol=1e-5)


def test_callbacks_inside_cond_branches_are_refused_by_name(rng):
    """A debug print in a branch whose result is unused: the cond is kept for its effect and has
    no results; the refusal names the debug callback, not a generic side effect."""
    x = rng.standard_normal((3,)).astype(np.float32)

    def fn(x):
        jax.lax.cond(x[0] > 0, lambda v: jax.debug.print("positive {}", v), lambda v: None, x)
        return x * 2.0

    with pytest.raises(ark.UnsupportedError, match=r"jax.debug.print / jax.debug.callback inside"):
        jax.jit(ark.persistent(fn))(x)


def test_callbacks_inside_loops_are_refused_by_name(rng):
    x = rng.standard_normal((6,)).astype(np.float32)

    def fn(x):
        def body(carry, row):
            jax.debug.print("row {}", row)
            return carry + row, carry

        return jax.lax.scan(body, 0.0, x)

    with pytest.raises(ark.UnsupportedError, match=r"debug_print .*inside a loop body"):
        jax.jit(ark.persistent(fn))(x)


def test_each_device_calls_back_with_its_own_values(mesh8, rng):
    """Inside shard_map each device's call runs its callback on its own shard's values."""
    x = rng.standard_normal((8 * 3,)).astype(np.float32)
    seen = {}

    def fn(a):
        total = jax.lax.psum(a, "x")
        jax.debug.callback(
            lambda i, s, t: seen.__setitem__(int(i), (np.asarray(s), np.asarray(t))),
            jax.lax.axis_index("x"),
            a,
            total,
        )
        return total

    spec = dict(mesh=mesh8, in_specs=P("x"), out_specs=P())
    got = jax.jit(jax.shard_map(ark.persistent(fn), **spec))(x)
    jax.effects_barrier()
    np.testing.assert_allclose(got, x.reshape(8, 3).sum(0), rtol=1e-5)
    assert sorted(seen) == list(range(8))
    for i, (shard, total) in seen.items():
        np.testing.assert_array_equal(shard, x[3 * i : 3 * i + 3])
        np.testing.assert_allclose(total, x.reshape(8, 3).sum(0), rtol=1e-5)
