"""Puts read in place (CPU executor; docs/plan_format.md, "Puts read in place").

On the CPU the ranks of a group share one address space, so a put whose inbox only programs'
loads read makes no copies: each reader reads every slot's tile in the source rank's region. The
values must be the copies' bit for bit, for every worker count, in chaos mode, over back-to-back
calls (a source is overwritten by the next call only once every reader has left the previous
one), and the plans that cannot be read in place (an all_gather feeding a matmul operand, a put
in a loop, a source that is an argument) keep their copies.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from group_models import plan_for_gpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args
from test_persistent_comm import sp_mlp, tp_mlp

import jax_ark as ark
from jax_ark._persistent import _comm
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Plan, PlanError

TOL = 2e-5


@pytest.fixture(scope="module")
def dp_tp(cpu_devices):
    """2 x 4 mesh of CPU devices, axes ("dp", "tp")."""
    return Mesh(np.array(cpu_devices).reshape(2, 4), ("dp", "tp"))


def moe(x, w):
    """all_to_all dispatch, the local expert, all_to_all back (its inboxes read by maps)."""
    y = jax.lax.all_to_all(x * 2.0 + 1.0, "x", 0, 0, tiled=True)
    y = jnp.tanh(y @ w)
    return jax.lax.all_to_all(y, "x", 0, 0, tiled=True)


def big_psum(x):
    """Two-shot on the CPU (>= 32 KiB per rank): a reduce-scatter, then an all_gather of the
    folded blocks that the result's copy reads in place."""
    return jax.lax.psum(x * 1.5 - 0.25, "x")


def grad_step(x, w1, w2):
    """dp x tp: the psum over tp, the gradients' pmean over dp."""

    def loss(w1, w2):
        return jnp.mean(jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "tp") ** 2)

    g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
    return jax.lax.pmean(g1, "dp"), jax.lax.pmax(g2, "dp")


TP = {"in_specs": (P(), P(None, "x"), P("x", None)), "out_specs": P()}
SP = {"in_specs": (P("x"), P(None, "x"), P("x", None)), "out_specs": P("x")}
MOE = {"in_specs": (P("x"), P()), "out_specs": P("x")}
BIG = {"in_specs": (P("x"),), "out_specs": P()}
GRAD = {"in_specs": (P("dp"), P(None, "tp"), P("tp", None)), "out_specs": (P(None, "tp"), P("tp"))}


def _cases(rng, mesh8, dp_tp):
    return {
        "tp": (mesh8, tp_mlp, random_args(rng, [(48, 64), (64, 8 * 48), (8 * 48, 64)]), TP),
        "sp": (mesh8, sp_mlp, random_args(rng, [(8 * 24, 48), (48, 8 * 32), (8 * 32, 48)]), SP),
        "moe": (mesh8, moe, random_args(rng, [(8 * 16, 32), (32, 32)]), MOE),
        "big_psum": (mesh8, big_psum, random_args(rng, [(8 * 64, 160)]), BIG),
        "grad": (
            dp_tp,
            grad_step,
            random_args(rng, [(2 * 16, 32), (32, 4 * 24), (4 * 24, 32)]),
            GRAD,
        ),
    }


def _program(mesh, fn, specs, **kw):
    return jax.jit(jax.shard_map(ark.persistent(fn, **kw), mesh=mesh, **specs))


def _plan_in(mesh, fn, args, specs, **kw) -> Plan:
    pf = ark.persistent(fn, **kw)
    box: list[Plan] = []

    def body(*local):
        box.append(pf.plan(*local))
        return pf(*local)

    jax.jit(jax.shard_map(body, mesh=mesh, **specs))(*args)
    return box[0]


def _in_place(plan: Plan) -> list[int]:
    return [i for i, op in enumerate(plan.ops) if op.kind == "put" and op.read_in_place]


