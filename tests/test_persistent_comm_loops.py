"""Collectives inside loop bodies (plan v3 "Loops and communication"): a put in a scan / fori_loop
/ while_loop body, or in a loop nested in a scan / fori_loop, fills one slice of a stacked inbox
per run of its loops, its signals count delivered runs. Every model is compared with
`jax.jit(jax.shard_map(fn))` running jax.lax's collectives on fresh random inputs; 1..3 workers
and chaos mode must give the same bits; the reference interpreter must agree. What stays
unsupported (a put in a loop that is not stacked) is refused by every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args
from test_persistent_comm import TP_SPECS, _run, _tp_args, _tp_plan

import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import PLAN_VERSION, Loop, PlanError
from jax_ark._persistent._reference import interpret_group
from jax_ark._persistent._trace import UnsupportedError

N = 8
TOL = 2e-5


def _lax(mesh, fn, args, specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, check_vma=False, **specs))(*args)


def _ark(mesh, fn, args, specs, **kw):
    return jax.jit(jax.shard_map(ark.persistent(fn, **kw), mesh=mesh, check_vma=False, **specs))(
        *args
    )


def _plan_and_local_args(mesh, fn, args, specs, **kw):
    """The plan persistent(fn) makes (inside shard_map) and every rank's local inputs."""
    pf = ark.persistent(fn, **kw)
    box = []

    def body(*local):
        box.append(pf.plan(*local))
        return pf(*local)

    jax.jit(jax.shard_map(body, mesh=mesh, check_vma=False, **specs))(*args)
    per_rank = [[] for _ in range(N)]
    for a, spec in zip(args, specs["in_specs"], strict=True):
        parts = np.split(np.asarray(a), N, axis=0) if spec == P("x") else None
        if parts is None and spec == P(None, "x"):
            parts = np.split(np.asarray(a), N, axis=1)
        if parts is None and spec == P(None, None, "x"):
            parts = np.split(np.asarray(a), N, axis=2)
        if parts is None and spec == P(None, "x", None):
            parts = np.split(np.asarray(a), N, axis=1)
        if parts is None:
            parts = [np.asarray(a)] * N
        for r in range(N):
            per_rank[r].append(parts[r])
    return box[0], per_rank


def _check(mesh, fn, args, specs, monkeypatch, tol=TOL):
    """ark == jax.lax (1 worker); 2, 3 workers and chaos mode bitwise the same; and the plan has a
    loop holding a stacked put."""
    want = [np.asarray(o) for o in jax.tree.leaves(_lax(mesh, fn, args, specs))]
    base = [np.asarray(o) for o in jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=1))]
    for g, w in zip(base, want, strict=True):
        assert_close(g, w, tol)
    for w in (2, 3):
        for g, b in zip(
            jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=w)), base, strict=True
        ):
            np.testing.assert_array_equal(np.asarray(g), b)
    with monkeypatch.context() as m:
        m.setenv("JAX_ARK_PERSISTENT_CHAOS", "11")
        for w in (1, 3):
            for g, b in zip(
                jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=w)), base, strict=True
            ):
                np.testing.assert_array_equal(np.asarray(g), b)
    plan, per_rank = _plan_and_local_args(mesh, fn, args, specs, num_workers=2)
    puts = [op for op in plan.ops if op.kind == "put"]
    assert plan.loops and puts and all(op.loop >= 0 and op.stacked for op in puts)
    return plan, per_rank, want


# ---- a TP MLP stack: scan over stacked weights, psum per layer -------------------------------
LAYERS, BATCH, D, HID = 4, 4, 16, 32  # HID sharded over 8 ranks: 4 columns each


def _tp_mlp_stack(x, w1s, w2s):
    def layer(h, ws):
        w1, w2 = ws
        return jax.lax.psum(jnp.tanh(h @ w1) @ w2, "x") + h, None

    return jax.lax.scan(layer, x, (w1s, w2s))[0]


