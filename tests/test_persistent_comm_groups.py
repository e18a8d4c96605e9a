"""ppermute, axis_index, several communication groups and jax.grad inside ark.persistent (plan v3
put tasks with routing tables), on 8 CPU devices.

Every model is compared with `jax.jit(jax.shard_map(fn))` running jax.lax's collectives on fresh
random inputs; worker counts and chaos mode must give bitwise the same result as a plain run.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args

import jax_ark
import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Plan, PlanError
from jax_ark._persistent._reference import interpret_group
from jax_ark._persistent._trace import UnsupportedError

TOL = 2e-5
N = 8


@pytest.fixture(scope="module")
def mesh4x2(cpu_devices):
    """2-D mesh 4x2 of CPU devices, axes ('x', 'y')."""
    return Mesh(np.array(cpu_devices).reshape(4, 2), ("x", "y"))


def _lax(mesh, fn, args, specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, **specs))(*args)


def _ark(mesh, fn, args, specs, **kw):
    return jax.jit(jax.shard_map(ark.persistent(fn, **kw), mesh=mesh, **specs))(*args)


def _plan_in(mesh, fn, args, specs, **kw) -> Plan:
    """The plan persistent(fn) makes for one device's part of args (inside shard_map)."""
    pf = ark.persistent(fn, **kw)
    box = []

    def body(*local):
        box.append(pf.plan(*local))
        return pf(*local)

    jax.jit(jax.shard_map(body, mesh=mesh, **specs))(*args)
    return box[0]


def _same_under_workers_and_chaos(mesh, fn, args, specs, monkeypatch, workers=(1, 2, 3, 4)):
    """Every worker count and chaos mode give the same bits as one worker."""
    base = [np.asarray(o) for o in jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=1))]
    for w in workers[1:]:
        got = jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=w))
        for g, b in zip(got, base, strict=True):
            np.testing.assert_array_equal(np.asarray(g), b)
    with monkeypatch.context() as m:
        m.setenv("JAX_ARK_PERSISTENT_CHAOS", "11")
        for w in (1, 3):
            got = jax.tree.leaves(_ark(mesh, fn, args, specs, num_workers=w))
            for g, b in zip(got, base, strict=True):
                np.testing.assert_array_equal(np.asarray(g), b)
    return base


# ---- ppermute and axis_index ----------------------------------------------------------------
RING_FWD = [(i, (i + 1) % N) for i in range(N)]
RING_BWD = [(i, (i - 1) % N) for i in range(N)]
PARTIAL = [(0, 3), (3, 5), (5, 0), (6, 6), (1, 2)]  # ranks 1, 4, 7 receive nothing: zeros

PERMS = {"ring_forward": RING_FWD, "ring_backward": RING_BWD, "partial": PARTIAL}


@pytest.mark.parametrize("name", sorted(PERMS))
def test_ppermute_equals_lax(mesh8, rng, monkeypatch, name):
    perm = PERMS[name]

    def shift(x):
        return jax.lax.ppermute(x * 2.0 + 1.0, "x", perm) - x

    specs = {"in_specs": P("x"), "out_specs": P("x")}
    args = random_args(rng, [(N * 6, 40)])
    want = _lax(mesh8, shift, args, specs)
    got = _same_under_workers_and_chaos(mesh8, shift, args, specs, monkeypatch)
    assert_close(got[0], want, TOL)
    if name == "partial":  # the ranks no pair sends to get zeros, as with jax.lax
        rows = np.asarray(want).reshape(N, 6, 40)
        x = args[0].reshape(N, 6, 40)
        for r in (1, 4, 7):
            np.testing.assert_array_equal(rows[r], -x[r])


