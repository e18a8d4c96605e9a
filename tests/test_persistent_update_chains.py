"""Chains of dynamic_update_slices of one buffer outside loops (`out.at[i].set(a).at[j].set(b)`,
an unrolled ring matmul assembling its output): planned as one window store per update into the
result buffer, in program order, instead of a select over the whole buffer per update. Results
equal jax.jit's on random inputs and random (overlapping, out-of-range) offsets, for 1..3 workers,
chaos mode and the reference interpreter; plans are inspected; hand-edited plans that read the
buffer between its stores, or write it with another kind of op, are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._reference import interpret

ROWS, COLS, K = 24, 16, 8


def from_zeros(a, w, i, j, k):
    """Three products stored into rows i, j, k of a zero buffer: the windows may overlap (the
    later store wins there) and offsets past the end clamp, as XLA's."""
    out = jnp.zeros((ROWS, COLS), jnp.float32)
    out = jax.lax.dynamic_update_slice(out, jnp.tanh(a[:4] @ w), (i, 0))
    out = jax.lax.dynamic_update_slice(out, a[4:8] @ w * 2.0, (j, 0))
    return jax.lax.dynamic_update_slice(out, a[8:10] @ w - 1.0, (k, 0))


def from_input(buf, a, w, i, j):
    """Two updates of a user buffer, then the updated buffer also read (a sum after the last
    store)."""
    out = jax.lax.dynamic_update_slice(buf, (a[:1] @ w), (i, 0))
    out = jax.lax.dynamic_update_slice(out, (a[1:3] @ w)[:, :8], (j, 3))
    return out, out.sum(axis=0)


def _args(rng, offsets):
    a = rng.standard_normal((10, K)).astype(np.float32)
    w = rng.standard_normal((K, COLS)).astype(np.float32)
    return [a, w, *(np.int32(o) for o in offsets)]


# Overlapping windows, equal offsets, and offsets clamped from both ends.
OFFSETS = [(0, 2, 5), (3, 3, 3), (20, 22, 23), (-4, 30, 1), (9, 6, 7)]


def _window_stores(plan):
    return [op for op in plan.ops if op.store_view >= 0]


def test_plan_stores_each_update_into_one_buffer(rng):
    args = _args(rng, OFFSETS[0])
    plan = ark.plan(from_zeros, *args, num_workers=2)
    stores = _window_stores(plan)
    assert len(stores) == 3 and len({op.out for op in stores}) == 1
    out = stores[0].out
    assert plan.outputs == [out] and plan.tensors[out].alias >= 0  # aliased to the zero fill
    # no op computes the whole buffer (ROWS x COLS elements): only the windows are written
    assert all(op.B * op.M * op.N < ROWS * COLS for op in plan.ops)
    # each store after the one before (their windows may overlap)
    task_of = {task.op: t for t, task in enumerate(plan.tasks)}  # a window store is one task
    order = [i for i, op in enumerate(plan.ops) if op.store_view >= 0]
    for before, after in zip(order, order[1:], strict=False):
        assert task_of[before] in plan.tasks[task_of[after]].deps


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("offsets", OFFSETS)
def test_chain_from_zeros_equals_jit(rng, workers, offsets):
    args = _args(rng, offsets)
    want = jax.jit(from_zeros)(*args)
    got = jax.jit(ark.persistent(from_zeros, num_workers=workers))(*args)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("donate", [False, True])
def test_chain_of_an_input_buffer_equals_jit(rng, workers, donate):
    buf = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    a, w = _args(rng, ())
    for i, j in [(2, 5), (23, 22), (7, 7)]:
        want = jax.jit(from_input)(buf, a, w, np.int32(i), np.int32(j))
        fn = jax.jit(
            ark.persistent(from_input, num_workers=workers), donate_argnums=(0,) if donate else ()
        )
        got = fn(jnp.asarray(buf), a, w, np.int32(i), np.int32(j))
        for g, r in zip(got, want, strict=True):
            assert_close(g, r, 1e-5)
    plan = ark.plan(from_input, buf, a, w, np.int32(0), np.int32(0), num_workers=workers)
    stores = _window_stores(plan)
    assert len(stores) == 2 and plan.tensors[stores[0].out].alias == 0  # buf's own buffer


def test_intermediate_read_elsewhere_is_not_updated_in_place(rng):
    """A value of the chain that something else also reads is computed whole (the buffer cannot
    hold two values at once), and the result is still right."""

    def fn(a, w, i, j):
        first = jax.lax.dynamic_update_slice(jnp.zeros((ROWS, COLS)), a[:1] @ w, (i, 0))
        second = jax.lax.dynamic_update_slice(first, a[1:3] @ w, (j, 0))
        return second, first * 2.0

    args = [*_args(rng, ())[:2], np.int32(4), np.int32(3)]
    want = jax.jit(fn)(*args)
    for g, r in zip(jax.jit(ark.persistent(fn, num_workers=2))(*args), want, strict=True):
        assert_close(g, r, 1e-5)