def test_which_puts_are_read_in_place(mesh8, dp_tp, rng):
    cases = _cases(rng, mesh8, dp_tp)
    for name, (mesh, fn, args, specs) in cases.items():
        plan = _plan_in(mesh, fn, args, specs, num_workers=2)
        puts = [i for i, op in enumerate(plan.ops) if op.kind == "put"]
        in_place = _in_place(plan)
        assert in_place, name
        for i in in_place:
            op = plan.ops[i]
            src = plan.tensors[plan.views[op.a_view].tensor]
            # the source lies in the region with the inboxes, below every other workspace tensor
            assert src.storage == "workspace"
            region_end = max(
                plan.tensors[t].byte_offset + plan.tensors[t].nbytes
                for t in {plan.ops[p].out for p in puts}
                | {plan.views[plan.ops[p].a_view].tensor for p in in_place}
            )
            assert src.byte_offset + src.nbytes <= region_end
            assert "read in place from" in plan.summary()
        if name == "sp":
            # the gathered rows are a matmul's operand: that put copies
            gather = puts[0]
            assert gather not in in_place
            assert any(op.kind == "matmul" and plan.views[op.a_view].tensor == plan.ops[gather].out
                       for op in plan.ops)  # fmt: skip
        # the GPU plan of the same function copies
        gpu = plan_for_gpu(mesh, fn, args, specs, num_workers=4)
        assert not _in_place(gpu), name


def test_a_source_that_is_an_argument_is_copied(mesh8, rng):
    (x,) = random_args(rng, [(8 * 8, 40)])
    fn = lambda v: jax.lax.psum(v, "x")  # noqa: E731
    plan = _plan_in(mesh8, fn, [x], BIG, num_workers=1)
    assert [op.kind for op in plan.ops if op.kind == "put"] and not _in_place(plan)
    got = _program(mesh8, fn, BIG, num_workers=1)(x)
    want = jax.jit(jax.shard_map(fn, mesh=mesh8, **BIG))(x)
    assert_close(got, want, TOL)


def test_a_put_in_a_loop_is_copied(mesh8, rng):
    """A loop's puts write one inbox slice per iteration and may be read after the source's next
    iteration overwrote it: they copy."""
    (x,) = random_args(rng, [(8 * 8, 40)])

    def fn(v):
        # a carry varying over "x": c plus the psum of half of it, three times
        return jax.lax.fori_loop(0, 3, lambda i, c: c + jax.lax.psum(c * 0.5, "x"), v * 1.0)

    specs = {"in_specs": (P("x"),), "out_specs": P("x")}
    plan = _plan_in(mesh8, fn, [x], specs, num_workers=2)
    assert any(op.kind == "put" and op.loop >= 0 for op in plan.ops) and not _in_place(plan)


@pytest.mark.parametrize("case", ["tp", "sp", "moe", "big_psum", "grad"])
def test_reads_in_place_equal_copies_bitwise(mesh8, dp_tp, rng, monkeypatch, case):
    """The same function planned with copies (the tracer's switch off) and read in place: the
    same bits for 1..3 workers and in chaos mode, and jax.lax's values."""
    mesh, fn, args, specs = _cases(rng, mesh8, dp_tp)[case]
    want = jax.jit(jax.shard_map(fn, mesh=mesh, **specs))(*args)
    monkeypatch.setitem(_comm._READS_IN_PLACE, "cpu", False)
    assert not _in_place(_plan_in(mesh, fn, args, specs, num_workers=2))
    copies = jax.tree.map(np.asarray, _program(mesh, fn, specs, num_workers=2)(*args))
    monkeypatch.setitem(_comm._READS_IN_PLACE, "cpu", True)
    for workers in (1, 2, 3):
        got = _program(mesh, fn, specs, num_workers=workers)(*args)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), copies)
    jax.tree.map(lambda g, w: assert_close(g, w, TOL), copies, want)
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "7")
    got = _program(mesh, fn, specs, num_workers=2)(*args)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), copies)


