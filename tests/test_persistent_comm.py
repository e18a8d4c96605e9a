"""Collectives inside ark.persistent (plan v3 put tasks), on 8 CPU devices.

Every model is compared with `jax.jit(jax.shard_map(fn))` running jax.lax's collectives on the
same fresh random inputs; chaos mode and every worker count must give bitwise the same result as a
plain run (the executor's math never depends on timing or placement).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest
from group_models import plan_for_gpu
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args

import jax_ark
import jax_ark as ark
from jax_ark._persistent import _comm
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Plan, PlanError
from jax_ark._persistent._reference import interpret_group

TOL = 2e-5


def tp_mlp(x, w1, w2):
    """Megatron tensor-parallel MLP: column-parallel w1, gelu, row-parallel w2, psum."""
    return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "x")


def tp_mlp_ark(x, w1, w2):
    return jax_ark.psum(jax.nn.gelu(x @ w1) @ w2, "x")


def sp_mlp(x, w1, w2):
    """Sequence-parallel MLP: all_gather rows -> matmul -> gelu -> matmul -> psum_scatter rows."""
    xg = jax.lax.all_gather(x, "x", tiled=True)
    y = jax.nn.gelu(xg @ w1) @ w2
    return jax.lax.psum_scatter(y, "x", scatter_dimension=0, tiled=True)


TP_SPECS = {"in_specs": (P(), P(None, "x"), P("x", None)), "out_specs": P()}
SP_SPECS = {"in_specs": (P("x"), P(None, "x"), P("x", None)), "out_specs": P("x")}


def _tp_args(rng, rows=48, d=64, hidden=8 * 48):
    return random_args(rng, [(rows, d), (d, hidden), (hidden, d)])


def _sp_args(rng, rows=8 * 24, d=48, hidden=8 * 32):
    return random_args(rng, [(rows, d), (d, hidden), (hidden, d)])


def _run(mesh, fn, args, specs, check_vma=True, **kw):
    return jax.jit(jax.shard_map(fn, mesh=mesh, check_vma=check_vma, **specs))(*args)


def _ark(mesh, fn, args, specs, check_vma=True, **kw):
    return _run(mesh, ark.persistent(fn, **kw), args, specs, check_vma)


def _plan_in(mesh, fn, args, specs, **kw) -> Plan:
    """The plan persistent(fn) makes for one device's part of args (planned inside shard_map,
    where the mesh axes are bound)."""
    pf = ark.persistent(fn, **kw)
    box = []

    def body(*local):
        box.append(pf.plan(*local))
        return pf(*local)

    _run(mesh, body, args, specs)
    return box[0]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_tp_mlp_equals_lax(mesh8, rng, workers):
    args = _tp_args(rng)
    want = _run(mesh8, tp_mlp, args, TP_SPECS)
    got = _ark(mesh8, tp_mlp, args, TP_SPECS, num_workers=workers)
    assert_close(got, want, TOL)


def test_tp_mlp_ark_psum_spelling(mesh8, rng):
    args = _tp_args(rng)
    want = _run(mesh8, tp_mlp, args, TP_SPECS)
    got = _ark(mesh8, tp_mlp_ark, args, TP_SPECS, num_workers=2)
    assert_close(got, want, TOL)
    # one plan, the same ops: jax_ark.psum is planned like jax.lax.psum
    plan = _plan_in(mesh8, tp_mlp_ark, args, TP_SPECS, num_workers=2)
    lax_plan = _plan_in(mesh8, tp_mlp, args, TP_SPECS, num_workers=2)
    assert [op.kind for op in plan.ops] == [op.kind for op in lax_plan.ops]
    assert "put" in [op.kind for op in plan.ops]


@pytest.mark.parametrize("workers", [1, 3])
def test_sp_mlp_equals_lax(mesh8, rng, workers):
    args = _sp_args(rng)
    want = _run(mesh8, sp_mlp, args, SP_SPECS)
    got = _ark(mesh8, sp_mlp, args, SP_SPECS, num_workers=workers)
    assert_close(got, want, TOL)


def test_2d_mesh_dp_tp(mesh2x4, rng):
    """dp over 'x' (rows of the batch), tp over 'y': the psum's group is one row of the mesh."""

    def mlp(x, w1, w2):
        return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "y")

    specs = {"in_specs": (P("x"), P(None, "y"), P("y", None)), "out_specs": P("x")}
    args = random_args(rng, [(2 * 16, 32), (32, 4 * 24), (4 * 24, 32)])
    want = jax.jit(jax.shard_map(mlp, mesh=mesh2x4, **specs))(*args)
    got = jax.jit(jax.shard_map(ark.persistent(mlp, num_workers=2), mesh=mesh2x4, **specs))(*args)
    assert_close(got, want, TOL)