def test_chaos_mode_and_reference_interpreter(rng, monkeypatch):
    args = _args(rng, OFFSETS[4])
    want = np.asarray(jax.jit(from_zeros)(*args))
    plan = ark.plan(from_zeros, *args, num_workers=3)
    assert_close(interpret(plan, *args)[0], want, 1e-5)
    for seed in range(1, 9):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        assert_close(run_plan(plan, args)[0][0], want, 1e-5)


def _queue_with_first(plan, early: int, late: int) -> list[int]:
    """One worker's queue in dependency order that runs task `early` as soon as it can and `late`
    as late as it can."""
    deps = [set(task.deps) for task in plan.tasks]
    done: list[int] = []
    while len(done) < len(deps):
        ready = [t for t in range(len(deps)) if t not in done and deps[t] <= set(done)]
        done.append(min(ready, key=lambda t: (t != early, t == late, t)))
    return done


def fused(b, i, j):
    """Updates computed inside their stores: nothing but the store order orders them."""
    out = jnp.zeros((ROWS, COLS), jnp.float32)
    out = jax.lax.dynamic_update_slice(out, jnp.tanh(b[:4]), (i, 0))
    out = jax.lax.dynamic_update_slice(out, b[4:8] * 2.0, (j, 0))
    return jax.lax.dynamic_update_slice(out, b[8:] - 1.0, (i + 1, 0))


def test_overlapping_stores_keep_program_order_under_chaos(rng, monkeypatch):
    b = rng.standard_normal((10, COLS)).astype(np.float32)
    for i, j in [(3, 4), (5, 2), (22, 21)]:
        args = [b, np.int32(i), np.int32(j)]
        want = np.asarray(jax.jit(fused)(*args))
        plan = ark.plan(fused, *args, num_workers=3)
        for seed in range(1, 7):
            monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
            assert_close(run_plan(plan, args)[0][0], want, 1e-6)


def test_store_order_dependency_is_required(rng):
    """Deleting the dependency of a store on the one before is a missing dependency (the windows
    may overlap at run time)."""
    args = [rng.standard_normal((10, COLS)).astype(np.float32), np.int32(1), np.int32(3)]
    plan = ark.plan(fused, *args, num_workers=1)
    order = [i for i, op in enumerate(plan.ops) if op.store_view >= 0]
    t_before = next(t for t, task in enumerate(plan.tasks) if task.op == order[0])
    t_after = next(t for t, task in enumerate(plan.tasks) if task.op == order[1])
    assert t_before in plan.tasks[t_after].deps
    p = plan.copy()
    p.tasks[t_after].deps.remove(t_before)
    p.queues = [_queue_with_first(p, t_after, t_before)]
    assert p.queues[0].index(t_after) < p.queues[0].index(t_before)
    with pytest.raises(PlanError, match="missing dependency"):
        p.validate()
    assert_close(run_plan(plan, args)[0][0], jax.jit(fused)(*args), 1e-6)


def test_read_between_stores_is_refused(rng):
    # a GPU plan: its products are matmuls between map window stores (on CPU the matmuls are the
    # stores, and one reading its own output is refused for that)
    plan = ark.plan(from_zeros, *_args(rng, OFFSETS[0]), num_workers=1, platform="gpu")
    order = [i for i, op in enumerate(plan.ops) if op.store_view >= 0]
    between = next(
        i for i, op in enumerate(plan.ops) if op.kind == "matmul" and order[0] < i < order[1]
    )
    p = plan.copy()
    v = p.ops[between].a_view
    p.views[v] = dataclasses.replace(p.views[v], tensor=plan.ops[order[0]].out)  # reads the buffer
    with pytest.raises(PlanError, match="before its last window store"):
        p.validate()


def test_products_are_stored_by_their_matmuls(rng):
    """On CPU each product's matmul stores its tiles into the buffer itself (no workspace tensor,
    no map copying it); a GPU plan keeps the map window stores (the CUDA executor's only kind)."""
    args = _args(rng, OFFSETS[0])
    plan = ark.plan(from_zeros, *args, num_workers=2, platform="cpu")
    assert [op.kind for op in plan.ops] == ["matmul"] * 3
    assert all(op.store_view >= 0 for op in plan.ops) and plan.workspace_bytes == 0
    assert f"matmul dot_general0             -> window [4, {COLS}] of t" in plan.summary()
    gpu = ark.plan(from_zeros, *args, num_workers=2, platform="gpu")
    assert [op.kind for op in _window_stores(gpu)] == ["map"] * 3