def test_tp_mlp_stack_scan_psum_per_layer(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P(), P(None, None, "x"), P(None, "x", None)), "out_specs": P()}
    args = random_args(rng, [(BATCH, D), (LAYERS, D, HID), (LAYERS, HID, D)])
    args = [args[0], args[1] * 0.3, args[2] * 0.3]
    plan, per_rank, want = _check(mesh8, _tp_mlp_stack, args, specs, monkeypatch)
    assert plan.loops[0].trip_count == LAYERS
    ref = interpret_group(plan, per_rank)
    for r in range(N):
        assert_close(ref[r][0], want[0], TOL)


# ---- fori_loop: all-reduce iterated -----------------------------------------------------------
def _iterated_allreduce(v):
    return jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.psum(c, "x") * 0.125 + 1.0, v)


def test_fori_loop_psum_of_the_carry(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P("x"),), "out_specs": P("x")}
    args = random_args(rng, [(N * 2, 8)])
    plan, per_rank, want = _check(mesh8, _iterated_allreduce, args, specs, monkeypatch)
    ref = interpret_group(plan, per_rank)
    assert_close(np.concatenate([r[0] for r in ref]), want[0], TOL)


def _nested_allreduce(v):
    def layer(d, _):
        return jax.lax.psum(d, "x") * 0.125 + 1.0, None

    def token(t, c):
        return jax.lax.scan(layer, c, None, length=2)[0] * 0.5

    return jax.lax.fori_loop(0, 2, token, v)


@pytest.mark.parametrize("fn", [_iterated_allreduce, _nested_allreduce])
def test_two_shot_psum_in_loops(mesh8, rng, monkeypatch, fn):
    """40 KiB per rank: each psum is a reduce-scatter and an all-gather, both stacked puts."""
    specs = {"in_specs": (P("x"),), "out_specs": P("x")}
    args = random_args(rng, [(N * 64, 160)])
    plan, per_rank, want = _check(mesh8, fn, args, specs, monkeypatch)
    assert [op.kind for op in plan.ops].count("put") == 2
    ref = interpret_group(plan, per_rank)
    assert_close(np.concatenate([r[0] for r in ref]), want[0], TOL)


def test_fori_loop_psum_int32_exact(mesh8, rng):
    specs = {"in_specs": (P("x"),), "out_specs": P("x")}
    x = rng.integers(-50, 50, (N * 2, 8)).astype(np.int32)

    def f(v):
        return jax.lax.fori_loop(0, 4, lambda i, c: jax.lax.psum(c, "x") % 1000 - i, v)

    got = _ark(mesh8, f, [x], specs, num_workers=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_lax(mesh8, f, [x], specs)))


# ---- all_gather inside a scan -----------------------------------------------------------------
def _gather_scan(x, ws):
    def step(c, w):
        g = jax.lax.all_gather(c, "x", tiled=True)  # (N * 2, 8)
        return jnp.tanh(g[:2] + g[-2:] + c @ w), g.sum(axis=0)

    return jax.lax.scan(step, x, ws)


def test_all_gather_inside_a_scan(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P("x"), P()), "out_specs": (P("x"), P("x"))}
    args = random_args(rng, [(N * 2, 8), (3, 8, 8)])
    _check(mesh8, _gather_scan, args, specs, monkeypatch)


# ---- a collective-matmul ring written as a fori_loop ------------------------------------------
RING = [(i, (i + 1) % N) for i in range(N)]