COLLECTIVES = {
    "all_gather_tiled": (lambda x: jax.lax.all_gather(x, "x", tiled=True) * 2.0, P("x")),
    "all_gather_axis1": (lambda x: jax.lax.all_gather(x, "x", axis=1) + 1.0, P("x")),
    "psum_scatter_dim0": (
        lambda x: jax.lax.psum_scatter(x * 3.0, "x", scatter_dimension=0, tiled=True),
        P("x"),
    ),
    "psum_scatter_dim1": (
        lambda x: jax.lax.psum_scatter(x, "x", scatter_dimension=1, tiled=True),
        P(None, "x"),
    ),
    "pmax_pmin_pmean": (
        lambda x: (jax.lax.pmax(x, "x"), jax.lax.pmin(x, "x"), jax.lax.pmean(x, "x")),
        (P(), P(), P()),
    ),
    "all_to_all": (lambda x: jax.lax.all_to_all(x, "x", 0, 1, tiled=True), P("x")),
    "psum_tuple": (lambda x: jax.lax.psum((x, 2.0 * x[:, :3]), "x"), (P(), P())),
}


@pytest.mark.parametrize("name", sorted(COLLECTIVES))
def test_collective_equals_lax(mesh8, rng, name):
    fn, out_specs = COLLECTIVES[name]
    x = rng.standard_normal((8 * 16, 64)).astype(np.float32)
    specs = {"in_specs": (P("x"),), "out_specs": out_specs}
    want = _run(mesh8, fn, [x], specs)
    got = _ark(mesh8, fn, [x], specs, num_workers=2)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        assert_close(g, w, TOL)


_ALL_REDUCES = {"psum": jax.lax.psum, "pmax": jax.lax.pmax, "pmin": jax.lax.pmin}


@pytest.mark.parametrize("name", sorted(_ALL_REDUCES))
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_large_all_reduce_is_two_shot_and_bitwise_the_one_shot(
    mesh8, mesh2x4, rng, monkeypatch, name, dtype
):
    """From 32 KiB per rank a psum / pmax / pmin is a reduce-scatter then an all-gather (two put
    ops): equal to jax.lax (integers exactly) and bit for bit the one-shot plan's result, on the
    8-device axis, on one axis and both axes of the 2 x 4 mesh (subgroups), and for a vector."""
    reduce = _ALL_REDUCES[name]
    if dtype == np.int32:
        x = rng.integers(-(2**20), 2**20, size=(8 * 64, 160), dtype=np.int32)
    else:
        x = rng.standard_normal((8 * 64, 160)).astype(np.float32)  # 40 KiB per rank
    cases = [
        (mesh8, lambda v: reduce(v * 3 - 1, "x"), {"in_specs": (P("x"),), "out_specs": P()}),
        (mesh2x4, lambda v: reduce(v, "y"), {"in_specs": (P(("x", "y")),), "out_specs": P("x")}),
        (
            mesh2x4,
            lambda v: reduce(v, ("x", "y")),
            {"in_specs": (P(("x", "y")),), "out_specs": P()},
        ),
        # a long vector (one row): n blocks of its elements
        (
            mesh8,
            lambda v: reduce(v.reshape(-1)[3:-5], "x"),
            {"in_specs": (P("x"),), "out_specs": P()},
        ),
    ]
    for mesh, fn, specs in cases:
        plan = _plan_in(mesh, fn, [x], specs, num_workers=2)
        assert [op.kind for op in plan.ops].count("put") == 2
        want = np.asarray(_run(mesh, fn, [x], specs))
        got = np.asarray(_ark(mesh, fn, [x], specs, num_workers=2))
        if dtype == np.int32:
            np.testing.assert_array_equal(got, want)
        else:
            assert_close(got, want, TOL)
        with monkeypatch.context() as m:
            m.setitem(_comm._TWO_SHOT_BYTES, "cpu", 1 << 40)
            one_shot = _plan_in(mesh, fn, [x], specs, num_workers=2)
            assert [op.kind for op in one_shot.ops].count("put") == 1
            same = np.asarray(_ark(mesh, fn, [x], specs, num_workers=3))
        np.testing.assert_array_equal(got, same)