def test_back_to_back_calls_with_new_values(mesh8, rng):
    """Calls dispatched without waiting, each with new values: a rank's next call overwrites a
    source that peers read in place only after they left the call reading it, so every result
    is its own call's."""
    f = _program(mesh8, big_psum, BIG, num_workers=2)
    g = _program(mesh8, tp_mlp, TP, num_workers=1)
    ref_f = jax.jit(jax.shard_map(big_psum, mesh=mesh8, **BIG))
    ref_g = jax.jit(jax.shard_map(tp_mlp, mesh=mesh8, **TP))
    xs = [random_args(rng, [(8 * 64, 160)])[0] for _ in range(12)]
    ts = [random_args(rng, [(48, 64), (64, 8 * 48), (8 * 48, 64)]) for _ in range(12)]
    outs = [(f(x), g(*t)) for x, t in zip(xs, ts, strict=True)]
    for (a, b), x, t in zip(outs, xs, ts, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(_program(mesh8, big_psum, BIG)(x)))
        assert_close(a, ref_f(x), TOL)
        assert_close(b, ref_g(*t), TOL)


def test_int32_fold_read_in_place_is_exact(mesh8, rng):
    x = rng.integers(-(2**20), 2**20, size=(8 * 64, 160), dtype=np.int32)
    fn = lambda v: jax.lax.psum(v * 3 + 1, "x")  # noqa: E731
    assert _in_place(_plan_in(mesh8, fn, [x], BIG, num_workers=2))
    got = _program(mesh8, fn, BIG, num_workers=2)(x)
    want = jax.jit(jax.shard_map(fn, mesh=mesh8, **BIG))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_plans_that_cannot_be_read_in_place_are_refused(mesh8, rng):
    """validate() and the runtime's check refuse a hand-edited read_in_place put whose source
    has two writers, is an argument, or whose inbox a matmul reads as an operand."""
    args = random_args(rng, [(8 * 24, 48), (48, 8 * 32), (8 * 32, 48)])
    plan = _plan_in(mesh8, sp_mlp, args, SP, num_workers=2)
    gather = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    bad = Plan.from_json(plan.to_json())
    bad.ops[gather].read_in_place = True
    with pytest.raises(PlanError, match="read_in_place, but"):
        bad.validate()

    def unchecked(*local):  # the words as they are: the runtime's own check refuses them
        return run_plan(bad, list(local), timeout_ms=5000)[0][0]

    program = jax.jit(jax.shard_map(unchecked, mesh=mesh8, check_vma=False, **SP))
    with pytest.raises(Exception, match="read_in_place, but") as e:
        jax.block_until_ready(program(*args))
    assert "INVALID_ARGUMENT" in str(e.value)
    # a source read in place that a second op writes too (peers would see that write unordered)
    in_place = _in_place(plan)[0]
    src = plan.views[plan.ops[in_place].a_view].tensor
    two = Plan.from_json(plan.to_json())
    other = next(i for i, op in enumerate(two.ops) if op.kind != "put" and op.out != src)
    two.ops[other].out = src
    with pytest.raises(PlanError):
        two.validate()
    # a read-in-place put on the GPU: refused before anything is launched
    with pytest.raises(PlanError, match="read in place runs on the CPU executor only"):
        jax.jit(
            jax.shard_map(
                lambda *local: run_plan(plan, list(local), check_on_host=True)[0][0],
                mesh=mesh8,
                check_vma=False,
                **SP,
            )
        ).lower(*args)


def _gather_columns(x):
    """A gathered inbox copied out through a transposed view (its rows interleave the ranks)."""
    return jax.lax.all_gather(x * 2.0, "x", axis=1, tiled=True)


def _gather_stacked_t(x):
    """Stacked, then transposed: the result copy walks the inbox with strides, inside one slot
    (m and n swapped) and across slots (the rank axis last)."""
    g = jax.lax.all_gather(x + 1.0, "x")
    return jnp.swapaxes(g, 1, 2), jnp.swapaxes(g, 0, 2)


def _a2a_other_axes(x):
    return jax.lax.all_to_all(x - 0.5, "x", 1, 0, tiled=True)