def _ring_matmul_loop(x, w):
    """all_gather(x) @ w as users write it: N steps, each multiplying the chunk this rank holds
    while the ring passes it on (ppermute of the carry), writing rows of the owner's block."""
    me = jax.lax.axis_index("x")
    rows = x.shape[0]

    def step(i, state):
        chunk, out = state
        owner = (me - i) % N
        out = jax.lax.dynamic_update_slice(out, chunk @ w, (owner * rows, 0))
        return jax.lax.ppermute(chunk, "x", RING), out

    out = jnp.zeros((N * rows, w.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, N, step, (x, out))[1]


def test_ppermute_ring_matmul_in_a_fori_loop(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P("x"), P(None, "x")), "out_specs": P(None, "x")}
    args = random_args(rng, [(N * 4, 32), (32, N * 8)])
    plan, per_rank, want = _check(mesh8, _ring_matmul_loop, args, specs, monkeypatch)
    assert_close(want[0], args[0] @ args[1], 1e-5)
    (put,) = [op for op in plan.ops if op.kind == "put"]  # planned once, not unrolled N times
    assert put.B == 1 and put.recv_from is not None and plan.loops[0].trip_count == N
    ref = interpret_group(plan, per_rank)
    assert_close(np.concatenate([r[0] for r in ref], axis=1), want[0], TOL)


# ---- while_loop whose predicate depends on a psum ---------------------------------------------
def _while_psum(v):
    def cond(c):
        return jax.lax.psum(jnp.sum(jnp.abs(c)), "x") > 1.0  # the same on every rank

    return jax.lax.while_loop(cond, lambda c: c * 0.5, v)


def test_while_loop_with_a_psum_predicate(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P("x"),), "out_specs": P("x")}
    args = random_args(rng, [(N * 2, 4)])
    plan, per_rank, want = _check(mesh8, _while_psum, args, specs, monkeypatch)
    assert plan.loops[0].pred_op >= 0
    ref = interpret_group(plan, per_rank)
    assert_close(np.concatenate([r[0] for r in ref]), want[0], TOL)


def _while_rank_local_predicate(v):
    """Rank r leaves once its own first element reaches r: a predicate that differs per rank."""
    me = jax.lax.axis_index("x").astype(jnp.float32)

    def body(c):
        return c + jax.lax.psum(c, "x") * 0.125

    return jax.lax.while_loop(lambda c: c[0, 0] < me, body, v)


def test_reference_refuses_ranks_disagreeing_on_a_while_predicate(mesh8, rng):
    """A predicate from rank-local values only: rank 0 leaves at once, the others loop. Without
    check_vma the tracer cannot see it; the reference interpreter names the disagreement (only the
    plan is made here: the executors cannot detect it, see docs/plan_format.md "Loops and
    communication")."""

    x = np.abs(rng.standard_normal((N * 2, 4))).astype(np.float32) * 0.5
    pf = ark.persistent(_while_rank_local_predicate, num_workers=1, max_while_iterations=64)
    box = []

    def only_plan(v):
        box.append(pf.plan(v))
        return v

    jax.jit(
        jax.shard_map(only_plan, mesh=mesh8, in_specs=(P("x"),), out_specs=P("x"), check_vma=False)
    )(x)
    per_rank = [[part] for part in np.split(x, N)]
    with pytest.raises(PlanError, match="disagree on its predicate at iteration 0"):
        interpret_group(box[0], per_rank)


def test_tracer_refuses_a_rank_varying_predicate_around_communication(mesh8, rng):
    """Under shard_map's check_vma typing the predicate's type says it varies over x: refused
    while planning, naming the axis and the fix, before any rank runs."""
    x = np.abs(rng.standard_normal((N * 2, 4))).astype(np.float32) * 0.5
    fn = jax.jit(
        jax.shard_map(
            ark.persistent(_while_rank_local_predicate, max_while_iterations=64),
            mesh=mesh8,
            in_specs=(P("x"),),
            out_specs=P("x"),
        )
    )
    with pytest.raises(UnsupportedError, match=r"varies over mesh axes \('x',\).*psum / pmax"):
        fn(x)