def test_jax_ark_ppermute_spelling_and_int32_exact(mesh8, rng):
    def shift(x):
        return jax_ark.ppermute(x, "x", RING_FWD) * 3

    specs = {"in_specs": P("x"), "out_specs": P("x")}
    x = rng.integers(-(2**20), 2**20, (N * 4, 16)).astype(np.int32)
    want = _lax(mesh8, lambda v: jax.lax.ppermute(v, "x", RING_FWD) * 3, [x], specs)
    got = _ark(mesh8, shift, [x], specs, num_workers=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_axis_index_on_2d_meshes(mesh2x4, mesh4x2, rng):
    """axis_index over one axis, both axes in either order (row-major in the order given)."""

    def f(v):
        i = jax.lax.axis_index("x")
        j = jax.lax.axis_index("y")
        k = jax.lax.axis_index(("y", "x"))
        both = jax.lax.axis_index(("x", "y"))
        return v * (1 + i) + 10.0 * j + 100.0 * k + 1000.0 * both

    specs = {"in_specs": P(("x", "y")), "out_specs": P(("x", "y"))}
    args = random_args(rng, [(N * 3, 8)])
    for mesh in (mesh2x4, mesh4x2):
        want = _lax(mesh, f, args, specs)
        assert_close(_ark(mesh, f, args, specs, num_workers=2), want, TOL)


def test_ppermute_over_two_axes_and_one_axis_of_2d_mesh(mesh2x4, rng, monkeypatch):
    """Over a tuple of axes jax.lax numbers ranks in mesh order whatever the tuple's order; over
    one axis of a 2-D mesh each row of the mesh permutes on its own (a routed subgroup)."""

    def f(v):
        both = jax.lax.ppermute(v, ("y", "x"), [(i, (3 * i + 1) % N) for i in range(N)])
        row = jax.lax.ppermute(v * 2.0, "y", [(0, 2), (2, 1), (1, 0)])  # rank 3 gets zeros
        return both + jax.lax.axis_index(("y", "x")).astype(jnp.float32), row

    specs = {"in_specs": P(("x", "y")), "out_specs": (P(("x", "y")), P(("x", "y")))}
    args = random_args(rng, [(N * 3, 7)])
    want = _lax(mesh2x4, f, args, specs)
    got = _same_under_workers_and_chaos(mesh2x4, f, args, specs, monkeypatch, workers=(1, 2))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, TOL)


def test_axis_index_alone_has_a_group_and_no_put(mesh8, rng):
    """axis_index without collectives: the plan names the group (the rank comes with the comm
    operand) but has no put op."""

    def f(v):
        return v + jax.lax.axis_index("x").astype(jnp.float32)

    specs = {"in_specs": P("x"), "out_specs": P("x")}
    args = random_args(rng, [(N * 2, 8)])
    assert_close(_ark(mesh8, f, args, specs, num_workers=1), _lax(mesh8, f, args, specs), TOL)
    plan = _plan_in(mesh8, f, args, specs, num_workers=1)
    assert plan.comm is not None and not any(op.kind == "put" for op in plan.ops)
    assert any(i.op == "load_rank" for op in plan.ops for i in op.epilogue)


def _ring_matmul(x, w):
    """Collective matmul (all-gather of x's rows fused with x @ w): each of the N steps multiplies
    the chunk this rank holds while the ring passes it on; the result is all_gather(x) @ w."""
    me = jax.lax.axis_index("x")
    rows = x.shape[0]
    out = jnp.zeros((N * rows, w.shape[1]), jnp.float32)
    chunk = x
    for step in range(N):
        owner = (me - step) % N  # the rank whose rows `chunk` is
        out = jax.lax.dynamic_update_slice(out, chunk @ w, (owner * rows, 0))
        if step < N - 1:
            chunk = jax.lax.ppermute(chunk, "x", RING_FWD)
    return out


def test_collective_matmul_ring(mesh8, rng, monkeypatch):
    specs = {"in_specs": (P("x"), P(None, "x")), "out_specs": P(None, "x")}
    args = random_args(rng, [(N * 4, 32), (32, N * 8)])
    want = _lax(mesh8, _ring_matmul, args, specs)
    # the ring gives the all-gather matmul, and ark gives the ring's result
    assert_close(want, args[0] @ args[1], 1e-5)
    got = _same_under_workers_and_chaos(
        mesh8, _ring_matmul, args, specs, monkeypatch, workers=(1, 2, 4)
    )
    assert_close(got[0], want, TOL)
    plan = _plan_in(mesh8, _ring_matmul, args, specs, num_workers=2)
    puts = [op for op in plan.ops if op.kind == "put"]
    assert len(puts) == N - 1 and all(op.B == 1 and op.recv_from is not None for op in puts)