def test_int32_psum_is_exact(mesh8, rng):
    x = rng.integers(-(2**20), 2**20, size=(8 * 8, 40), dtype=np.int32)
    fn = lambda v: jax.lax.psum(v * 3 + 1, "x")  # noqa: E731
    specs = {"in_specs": (P("x"),), "out_specs": P()}
    want = _run(mesh8, fn, [x], specs)
    got = _ark(mesh8, fn, [x], specs, num_workers=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_chaos_and_worker_counts_give_identical_results(mesh8, rng, monkeypatch):
    """Chaos mode (adversarial orders, poisoned workspace, stalls) and 1..4 workers per rank:
    bitwise the same outputs (also a liveness test: put tasks never deadlock across ranks)."""
    args = _sp_args(rng)
    base = np.asarray(_ark(mesh8, sp_mlp, args, SP_SPECS, num_workers=1))
    for workers in (2, 3, 4):
        got = np.asarray(_ark(mesh8, sp_mlp, args, SP_SPECS, num_workers=workers))
        np.testing.assert_array_equal(got, base)
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "5")
    for workers in (1, 3):
        got = np.asarray(_ark(mesh8, sp_mlp, args, SP_SPECS, num_workers=workers))
        np.testing.assert_array_equal(got, base)
    targs = _tp_args(rng)
    want = _run(mesh8, tp_mlp, targs, TP_SPECS)
    assert_close(_ark(mesh8, tp_mlp, targs, TP_SPECS, num_workers=2), want, TOL)


def test_back_to_back_calls_reuse_the_group(mesh8, rng):
    """Many calls of one compiled program (one communicator per group, epochs per call)."""
    fn = jax.jit(jax.shard_map(ark.persistent(tp_mlp, num_workers=2), mesh=mesh8, **TP_SPECS))
    ref = jax.jit(jax.shard_map(tp_mlp, mesh=mesh8, **TP_SPECS))
    for _ in range(3):
        args = _tp_args(rng)
        outs = [fn(*args) for _ in range(4)]
        for o in outs:
            assert_close(o, ref(*args), TOL)