def tiled(a, w, i, j):
    """Two products of several tiles each stored into one buffer, then the buffer read."""
    out = jnp.zeros((160, 128), jnp.float32)
    out = jax.lax.dynamic_update_slice(out, jax.nn.gelu(a[:64] @ w), (i, 0))
    out = jax.lax.dynamic_update_slice(out, a[64:] @ w + 1.0, (j, 0))
    return out, out.sum(axis=1)


@pytest.mark.parametrize("offsets", [(0, 64), (40, 10), (120, 200)])
def test_tiled_matmul_stores_then_a_read_equal_jit(rng, monkeypatch, offsets):
    a = rng.standard_normal((128, 32)).astype(np.float32)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    args = [a, w, *(np.int32(o) for o in offsets)]
    want = jax.jit(tiled)(*args)
    plan = ark.plan(tiled, *args, num_workers=3, platform="cpu")
    stores = [i for i, op in enumerate(plan.ops) if op.store_view >= 0]
    tiles = [t for t, task in enumerate(plan.tasks) if task.op == stores[-1]]
    assert len(stores) == 2 and len(tiles) > 1
    # every reader of the buffer waits for every tile of its last store
    readers = [task for task in plan.tasks if plan.ops[task.op].kind == "reduce"]
    assert readers and all(set(tiles) <= set(task.deps) for task in readers)
    for workers in (1, 2, 3):
        got = jax.jit(ark.persistent(tiled, num_workers=workers))(*args)
        for g, r in zip(got, want, strict=True):
            assert_close(g, r, 1e-5)
    for seed in range(1, 5):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        for g, r in zip(run_plan(plan, args)[0], want, strict=True):
            assert_close(g, r, 1e-5)


def test_matmul_window_store_past_the_end_is_dropped(rng):
    """A matmul's window store whose offset leaves the tensor (a hand-edited plan): its tiles run
    on several workers, so the elements outside are dropped rather than clamped onto one element
    by several tiles at once; the reference interpreter agrees."""

    def update(x, i, r, w):
        return jax.lax.dynamic_update_slice(x, r @ w, (i, 0))

    x = rng.standard_normal((8, 128)).astype(np.float32)
    r = rng.standard_normal((2, 16)).astype(np.float32)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    args = [x, np.int32(7), r, w]
    plan = ark.plan(update, *args, num_workers=2, platform="cpu")
    (op,) = [op for op in plan.ops if op.store_view >= 0]
    assert op.kind == "matmul"
    (bound,) = [ins.b for ins in op.epilogue if ins.op == "imin"]  # the start clamps to <= 6
    op.epilogue[bound] = dataclasses.replace(op.epilogue[bound], a=7)
    plan.validate()
    got = np.asarray(run_plan(plan, args)[0][0])
    np.testing.assert_array_equal(got[:7], x[:7])  # untouched; the product's row 1 is dropped
    assert_close(got[7], (r @ w)[0], 1e-5)
    np.testing.assert_array_equal(np.asarray(interpret(plan, *args)[0]), got)


def test_second_writer_must_be_a_window_store(rng):
    def two_outputs(a, w, i, j, k, full):
        return from_zeros(a, w, i, j, k), jnp.tanh(full)

    args = [*_args(rng, OFFSETS[0]), rng.standard_normal((ROWS, COLS)).astype(np.float32)]
    plan = ark.plan(two_outputs, *args, num_workers=1)
    full = next(i for i, op in enumerate(plan.ops) if op.out == plan.outputs[1])
    p = plan.copy()
    p.ops[full].out = plan.outputs[0]  # a whole-tensor map op writing the chain's buffer too
    with pytest.raises(PlanError, match="also written by"):
        p.validate()


def test_window_store_past_the_end_is_clamped_element_by_element(rng):
    """The executor's backstop for a plan whose store offset leaves the tensor (a hand-edited
    one: jax's own programs clamp the window first): every element lands clamped inside the
    buffer, never past it, and a run of one offset is not written as a block out of bounds."""

    def update(x, i, r):
        return jax.lax.dynamic_update_slice(x, r, (i, 0))

    x = rng.standard_normal((8, 128)).astype(np.float32)
    r = rng.standard_normal((2, 128)).astype(np.float32)
    args = [x, np.int32(7), r]
    plan = ark.plan(update, *args, num_workers=1)
    (op,) = [op for op in plan.ops if op.store_view >= 0]
    # The window's start row clamps to at most 8 - 2; let it reach row 7, so its second row
    # lies past the end of the buffer.
    (bound,) = [ins.b for ins in op.epilogue if ins.op == "imin"]
    assert op.epilogue[bound].op == "const" and op.epilogue[bound].a == 6
    op.epilogue[bound] = dataclasses.replace(op.epilogue[bound], a=7)
    plan.validate()
    want = x.copy()
    want[7] = r[0]
    want[7, 127] = r[1, 127]  # the second row's elements all clamp to the last one, in order
    np.testing.assert_array_equal(np.asarray(run_plan(plan, args)[0][0]), want)