# ---- tensor-parallel attention ---------------------------------------------------------------
HEADS, DH, SEQ, D = 16, 8, 12, 32


def tp_attention(x, wq, wk, wv, wo):
    """Heads split over 'x': q/k/v column-parallel (this rank's heads), causal attention per
    head, output projection row-parallel, then psum."""
    t = x.shape[0]
    h = wq.shape[1] // DH
    q = (x @ wq).reshape(t, h, DH).transpose(1, 0, 2)
    k = (x @ wk).reshape(t, h, DH).transpose(1, 0, 2)
    v = (x @ wv).reshape(t, h, DH).transpose(1, 0, 2)
    s = jnp.einsum("htd,hsd->hts", q, k) / np.sqrt(DH).astype(np.float32)
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    s = jnp.where(causal[None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("hts,hsd->htd", p, v).transpose(1, 0, 2).reshape(t, h * DH)
    return jax.lax.psum(o @ wo, "x")


def test_tp_attention_block(mesh8, rng, monkeypatch):
    col = P(None, "x")
    specs = {"in_specs": (P(), col, col, col, P("x", None)), "out_specs": P()}
    args = random_args(
        rng, [(SEQ, D), (D, HEADS * DH), (D, HEADS * DH), (D, HEADS * DH), (HEADS * DH, D)]
    )
    want = _lax(mesh8, tp_attention, args, specs)
    got = _same_under_workers_and_chaos(
        mesh8, tp_attention, args, specs, monkeypatch, workers=(1, 2, 4)
    )
    assert_close(got[0], want, TOL)


# ---- jax.grad of the Megatron TP MLP ---------------------------------------------------------
def tp_mlp_loss(x, w1, w2):
    y = jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "x")
    return jnp.mean(y * y)


TP_GRAD_SPECS = {
    "in_specs": (P(), P(None, "x"), P("x", None)),
    "out_specs": (P(), P(None, "x"), P("x", None)),
}


def test_grad_of_tp_mlp_planned_as_one_persistent_call(mesh8, rng, monkeypatch):
    """ark.persistent(jax.grad(loss)): forward and backward in one plan; the gradient wrt the
    replicated input needs a psum of the partial input gradients (jax's transpose of pvary)."""
    grad = jax.grad(tp_mlp_loss, argnums=(0, 1, 2))
    args = random_args(rng, [(16, 32), (32, N * 12), (N * 12, 32)])
    want = _lax(mesh8, grad, args, TP_GRAD_SPECS)
    got = _same_under_workers_and_chaos(
        mesh8, grad, args, TP_GRAD_SPECS, monkeypatch, workers=(1, 2, 4)
    )
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, TOL)
    plan = _plan_in(mesh8, grad, args, TP_GRAD_SPECS, num_workers=2)
    assert sum(op.kind == "put" for op in plan.ops) == 2  # forward psum, backward psum of dx


def test_grad_of_persistent_is_refused_clearly(mesh8, rng):
    args = random_args(rng, [(16, 32), (32, N * 12), (N * 12, 32)])
    refused = jax.grad(ark.persistent(tp_mlp_loss), argnums=(0, 1, 2))
    with pytest.raises(UnsupportedError, match=r"ark.persistent\(jax.grad\(tp_mlp_loss\)\)"):
        _lax(mesh8, refused, args, TP_GRAD_SPECS)


# ---- several groups: dp x tp -----------------------------------------------------------------
def dp_tp_step(x, w1, w2):
    """The TP MLP over 'y' on this data shard, its loss's gradients, averaged over 'x' (dp)."""

    def loss(x, w1, w2):
        y = jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "y")
        return jnp.mean(y * y)

    value, (g1, g2) = jax.value_and_grad(loss, argnums=(1, 2))(x, w1, w2)
    return jax.lax.pmean(value, "x"), jax.lax.pmean(g1, "x"), jax.lax.pmean(g2, "x")