def _bf16_psum_and_gather(x):
    y = (x * 3.0).astype(jnp.bfloat16)
    return jax.lax.psum(y, "x"), jax.lax.all_gather(y, "x", tiled=True)


def _pmin_of_rows(x):
    return jax.lax.pmin(jnp.sin(x), "x"), jax.lax.pmax(x[:, :1] * 2.0, "x")


_LAYOUTS = {
    "gather_columns": (_gather_columns, (8 * 4, 24), P("x"), P("x")),
    "gather_stacked_t": (_gather_stacked_t, (8 * 3, 5), P("x"), (P("x"), P("x"))),
    "a2a_other_axes": (_a2a_other_axes, (8 * 4, 8 * 3), P("x"), P("x")),
    "bf16": (_bf16_psum_and_gather, (8 * 16, 24), P("x"), (P(), P("x"))),
    "pmin_rows": (_pmin_of_rows, (8 * 6, 40), P("x"), (P(), P())),
}


@pytest.mark.parametrize("case", sorted(_LAYOUTS))
def test_other_layouts_read_in_place_equal_copies(mesh8, rng, monkeypatch, case):
    """Inboxes read through strided and transposed views, 16-bit values (bytes moved as they
    are) and scalar-per-row folds: bit for bit the copies' result, and jax.lax's values."""
    fn, shape, in_spec, out_spec = _LAYOUTS[case]
    specs = {"in_specs": (in_spec,), "out_specs": out_spec}
    (x,) = random_args(rng, [shape])
    assert _in_place(_plan_in(mesh8, fn, [x], specs, num_workers=2)), case
    got = jax.tree.map(np.asarray, _program(mesh8, fn, specs, num_workers=2)(x))
    monkeypatch.setitem(_comm._READS_IN_PLACE, "cpu", False)
    copies = jax.tree.map(np.asarray, _program(mesh8, fn, specs, num_workers=2)(x))
    jax.tree.map(np.testing.assert_array_equal, got, copies)
    want = jax.jit(jax.shard_map(fn, mesh=mesh8, **specs))(x)
    jax.tree.map(
        lambda g, w: assert_close(np.asarray(g, np.float32), np.asarray(w, np.float32), 1e-2),
        got,
        want,
    )


def test_a_race_found_on_one_rank_fails_its_peers_at_once(mesh8, rng, monkeypatch):
    """Chaos mode on a plan whose fold no longer waits for its put (a deleted dependency): the
    rank whose runs disagree stops after that run and breaks the group's region, so its peers,
    waiting for its next run, fail with its race at once instead of at their deadline."""
    args = random_args(rng, [(48, 64), (64, 8 * 48), (8 * 48, 64)])
    plan = _plan_in(mesh8, tp_mlp, args, TP, num_workers=2)
    broken = plan.copy()
    folds = [t for t, task in enumerate(plan.tasks) if plan.ops[task.op].kind == "reduce"]
    for t in folds:  # a fold first in its queue, waiting for no put
        broken.tasks[t].deps = []
    broken.queues = [[t for t in q if t in folds] + [t for t in q if t not in folds]
                     for q in broken.queues]  # fmt: skip
    with pytest.raises(PlanError, match="missing dependency"):
        broken.validate()

    def body(*local):
        return run_plan(broken, list(local), timeout_ms=30000)[0][0]

    program = jax.jit(jax.shard_map(body, mesh=mesh8, check_vma=False, **TP))
    want = np.asarray(jax.jit(jax.shard_map(tp_mlp, mesh=mesh8, **TP))(*args))
    races = 0
    for seed in (3, 5, 7):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        start = time.monotonic()
        try:
            got = np.asarray(program(*args))
        except Exception as e:  # noqa: BLE001
            assert "the plan has a race" in str(e) and "DEADLINE" not in str(e), str(e)
            races += 1
        else:
            assert not np.allclose(got, want, rtol=TOL, atol=TOL)
        # Liveness, not speed: every rank returns long before the 30 s deadline (without the
        # broken region the peers of the racing rank waited all of it: checked).
        assert time.monotonic() - start < 15
    assert races