def test_a_uniform_predicate_passes_the_check_under_check_vma(mesh8, rng):
    """The same loop with the predicate made uniform by a pmax runs and matches jax.lax; a
    rank-local predicate around a body that does not communicate stays allowed (each rank runs
    its own loop)."""

    def uniform(v):
        def body(c):
            return c + jax.lax.psum(c, "x") * 0.125

        return jax.lax.while_loop(lambda c: jax.lax.pmax(c[0, 0], "x") < 3.0, body, v)

    def local_only(v):
        me = jax.lax.axis_index("x").astype(jnp.float32)
        return jax.lax.while_loop(lambda c: c[0, 0] < me, lambda c: c * 1.5 + 0.25, v)

    x = np.abs(rng.standard_normal((N * 2, 4))).astype(np.float32) * 0.5
    for fn in (uniform, local_only):
        specs = {"mesh": mesh8, "in_specs": (P("x"),), "out_specs": P("x")}
        want = jax.jit(jax.shard_map(fn, **specs))(x)
        got = jax.jit(jax.shard_map(ark.persistent(fn, max_while_iterations=64), **specs))(x)
        assert_close(np.asarray(got), np.asarray(want), TOL)


# ---- nested loops: one inbox slice per run of both loops ----------------------------------------
TOKENS = 3


def _decode_tokens_over_a_tp_stack(x, w1s, w2s):
    """A decode loop (fori_loop over tokens) around the TP MLP stack (scan over layers, psum per
    layer), the next token's input computed from the last hidden state: TOKENS x LAYERS runs of
    the psum's put in one persistent call."""

    def token(t, h):
        h = _tp_mlp_stack(h, w1s, w2s)
        return jnp.tanh(h) + t.astype(h.dtype) * 0.01

    return jax.lax.fori_loop(0, TOKENS, token, x)


def test_decode_loop_around_a_tp_layer_scan(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P(), P(None, None, "x"), P(None, "x", None)), "out_specs": P()}
    args = random_args(rng, [(BATCH, D), (LAYERS, D, HID), (LAYERS, HID, D)])
    args = [args[0], args[1] * 0.3, args[2] * 0.3]
    plan, per_rank, want = _check(mesh8, _decode_tokens_over_a_tp_stack, args, specs, monkeypatch)
    put = next(op for op in plan.ops if op.kind == "put")
    assert plan.loops[put.loop].parent >= 0  # the put is in the inner loop
    assert plan.tensors[put.out].shape[0] == TOKENS * LAYERS  # a slice per run
    ref = interpret_group(plan, per_rank)
    for r in range(N):
        assert_close(ref[r][0], want[0], TOL)


def _independent_runs(xs):
    """Each inner run all-gathers its own xs slice (no run waits for the previous one's result),
    and the outer loop psums the inner loop's stacked ys: a rank may run ahead of its peers by
    several runs, and only one inbox slice per run keeps their tiles apart."""

    def outer(c, o):
        def inner(d, x):
            g = jax.lax.all_gather(x * (o + 1.0), "x", tiled=True)
            return d + jnp.sum(g), g[:2]

        d, ys = jax.lax.scan(inner, 0.0, xs)
        return c + jax.lax.psum(ys, "x") * d, None

    return jax.lax.scan(outer, jnp.zeros((xs.shape[0], 2, xs.shape[2])), jnp.arange(3.0))[0]


def test_nested_loops_with_runs_independent_of_each_other(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P(None, "x", None),), "out_specs": P()}
    args = random_args(rng, [(4, N * 2, 8)])
    plan, per_rank, want = _check(mesh8, _independent_runs, args, specs, monkeypatch, tol=1e-4)
    puts = [op for op in plan.ops if op.kind == "put"]
    depths = sorted(plan.loops[op.loop].parent >= 0 for op in puts)
    assert depths == [False, True]  # one put per loop level
    ref = interpret_group(plan, per_rank)
    assert_close(ref[0][0], want[0], 1e-4)