DP_TP_SPECS = {
    "in_specs": (P("x"), P(None, "y"), P("y", None)),
    "out_specs": (P(), P(None, "y"), P("y", None)),
}


@pytest.mark.parametrize("shape", ["2x4", "4x2"])
def test_tp_mlp_training_step_on_2d_mesh(mesh2x4, mesh4x2, rng, monkeypatch, shape):
    mesh = mesh2x4 if shape == "2x4" else mesh4x2
    args = random_args(rng, [(8 * 4, 24), (24, 4 * 16), (4 * 16, 24)])
    want = _lax(mesh, dp_tp_step, args, DP_TP_SPECS)
    got = _same_under_workers_and_chaos(
        mesh, dp_tp_step, args, DP_TP_SPECS, monkeypatch, workers=(1, 3)
    )
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, TOL)
    plan = _plan_in(mesh, dp_tp_step, args, DP_TP_SPECS, num_workers=2)
    assert plan.comm.axes == ("x", "y") and plan.comm.group_size == 8
    routed = [op for op in plan.ops if op.kind == "put" and op.recv_from is not None]
    assert {op.B for op in routed} == set(mesh.shape.values())


def test_collectives_over_both_axes_and_over_one_axis_of_2d_meshes(mesh2x4, mesh4x2, rng):
    def f(v):
        total = jax.lax.psum(v, ("x", "y"))
        rows = jax.lax.all_gather(v, ("y", "x"), tiled=True)  # y-major order
        cols = jax.lax.all_gather(v * 2.0, "y", axis=1, tiled=True)
        # per-peer blocks within a subgroup: the routed source row is the receiver's index
        scattered = jax.lax.psum_scatter(v, "y", scatter_dimension=1, tiled=True)
        swapped = jax.lax.all_to_all(v, "x", 1, 0, tiled=True)
        return total, rows, jax.lax.psum(cols, "x"), scattered, swapped

    both = P(("x", "y"))
    specs = {"in_specs": both, "out_specs": (P(), both, P("y"), both, both)}
    args = random_args(rng, [(N * 2, 8)])
    for mesh in (mesh2x4, mesh4x2):
        want = _lax(mesh, f, args, specs)
        got = _ark(mesh, f, args, specs, num_workers=2)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, TOL)


# ---- the plan: reference interpreter, validation, runtime check ------------------------------
def _dp_tp_psums(x):
    return jax.lax.psum(x, "y") * 2.0 + jax.lax.ppermute(jax.lax.psum(x, "x"), "y", [(0, 1)])


DP_TP_PSUM_SPECS = {"in_specs": P(("x", "y")), "out_specs": P(("x", "y"))}


def test_plan_for_2x4_refused_on_4x2(mesh2x4, mesh4x2, rng):
    """The routing depends on each axis's size, not only on the group's: a plan for one mesh
    shape run under another (same local shapes) is refused with both shapes named."""
    args = random_args(rng, [(N * 3, 5)])
    plan = _plan_in(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS, num_workers=2)
    assert json.loads(plan.to_json())["comm"]["axis_sizes"] == [2, 4]
    assert_close(
        _lax(mesh2x4, ark.persistent(_dp_tp_psums, plan=plan), args, DP_TP_PSUM_SPECS),
        _lax(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS),
        TOL,
    )
    with pytest.raises(PlanError, match=r"sizes \(2, 4\).*sizes \(4, 2\)"):
        _lax(mesh4x2, ark.persistent(_dp_tp_psums, plan=plan), args, DP_TP_PSUM_SPECS)


