"""Regressions found by the communication part of the plan fuzzer (tests/plan_fuzz_comm.py): each
edit of a real comm plan below once ran with wrong results or escaped as a non-PlanError; now it
is refused by Python (PlanError) and, where the words can say it, by the runtime's own check."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Plan, PlanError

N = 8
RING = [(i, (i + 1) % N) for i in range(N)]
SPEC = {"in_specs": P("x"), "out_specs": P("x")}


def _ring(x):
    return jax.lax.ppermute(x * 2.0 + 1.0, "x", RING) - x


def _scan_psum(x, ws):
    def layer(h, w):
        return jax.lax.psum(jnp.tanh(h @ w), "x") + h, None

    return jax.lax.scan(layer, x, ws)[0]


def _plan_in(mesh, fn, args, specs, **kw) -> Plan:
    pf = ark.persistent(fn, **kw)
    box = []

    def body(*local):
        box.append(pf.plan(*local))
        return pf(*local)

    jax.make_jaxpr(jax.shard_map(body, mesh=mesh, check_vma=False, **specs))(*args)
    return box[0]


def test_put_must_depend_on_its_source_itself_not_through_its_queue(mesh8, rng):
    """A put task whose producer precedes it only in its worker's queue: its copies may be sent
    eagerly (as soon as its own dependencies are done, before its queue turn), so they could
    read the source before the producer wrote it. Found as a wrong result on one rank."""
    x = rng.standard_normal((N * 4, 6)).astype(np.float32)
    plan = _plan_in(mesh8, _ring, [x], SPEC, num_workers=2, tile_m=2, tile_n=4)
    puts = [t for t, task in enumerate(plan.tasks) if plan.ops[task.op].kind == "put"]
    # a put queued after its producer on the same worker
    t, producer = next(
        (t, d)
        for q in plan.queues
        for k, t in enumerate(q)
        if t in puts
        for d in plan.tasks[t].deps
        if d in q[:k]
    )
    bad = plan.copy()
    bad.tasks[t].deps.remove(producer)
    with pytest.raises(PlanError, match="missing dependency; a put task's copies may be sent"):
        bad.validate()
    # the same edit of a compute task (no eager start) is still covered by its queue order
    plan.validate()


def test_plan_naming_an_unbound_axis_is_a_plan_error(mesh8, rng):
    x = rng.standard_normal((N * 4, 6)).astype(np.float32)
    plan = _plan_in(mesh8, _ring, [x], SPEC, num_workers=2)
    bad = plan.copy()
    bad.comm.axes = ("z",)
    bad.comm.axis_sizes = ()
    f = jax.shard_map(ark.persistent(_ring, plan=bad), mesh=mesh8, check_vma=False, **SPEC)
    with pytest.raises(PlanError, match=r"comm.axes \('z',\).*'z' is not bound"):
        jax.jit(f)(x)


def test_put_in_a_loop_must_be_stacked_forward(mesh8, rng):
    """A reversed stacked put fills slice trip_count - 1 - i at iteration i while the body reads
    slice i: the early iterations read slices no peer wrote yet. Found as wrong results."""
    x = rng.standard_normal((N * 2, 4)).astype(np.float32)
    ws = (rng.standard_normal((3, 4, 4)) * 0.5).astype(np.float32)
    specs = {"in_specs": (P("x"), P()), "out_specs": P("x")}
    plan = _plan_in(mesh8, _scan_psum, [x, ws], specs, num_workers=2)
    put = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    assert plan.ops[put].stacked and not plan.ops[put].stack_reversed
    bad = plan.copy()
    bad.ops[put].stack_reversed = True
    with pytest.raises(PlanError, match="must be stacked forward"):
        bad.validate()
    # the runtime's own check refuses the words too (OpLoopRecord.stacked = 2)
    words = plan.to_binary()
    h = words[:32]
    loops_at = int(h[30])
    stacked_word = loops_at + 2 + 8 * int(words[loops_at]) + 2 * put + 1
    assert words[stacked_word] == 1
    words[stacked_word] = 2

    def body(*local):
        return run_plan(plan, list(local), words=words, timeout_ms=5_000)[0][0]

    f = jax.jit(jax.shard_map(body, mesh=mesh8, check_vma=False, **specs))
    with pytest.raises(Exception, match="INVALID_ARGUMENT.*must be stacked forward"):
        jax.block_until_ready(f(x, ws))


def test_reading_a_slice_of_a_stacked_inbox_not_yet_put_is_refused(mesh8, rng):
    """The body reads slice i of its stacked inbox at iteration i. A view moved to slice 2 for
    every iteration reads, at iterations 0 and 1, a slice no peer has put yet: the dependencies
    cannot tell (the put's tasks write every slice). Found as wrong results on every rank."""
    x = rng.standard_normal((N * 2, 4)).astype(np.float32)
    ws = (rng.standard_normal((3, 4, 4)) * 0.5).astype(np.float32)
    specs = {"in_specs": (P("x"), P()), "out_specs": P("x")}
    plan = _plan_in(mesh8, _scan_psum, [x, ws], specs, num_workers=2)
    put = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    inbox = plan.ops[put].out
    size = int(np.prod(plan.tensors[inbox].shape[1:]))
    readers = [v for v, view in enumerate(plan.views) if view.tensor == inbox]
    assert readers and all(plan.views[v].iter_stride == size for v in readers)

    def moved(offset_slices: int, stride: int) -> Plan:
        edited = plan.copy()
        for v in readers:
            edited.views[v] = dataclasses.replace(
                edited.views[v], offset=edited.views[v].offset + offset_slices * size,
                iter_stride=stride,
            )  # fmt: skip
        return edited

    with pytest.raises(PlanError, match="slices its loop has not written yet at iteration 0"):
        moved(2, 0).validate()
    with pytest.raises(PlanError, match="not written yet"):
        moved(1, 0).validate()  # slice 1 at iteration 0
    moved(0, 0).validate()  # slice 0 at every iteration: written at iteration 0, kept after


def _scan_psum_of_rows(x, ws):
    def layer(h, w):
        y = jnp.tanh(h @ w)  # row tiles: two tasks of 2 rows each
        return h + jax.lax.psum(y[:2], "x").sum(), None

    return jax.lax.scan(layer, x, ws)[0]


def test_put_source_moving_with_the_iteration_needs_every_producer(mesh8, rng):
    """A put in a loop whose source view moves with the iteration (iter_stride) reads other rows
    at iteration 1 than at 0; the dependency check used to look at iteration 0's rows only, so
    the producer of the later rows was missing (a race). Found by reading the fuzzer's gaps."""
    x = rng.standard_normal((N * 4, 4)).astype(np.float32)
    ws = (rng.standard_normal((2, 4, 4)) * 0.5).astype(np.float32)
    specs = {"in_specs": (P("x"), P()), "out_specs": P("x")}
    plan = _plan_in(mesh8, _scan_psum_of_rows, [x, ws], specs, num_workers=2, tile_m=2)
    put = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    v = plan.ops[put].a_view
    assert plan.views[v].iter_stride == 0 and plan.tensors[plan.views[v].tensor].shape == (4, 4)
    bad = plan.copy()
    bad.views[v] = dataclasses.replace(bad.views[v], iter_stride=8)  # rows 2..3 at iteration 1
    with pytest.raises(PlanError, match=r"put.*missing dependency"):
        bad.validate()