def test_ppermute_ring_in_a_nested_loop(mesh8, rng, monkeypatch):
    """A ring matmul (fori_loop of ppermute steps) run once per outer step of a scan."""
    perm = [(i, (i + 1) % N) for i in range(N)]

    def fn(x, w):
        def step(c, _):
            def ring(s, carry):
                chunk, acc = carry
                return jax.lax.ppermute(chunk, "x", perm), acc + jnp.tanh(chunk @ w)

            chunk, acc = jax.lax.fori_loop(0, N, ring, (c, jnp.zeros((c.shape[0], w.shape[1]))))
            return acc @ w.T * 0.1 + chunk, None

        return jax.lax.scan(step, x, None, length=2)[0]

    specs = {"in_specs": (P("x"), P()), "out_specs": P("x")}
    args = random_args(rng, [(N * 2, 8), (8, 8)])
    _check(mesh8, fn, args, specs, monkeypatch)


def test_a_nested_put_with_one_slice_per_inner_iteration_is_refused(mesh8, rng, monkeypatch):
    """An edited plan whose nested put's inbox has a slice per inner iteration only (slices reused
    every outer iteration): refused by validate() and by the executor's check before it runs."""
    specs = {"in_specs": (P(), P(None, None, "x"), P(None, "x", None)), "out_specs": P()}
    args = random_args(rng, [(BATCH, D), (LAYERS, D, HID), (LAYERS, HID, D)])
    plan, _ = _plan_and_local_args(mesh8, _decode_tokens_over_a_tp_stack, args, specs)
    bad = plan.copy()
    put = next(op for op in bad.ops if op.kind == "put")
    inbox = bad.tensors[put.out]
    inbox.shape = (LAYERS, *inbox.shape[1:])
    with pytest.raises(PlanError, match="a put's: its runs per call"):
        bad.validate()
    words = bad.to_binary()

    def body(*local):
        return run_plan(plan, list(local), words=words)[0][0]

    with pytest.raises(Exception, match="a put's: its runs per call"):
        jax.block_until_ready(_lax(mesh8, body, args, specs))


def test_one_version_for_loops_and_comm():
    assert PLAN_VERSION == 3


def test_a_loop_inbox_over_the_cap_is_refused(mesh8, rng):
    """One inbox slice per iteration: a while_loop's default guard (65536) times a big psum would
    be gigabytes; the tracer refuses it and names the knob."""
    x = rng.standard_normal((8 * 64, 256)).astype(np.float32)
    specs = {"in_specs": (P("x"),), "out_specs": P("x")}

    def f(v):
        return jax.lax.while_loop(
            lambda c: jnp.sum(c[0]) > 1.0, lambda c: jax.lax.psum(c, "x") * 0.1, v
        )

    with pytest.raises(UnsupportedError, match="max_while_iterations"):
        _ark(mesh8, f, [x], specs)


def _comm_plan_with_an_unstacked_put_in_a_loop(mesh8, rng):
    plan = _tp_plan(mesh8, rng)
    bad = plan.copy()
    put = next(i for i, op in enumerate(bad.ops) if op.kind == "put")
    bad.loops = [Loop(trip_count=2, first_op=put, end_op=put + 1)]
    bad.ops[put].loop = 0
    return plan, bad


def test_validate_refuses_an_unstacked_put_in_a_loop(mesh8, rng):
    _, bad = _comm_plan_with_an_unstacked_put_in_a_loop(mesh8, rng)
    with pytest.raises(PlanError, match="a put op in a loop must be stacked"):
        bad.validate()


def test_runtime_check_refuses_an_unstacked_put_in_a_loop(mesh8, rng):
    plan, bad = _comm_plan_with_an_unstacked_put_in_a_loop(mesh8, rng)
    words = bad.to_binary()
    args = _tp_args(rng)

    def body(*local):
        outs, _ = run_plan(plan, list(local), words=words)
        return outs[0]

    with pytest.raises(Exception, match="a put op in a loop must be stacked"):
        jax.block_until_ready(_run(mesh8, body, args, TP_SPECS, check_vma=False))