def test_reference_interpreter_of_routed_puts(mesh2x4, rng):
    args = random_args(rng, [(N * 3, 5)])
    plan = _plan_in(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS, num_workers=2)
    per_rank = [[part] for part in np.split(args[0], N)]
    outs = interpret_group(plan, per_rank)
    want = np.asarray(_lax(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS))
    assert_close(np.concatenate([o[0] for o in outs]), want, TOL)
    text = plan.summary()
    assert "routed over 4 slots of the group of 8 (axes x,y)" in text
    assert "routed over 2 slots" in text and "routed over 1 slots" in text
    # JSON round trip keeps the routing tables
    again = Plan.from_json(plan.to_json())
    assert [op.recv_from for op in again.ops] == [op.recv_from for op in plan.ops]


def test_validate_refuses_bad_routes(mesh2x4, rng):
    args = random_args(rng, [(N * 3, 5)])
    plan = _plan_in(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS, num_workers=2)
    routed = next(i for i, op in enumerate(plan.ops) if op.recv_from is not None)
    bad = plan.copy()
    bad.ops[routed].recv_from[3][0] = N
    with pytest.raises(PlanError, match=r"recv_from\[3\]\[0\] = 8 not in -1..7"):
        bad.validate()
    bad = plan.copy()
    bad.ops[routed].send_row[0][0] = bad.ops[routed].B
    with pytest.raises(PlanError, match=r"send_row\[0\]\[0\]"):
        bad.validate()
    bad = plan.copy()
    bad.ops[routed].recv_from = bad.ops[routed].recv_from[:-1]
    with pytest.raises(PlanError, match="recv_from must be"):
        bad.validate()
    d = json.loads(plan.to_json())
    del d["ops"][routed]["send_row"]
    with pytest.raises(PlanError, match="both recv_from and send_row"):
        Plan.from_json(d)
    d = json.loads(plan.to_json())
    d["comm"]["axis_sizes"] = [4, 4]
    with pytest.raises(PlanError, match="comm.axis_sizes"):
        Plan.from_json(d)


def test_runtime_check_refuses_bad_route_words(mesh2x4, rng):
    args = random_args(rng, [(N * 3, 5)])
    plan = _plan_in(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS, num_workers=2)
    words = plan.to_binary()
    routes_at = int(words[27])
    assert routes_at > 0 and words[routes_at] > 0

    def run_words(w):
        def body(local):
            outs, _ = run_plan(plan, [local], words=w)
            return outs[0]

        return jax.block_until_ready(
            jax.jit(jax.shard_map(body, mesh=mesh2x4, check_vma=False, **DP_TP_PSUM_SPECS))(*args)
        )

    bad = words.copy()
    bad[routes_at + 2] = N  # a source rank outside the group
    with pytest.raises(Exception, match="route of rank 0 slot 0: source rank 8"):
        run_words(bad)
    bad = words.copy()
    bad[routes_at] = 3  # the section too short for the tables
    with pytest.raises(Exception, match="routing table is outside the route section"):
        run_words(bad)
    assert_close(run_words(words), _lax(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS), TOL)


def test_random_routings_run_as_the_reference_and_never_deadlock(mesh2x4, rng):
    """Any routing table in range is a valid plan: no deadlock (a remote wait only ever names a
    peer's copy phase of the same task), and the executor equals interpret_group on it (ranks
    receiving from several slots of one peer, from themselves, or from nobody)."""
    args = random_args(rng, [(N * 3, 5)])
    plan = _plan_in(mesh2x4, _dp_tp_psums, args, DP_TP_PSUM_SPECS, num_workers=2)
    per_rank = [[part] for part in np.split(args[0], N)]
    routed = [i for i, op in enumerate(plan.ops) if op.recv_from is not None]
    for _ in range(6):
        edited = plan.copy()
        for i in routed:
            op = edited.ops[i]
            op.recv_from = rng.integers(-1, N, (N, op.B)).tolist()
            op.send_row = rng.integers(0, op.B, (N, op.B)).tolist()
        want = np.concatenate([o[0] for o in interpret_group(edited.validate(), per_rank)])
        pf = ark.persistent(_dp_tp_psums, plan=edited, timeout_ms=20_000)
        got = _lax(mesh2x4, pf, args, DP_TP_PSUM_SPECS)
        np.testing.assert_array_equal(np.asarray(got), want)