def test_dependencies_stay_per_tile(mesh8, rng):
    """No grid barrier: a put tile waits only for the matmul tiles that write its rows, and a
    matmul tile reading gathered rows waits only for the ranks whose rows it reads."""
    args = _sp_args(rng, rows=8 * 64, d=32, hidden=8 * 16)
    plan = _plan_in(mesh8, sp_mlp, args, SP_SPECS, num_workers=2, tile_m=16)
    kinds = [plan.ops[t.op].kind for t in plan.tasks]
    gather = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    rows_per_rank = plan.ops[gather].M
    first_matmul = next(i for i, op in enumerate(plan.ops) if op.kind == "matmul")
    puts_of = {t: plan.tasks[t] for t, k in enumerate(kinds) if plan.tasks[t].op == gather}
    waited_all = 0
    for task in plan.tasks:
        if task.op != first_matmul:
            continue
        sources = {puts_of[d].b0 for d in task.deps if d in puts_of}
        want = set(range(task.m0 // rows_per_rank, (task.m1 - 1) // rows_per_rank + 1))
        assert sources == want, (task, sources, want)
        waited_all += len(sources) == 8
    assert waited_all == 0
    # the scatter's put tiles: each depends on part of the producing matmul, not all of it
    scatter = max(i for i, op in enumerate(plan.ops) if op.kind == "put")
    producer_tasks = {
        t
        for t, task in enumerate(plan.tasks)
        if plan.ops[task.op].out == plan.views[plan.ops[scatter].a_view].tensor
    }
    for task in plan.tasks:
        if task.op == scatter:
            assert 0 < len(set(task.deps) & producer_tasks) < len(producer_tasks)


def test_plan_json_summary_and_edited_plan(mesh8, rng):
    args = _tp_args(rng)
    plan = _plan_in(mesh8, tp_mlp, args, TP_SPECS, num_workers=2)
    assert plan.version == 3 and plan.comm is not None and plan.comm.group_size == 8
    d = json.loads(plan.to_json())
    assert d["comm"] == {"axes": ["x"], "group_size": 8, "axis_sizes": [8]}
    assert any(op["kind"] == "put" for op in d["ops"])
    text = plan.summary()
    assert "put" in text and "comm task" in text and "bytes to each" in text
    assert "rank 0 -> all 8 ranks" in text
    again = Plan.from_json(plan.to_json()).validate()
    np.testing.assert_array_equal(again.to_binary(), plan.to_binary())
    # an edited plan (other worker placement) runs and gives the same result
    tasks = [t for q in again.queues for t in q]
    from jax_ark._persistent._format import topological_order

    order, _ = topological_order([list(t.deps) for t in again.tasks])
    again.queues = [order[0::2], order[1::2]]
    assert sorted(tasks) == sorted(again.queues[0] + again.queues[1])
    want = _ark(mesh8, tp_mlp, args, TP_SPECS, num_workers=2)
    got = _ark(mesh8, tp_mlp, args, TP_SPECS, plan=again)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_reference_interpreter_of_the_group(mesh8, rng):
    args = _sp_args(rng)
    plan = _plan_in(mesh8, sp_mlp, args, SP_SPECS, num_workers=2)
    x, w1, w2 = args
    n = 8
    per_rank = [
        [np.split(x, n)[r], np.split(w1, n, axis=1)[r], np.split(w2, n, axis=0)[r]]
        for r in range(n)
    ]
    outs = interpret_group(plan, per_rank)
    want = np.asarray(_run(mesh8, sp_mlp, args, SP_SPECS))
    assert_close(np.concatenate([o[0] for o in outs]), want, TOL)
    with pytest.raises(PlanError, match="interpret_group"):
        from jax_ark._persistent._reference import interpret

        interpret(plan, *per_rank[0])


def _tp_plan(mesh8, rng) -> Plan:
    return _plan_in(mesh8, tp_mlp, _tp_args(rng), TP_SPECS, num_workers=2)


def test_inboxes_fill_the_start_of_the_workspace_alone(mesh8, rng):
    """The executors keep workspace bytes [0, inbox end) in the group's peer-mapped region:
    every inbox (and the source of a put read in place, which peers read there) must lie there
    and every other workspace tensor after it."""
    for plan in (_tp_plan(mesh8, rng), _plan_in(mesh8, sp_mlp, _sp_args(rng), SP_SPECS)):
        inboxes = {op.out for op in plan.ops if op.kind == "put"}
        assert inboxes
        inboxes |= {plan.views[op.a_view].tensor for op in plan.ops if op.read_in_place}
        end = max(plan.tensors[t].byte_offset + plan.tensors[t].nbytes for t in inboxes)
        others = [
            s
            for t, s in enumerate(plan.tensors)
            if s.storage == "workspace" and t not in inboxes and s.nbytes
        ]
        assert others
        assert all(s.byte_offset >= end for s in others)


def test_validate_refuses_bad_comm_plans(mesh8, rng):
    plan = _tp_plan(mesh8, rng)
    put = next(i for i, op in enumerate(plan.ops) if op.kind == "put")
    inbox = plan.ops[put].out
    other = next(
        t
        for t, s in enumerate(plan.tensors)
        if s.storage == "workspace" and t != inbox and s.nbytes > 0
    )
    bad = plan.copy()
    bad.tensors[other].byte_offset = bad.tensors[inbox].byte_offset
    with pytest.raises(PlanError, match="shares workspace bytes|reads or overwrites|bytes"):
        bad.validate()
    bad = plan.copy()
    bad.comm = None
    with pytest.raises(PlanError, match="names no communication group"):
        bad.validate()
    bad = plan.copy()
    bad.comm.group_size = 4
    with pytest.raises(PlanError, match="group_size"):
        bad.validate()
    d = json.loads(plan.to_json())
    d["version"] = 2
    with pytest.raises(PlanError, match="comm: needs plan version 3"):
        Plan.from_json(d)
    d = json.loads(plan.to_json())
    d["comm"]["group_size"] = 0
    with pytest.raises(PlanError, match="comm.group_size"):
        Plan.from_json(d)
    # a reduce over the inbox that skips the put it reads: a missing dependency
    # (and queued first, so that no queue order makes the puts its ancestors either)
    bad = plan.copy()
    reducers = [t for t, task in enumerate(bad.tasks) if bad.ops[task.op].kind == "reduce"]
    for t in reducers:
        bad.tasks[t].deps = [d for d in bad.tasks[t].deps if bad.tasks[d].op != put]
    bad.queues = [[t for t in q if t not in reducers] for q in bad.queues]
    bad.queues[-1] = reducers + bad.queues[-1]
    with pytest.raises(PlanError, match="missing dependency"):
        bad.validate()


def test_runtime_check_refuses_bad_comm_words(mesh8, rng):
    """The C++ check (plan_check.hpp) on the words the CPU handler receives."""
    plan = _tp_plan(mesh8, rng)
    words = plan.to_binary()
    args = _tp_args(rng)
    put_op = next(i for i, op in enumerate(plan.ops) if op.kind == "put")

    def run_words(w):
        def body(*local):
            outs, _ = run_plan(plan, list(local), words=w)
            return outs[0]

        return jax.block_until_ready(_run(mesh8, body, args, TP_SPECS, check_vma=False))

    bad = words.copy()
    bad[31] = 4  # group_size != the put ops' B (and the counters' size)
    with pytest.raises(Exception, match="num_counters|group_size|counters"):
        run_words(bad)
    bad = words.copy()
    ops_at = int(words[14])
    bad[ops_at + 40 * put_op + 16] = 4  # put B
    with pytest.raises(Exception, match=r"B\*M\*N"):
        run_words(bad)
    bad = words.copy()
    bad[ops_at + 40 * put_op + 11] = 1  # an epilogue on a put
    with pytest.raises(Exception, match="a put op has no programs"):
        run_words(bad)
    # the good words still run
    assert_close(run_words(words), _run(mesh8, tp_mlp, args, TP_SPECS), TOL)


def test_a_peers_timeout_is_every_ranks_timeout(mesh8, rng):
    """When one rank times out waiting for a missing peer, the others give up through the broken
    region; they report the timeout's code too, so the error XLA picks (any device's) is always
    DEADLINE_EXCEEDED (it was ABORTED in 3 of 30 calls before)."""
    pf = ark.persistent(lambda v: jax.lax.psum(v * 2.0, "x"), num_workers=1, timeout_ms=200)

    def body(v):
        return jax.lax.cond(jax.lax.axis_index("x") == 5, lambda u: u, pf, v)

    x = rng.standard_normal((8, 4)).astype(np.float32)
    f = jax.jit(jax.shard_map(body, mesh=mesh8, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    for _ in range(15):
        with pytest.raises(Exception, match="DEADLINE_EXCEEDED"):
            jax.block_until_ready(f(x))


def test_missing_peer_times_out_naming_rank_and_peer(mesh8, rng):
    pf = ark.persistent(lambda v: jax.lax.psum(v * 2.0, "x"), num_workers=1, timeout_ms=1500)

    def body(v):
        skip = jax.lax.axis_index("x") == 5  # rank 5 never joins
        return jax.lax.cond(skip, lambda u: u, pf, v)

    x = rng.standard_normal((8, 4)).astype(np.float32)
    f = jax.jit(jax.shard_map(body, mesh=mesh8, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    with pytest.raises(Exception, match="DEADLINE_EXCEEDED") as err:
        jax.block_until_ready(f(x))
    msg = str(err.value)
    assert "ark_persistent: rank" in msg and "waiting for peer rank 5" in msg, msg
    assert "peer rank 5 has not begun call 1 at this call site (it has begun 0 here)" in msg, msg
    # the group works again afterwards (the broken region was discarded)
    g = jax.jit(jax.shard_map(pf, mesh=mesh8, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    want = jax.jit(
        jax.shard_map(
            lambda v: jax.lax.psum(v * 2.0, "x"),
            mesh=mesh8,
            in_specs=P("x"),
            out_specs=P("x"),
            check_vma=False,
        )
    )(x)
    assert_close(g(x), want, TOL)


def test_comm_plan_checked_on_host_runs_through_its_primitive(mesh8, rng):
    """What ark.persistent does on a GPU before launching (the runtime's check on the exact words
    sent, then the comm call primitive whose CUDA lowering bootstraps the symmetric regions), run
    here on the CPU: the check accepts the words and the result is jax.lax's. A CPU plan's puts
    are read in place, which the GPU refuses before launching."""
    args = _tp_args(rng)
    cpu_plan = _tp_plan(mesh8, rng)
    assert any(op.read_in_place for op in cpu_plan.ops)

    def refused(*local):
        return run_plan(cpu_plan, list(local), check_on_host=True)[0][0]

    with pytest.raises(PlanError, match="read in place runs on the CPU executor only"):
        jax.jit(jax.shard_map(refused, mesh=mesh8, check_vma=False, **TP_SPECS)).lower(*args)
    plan = plan_for_gpu(mesh8, tp_mlp, args, TP_SPECS, num_workers=2)
    assert plan.comm is not None and not any(op.read_in_place for op in plan.ops)

    def body(*local):
        outs, _ = run_plan(plan, list(local), check_on_host=True)
        return outs[0]

    # run_plan alone marks every result varying (ark.persistent passes out_varying): no vma check.
    program = jax.jit(jax.shard_map(body, mesh=mesh8, check_vma=False, **TP_SPECS))
    assert "ark_persistent" in program.lower(*args).as_text()
    got = program(*args)
    assert_close(np.asarray(got), np.asarray(_run(mesh8, tp_mlp, args, TP_SPECS)), TOL)


def test_timeline_draws_comm_tasks_per_rank(mesh8, rng):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    args = _tp_args(rng)
    pf = ark.persistent(tp_mlp, num_workers=2, profile=True)
    box = []

    def body(*local):
        box.append(pf.plan(*local))
        out, prof = pf(*local)
        return out, prof

    specs = {"in_specs": TP_SPECS["in_specs"], "out_specs": (P(), P("x"))}
    out, prof = jax.jit(jax.shard_map(body, mesh=mesh8, **specs))(*args)
    assert_close(out, _run(mesh8, tp_mlp, args, TP_SPECS), TOL)
    tl = ark.timeline(np.asarray(prof), box[0])
    assert sorted({r["rank"] for r in tl.records}) == list(range(8))
    assert any(r["kind"] == "put" for r in tl.records)
    fig = tl.gantt()
    gids = {c.get_gid() for c in fig.axes[0].collections}
    assert "comm tasks" in gids and "tasks" in gids
    trace = tl.to_chrome_trace()
    assert {e["pid"] for e in trace["traceEvents"]} == set(range(8))


ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_put_wait_times_out_and_cancels_naming_rank_peer_task(mesh8, rng, tmp_path):
    """A peer that never puts (rank 0 alone, tests/persistent_comm_host_test.cc): the executor's
    signal wait ends by its timeout, then by the process-wide cancel flag, naming the rank, the
    peer, the task and its op."""
    plan = _tp_plan(mesh8, rng)
    words = tmp_path / "plan.bin"
    words.write_bytes(plan.to_binary().astype("<i4").tobytes())
    src = ROOT / "cuda" / "src" / "cpu"
    exe = tmp_path / "comm_host_test"
    cmd = [CXX, "-std=c++17", "-O1", "-pthread", "-ffp-contract=off"]
    cmd += [
        f"-I{ROOT / 'cuda' / 'include'}",
        f"-I{src}",
        str(ROOT / "tests" / "persistent_comm_host_test.cc"),
    ]
    cmd += [
        str(src / f)
        for f in (
            "persistent_executor.cc",
            "persistent_region.cc",
            "host_communicator.cc",
            "host_collectives.cc",
        )
    ]
    built = subprocess.run([*cmd, "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe), str(words)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.count("ok:") == 7, ran.stdout
