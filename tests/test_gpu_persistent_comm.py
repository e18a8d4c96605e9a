"""Collectives inside ark.persistent (plan v3 put tasks) on the CUDA executor: every rank of the
group on ONE GPU, one cooperative launch per call (`group_run`, the single-GPU harness).

Plans are made for the GPU (platform "gpu", a few workers so that ranks x workers blocks fit one
GPU) inside jax.shard_map over CPU devices. Each rank's outputs must equal both the reference
interpreter's (interpret_group) and `jax.jit(jax.shard_map(fn))` with jax.lax's collectives on the
CPU devices, on fresh random inputs (int32 exactly). Calls run back to back with different inputs
and each call's outputs are checked, so an inbox read before its new data arrived shows up as a
wrong result; worker counts and chaos mode must give the same bits, as on the CPU executor.

All tests need an NVIDIA GPU and the CUDA build (skipped otherwise, see conftest.py).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from group_models import lax_outputs, local_inputs, plan_for_gpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args

from jax_ark._persistent._format import Plan
from jax_ark._persistent._gpu_group import group_run
from jax_ark._persistent._reference import interpret_group

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
# float32: the GPU's exp/tanh and fused multiply-adds differ from numpy's and XLA:CPU's in the
# last bits; bf16: one rounding of a 16-bit result apart (8 mantissa bits).
TOL = {np.dtype(np.float32): 1e-4, np.dtype(BF16): 3e-2}
# Every wait of these small plans ends in microseconds; a hang fails in 2 s, so that a broken
# kernel fails the check step's few failures (--maxfail) within its time limit.
WAIT_MS = 2_000


@pytest.fixture(scope="module")
def meshes(cpu_devices):
    """1-D meshes of 2, 4 and 8 CPU devices (axis 'x') and the 2 x 4 mesh ('x', 'y')."""
    out = {n: Mesh(np.array(cpu_devices[:n]), ("x",)) for n in (2, 4, 8)}
    out["2x4"] = Mesh(np.array(cpu_devices).reshape(2, 4), ("x", "y"))
    return out


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.dtype, want.dtype)
    if got.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        try:
            assert_close(got, want, TOL[got.dtype])
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


def _run_and_check(
    mesh, fn, arg_sets, specs, *, workers, chaos_seed=0, plan: Plan | None = None, **plan_kw
):
    """Plans fn for the GPU (unless given `plan`), runs one call per argument set back to back
    and checks every call's every rank against jax.lax and interpret_group. Returns (plan,
    outputs[call][rank][j])."""
    if plan is None:
        plan = plan_for_gpu(mesh, fn, arg_sets[0], specs, num_workers=workers, **plan_kw)
    calls = [local_inputs(mesh, plan, args, specs["in_specs"]) for args in arg_sets]
    got = group_run(plan, calls, timeout_ms=WAIT_MS, chaos_seed=chaos_seed)
    assert len(got) == len(arg_sets)
    for c, (args, inputs) in enumerate(zip(arg_sets, calls, strict=True)):
        want = lax_outputs(mesh, plan, fn, args, specs)
        ref = interpret_group(plan, inputs)
        for r, outs in enumerate(got[c]):
            assert len(outs) == len(want[r])
            for j, o in enumerate(outs):
                _same(o, want[r][j], f"call {c} rank {r} output {j} vs jax.lax")
                _same(o, ref[r][j], f"call {c} rank {r} output {j} vs interpret_group")
    return plan, got


def _assert_bitwise(a, b, what: str) -> None:
    for c, (ra, rb) in enumerate(zip(a, b, strict=True)):
        for r, (oa, ob) in enumerate(zip(ra, rb, strict=True)):
            for j, (x, y) in enumerate(zip(oa, ob, strict=True)):
                assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (what, c, r, j)


# ---- Megatron tensor-parallel MLP (psum) and sequence-parallel MLP ---------------------------
def tp_mlp(x, w1, w2):
    """Column-parallel w1, gelu, row-parallel w2, psum."""
    return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "x")


def sp_mlp(x, w1, w2):
    """all_gather rows -> matmul -> gelu -> matmul -> psum_scatter rows."""
    xg = jax.lax.all_gather(x, "x", tiled=True)
    y = jax.nn.gelu(xg @ w1) @ w2
    return jax.lax.psum_scatter(y, "x", scatter_dimension=0, tiled=True)


TP_SPECS = {"in_specs": (P(), P(None, "x"), P("x", None)), "out_specs": P()}
SP_SPECS = {"in_specs": (P("x"), P(None, "x"), P("x", None)), "out_specs": P("x")}
# Fixed tiles where worker counts are compared: the GPU's default tiles follow the worker count
# (about one column tile per worker), and other tiles may sum K in another order.
TILES = {"tile_m": 16, "tile_n": 16}


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_tp_mlp_psum_one_to_three_workers(meshes, rng, dtype):
    """Three calls with different inputs per worker count; the worker counts agree bit for bit."""
    arg_sets = [random_args(rng, [(16, 64), (64, 8 * 24), (8 * 24, 64)], dtype) for _ in range(3)]
    base = None
    for workers in (1, 2, 3):
        _, got = _run_and_check(meshes[8], tp_mlp, arg_sets, TP_SPECS, workers=workers, **TILES)
        if base is None:
            base = got
        else:
            _assert_bitwise(got, base, f"{workers} workers vs 1")


def test_sp_mlp_chaos_is_bitwise_identical(meshes, rng):
    arg_sets = [random_args(rng, [(8 * 8, 48), (48, 8 * 16), (8 * 16, 48)]) for _ in range(2)]
    plan, base = _run_and_check(meshes[8], sp_mlp, arg_sets, SP_SPECS, workers=2, **TILES)
    for seed in (3, 11):
        _, got = _run_and_check(
            meshes[8], sp_mlp, arg_sets, SP_SPECS, workers=2, plan=plan, chaos_seed=seed
        )
        _assert_bitwise(got, base, f"chaos seed {seed}")
    _, got = _run_and_check(meshes[8], sp_mlp, arg_sets, SP_SPECS, workers=3, chaos_seed=5, **TILES)
    _assert_bitwise(got, base, "3 workers, chaos seed 5")


# ---- each collective alone ------------------------------------------------------------------
def _ring(n):
    return [(i, (i + 1) % n) for i in range(n)]


PARTIAL = [(0, 3), (3, 5), (5, 0), (6, 6), (1, 2)]  # ranks 1, 4, 7 receive nothing: zeros

COLLECTIVES = {
    "psum": lambda x: jax.lax.psum(x, "x"),
    "pmax": lambda x: jax.lax.pmax(x, "x"),
    "pmin": lambda x: jax.lax.pmin(x, "x"),
    "pmean": lambda x: jax.lax.pmean(x, "x"),
    "all_gather_tiled": lambda x: jax.lax.all_gather(x, "x", tiled=True) * 2,
    "all_gather_axis1": lambda x: jax.lax.all_gather(x, "x", axis=1) + 1,
    "psum_scatter_dim0": lambda x: jax.lax.psum_scatter(
        x * 3, "x", scatter_dimension=0, tiled=True
    ),
    "psum_scatter_dim1": lambda x: jax.lax.psum_scatter(x, "x", scatter_dimension=1, tiled=True),
    "all_to_all": lambda x: jax.lax.all_to_all(x, "x", 0, 1, tiled=True),
    "ppermute_ring": lambda x: jax.lax.ppermute(x * 2 + 1, "x", _ring(8)) - x,
    "ppermute_partial": lambda x: jax.lax.ppermute(x * 2 + 1, "x", PARTIAL) - x,
}
ONE_INPUT = {"in_specs": (P("x"),), "out_specs": P("x")}


def _x(rng, n, dtype, rows=16, cols=64):
    if np.dtype(dtype) == np.int32:
        return rng.integers(-(2**20), 2**20, (n * rows, cols)).astype(np.int32)
    return rng.standard_normal((n * rows, cols)).astype(dtype)


@pytest.mark.parametrize("name", sorted(COLLECTIVES))
def test_collective_alone_8_ranks(meshes, rng, name):
    """Two back-to-back calls, two workers; pmax/pmin/ppermute exactly in int32 too."""
    fn = COLLECTIVES[name]
    arg_sets = [[_x(rng, 8, np.float32)] for _ in range(2)]
    plan, got = _run_and_check(meshes[8], fn, arg_sets, ONE_INPUT, workers=2)
    assert any(op.kind == "put" for op in plan.ops)
    if name in ("pmax", "pmin", "ppermute_ring", "ppermute_partial", "psum"):
        int_sets = [[_x(rng, 8, np.int32)] for _ in range(2)]
        _run_and_check(meshes[8], fn, int_sets, ONE_INPUT, workers=2)
    if name == "ppermute_partial":  # the ranks no pair sends to get zeros, as with jax.lax
        x = arg_sets[0][0].reshape(8, 16, 64)
        for r in (1, 4, 7):
            np.testing.assert_array_equal(got[0][r][0], -x[r])


def _every_collective(x):
    """psum, pmax, all_gather, psum_scatter, all_to_all and a ring ppermute in one plan, for any
    group size (x has a multiple of n rows and columns)."""
    n = jax.lax.axis_size("x")
    return (
        jax.lax.psum(x, "x"),
        jax.lax.pmax(x * 2, "x"),
        jax.lax.all_gather(x, "x", tiled=True),
        jax.lax.psum_scatter(x, "x", scatter_dimension=1, tiled=True),
        jax.lax.all_to_all(x, "x", 1, 0, tiled=True),
        jax.lax.ppermute(x, "x", _ring(n)),
    )


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("workers", [1, 3])
def test_every_collective_on_2_4_8_ranks(meshes, rng, n, workers):
    arg_sets = [[_x(rng, n, np.float32, rows=8, cols=8 * 5)] for _ in range(2)]
    _run_and_check(meshes[n], _every_collective, arg_sets, ONE_INPUT, workers=workers)


def test_bf16_collectives_and_int32_psum(meshes, rng):
    def bf16_mix(x):
        return (
            jax.lax.psum(x, "x"),
            jax.lax.all_gather(x, "x", tiled=True) * 2,
            jax.lax.pmean(x, "x"),
        )

    arg_sets = [[_x(rng, 4, BF16)] for _ in range(2)]
    _run_and_check(meshes[4], bf16_mix, arg_sets, ONE_INPUT, workers=2)

    def int_psum(v):
        return jax.lax.psum(v * 3 + 1, "x")

    int_sets = [[_x(rng, 8, np.int32, rows=8, cols=40)] for _ in range(3)]
    _run_and_check(meshes[8], int_psum, int_sets, ONE_INPUT, workers=3)


# ---- 2 x 4 mesh: dp x tp, routed subgroups ----------------------------------------------------
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


def _dp_tp_psums(x):
    return jax.lax.psum(x, "y") * 2.0 + jax.lax.ppermute(jax.lax.psum(x, "x"), "y", [(0, 1)])


@pytest.mark.parametrize("workers", [1, 2])
def test_dp_x_tp_on_a_2x4_mesh(meshes, rng, workers):
    mesh = meshes["2x4"]
    arg_sets = [random_args(rng, [(8 * 4, 24), (24, 4 * 16), (4 * 16, 24)]) for _ in range(2)]
    plan, _ = _run_and_check(mesh, dp_tp_step, arg_sets, DP_TP_SPECS, workers=workers)
    assert plan.comm.axes == ("x", "y") and plan.comm.group_size == 8
    routed = [op for op in plan.ops if op.kind == "put" and op.recv_from is not None]
    assert {op.B for op in routed} == {2, 4}
    specs = {"in_specs": (P(("x", "y")),), "out_specs": P(("x", "y"))}
    arg_sets = [random_args(rng, [(8 * 3, 5)]) for _ in range(2)]
    _run_and_check(mesh, _dp_tp_psums, arg_sets, specs, workers=workers)


# ---- collectives in loop bodies: stacked inboxes ---------------------------------------------
def _tp_mlp_stack(x, w1s, w2s):
    def layer(h, ws):
        w1, w2 = ws
        return jax.lax.psum(jnp.tanh(h @ w1) @ w2, "x") + h, None

    return jax.lax.scan(layer, x, (w1s, w2s))[0]


STACK_SPECS = {"in_specs": (P(), P(None, None, "x"), P(None, "x", None)), "out_specs": P()}


def _tp_stack_args(rng):
    """x (4 x 16) and 4 layers' w1 / w2 (hidden 4 per rank of 8), scaled to stay in range."""
    x, w1, w2 = random_args(rng, [(4, 16), (4, 16, 8 * 4), (4, 8 * 4, 16)])
    return [x, w1 * 0.3, w2 * 0.3]


def test_scan_psum_per_layer_back_to_back_and_chaos(meshes, rng):
    """A psum per layer of a scan fills one inbox slice per iteration; three calls with
    different inputs, then chaos mode: the same bits."""
    arg_sets = [_tp_stack_args(rng) for _ in range(3)]
    plan, base = _run_and_check(meshes[8], _tp_mlp_stack, arg_sets, STACK_SPECS, workers=2)
    puts = [op for op in plan.ops if op.kind == "put"]
    assert plan.loops and plan.loops[0].trip_count == 4 and all(op.stacked for op in puts)
    _, got = _run_and_check(
        meshes[8], _tp_mlp_stack, arg_sets, STACK_SPECS, workers=2, plan=plan, chaos_seed=7
    )
    _assert_bitwise(got, base, "chaos seed 7")


def test_fori_loop_psum_of_the_carry_f32_and_int32(meshes, rng):
    def f(v):
        return jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.psum(c, "x") * 0.125 + 1.0, v)

    def g(v):
        return jax.lax.fori_loop(0, 4, lambda i, c: jax.lax.psum(c, "x") % 1000 - i, v)

    arg_sets = [[_x(rng, 4, np.float32, rows=2, cols=8)] for _ in range(2)]
    _run_and_check(meshes[4], f, arg_sets, ONE_INPUT, workers=3)
    int_sets = [[rng.integers(-50, 50, (8 * 2, 8)).astype(np.int32)] for _ in range(3)]
    _run_and_check(meshes[8], g, int_sets, ONE_INPUT, workers=2)


def _ring_matmul_loop(x, w):
    """all_gather(x) @ w as a ring: N steps, each multiplying the chunk this rank holds while
    ppermute passes it on."""
    n = jax.lax.axis_size("x")
    me = jax.lax.axis_index("x")
    rows = x.shape[0]

    def step(i, state):
        chunk, out = state
        owner = (me - i) % n
        out = jax.lax.dynamic_update_slice(out, chunk @ w, (owner * rows, 0))
        return jax.lax.ppermute(chunk, "x", _ring(n)), out

    out = jnp.zeros((n * rows, w.shape[1]), x.dtype)
    return jax.lax.fori_loop(0, n, step, (x, out))[1]


def _gather_scan(x, ws):
    def step(c, w):
        g = jax.lax.all_gather(c, "x", tiled=True)
        return jnp.tanh(g[:2] + g[-2:] + c @ w), g.sum(axis=0)

    return jax.lax.scan(step, x, ws)


def test_ppermute_ring_in_a_fori_loop_and_all_gather_in_a_scan(meshes, rng):
    specs = {"in_specs": (P("x"), P(None, "x")), "out_specs": P(None, "x")}
    arg_sets = [random_args(rng, [(8 * 4, 32), (32, 8 * 8)]) for _ in range(2)]
    plan, _ = _run_and_check(meshes[8], _ring_matmul_loop, arg_sets, specs, workers=2)
    (put,) = [op for op in plan.ops if op.kind == "put"]  # planned once, not unrolled
    assert put.stacked and plan.loops[0].trip_count == 8
    specs = {"in_specs": (P("x"), P()), "out_specs": (P("x"), P("x"))}
    arg_sets = [random_args(rng, [(4 * 2, 8), (3, 8, 8)]) for _ in range(2)]
    _run_and_check(meshes[4], _gather_scan, arg_sets, specs, workers=1)


def _decode_over_the_stack(x, w1s, w2s):
    """A token loop around the layer scan: a put nested two loops deep, 3 x 4 runs per call."""

    def token(t, h):
        return jnp.tanh(_tp_mlp_stack(h, w1s, w2s)) + t.astype(h.dtype) * 0.01

    return jax.lax.fori_loop(0, 3, token, x)


def test_psum_in_a_nested_loop_one_slice_per_run(meshes, rng):
    """The nested put writes slice outer x 4 + inner (the run index) of a 12-slice inbox; three
    calls back to back, then chaos mode: the same bits."""
    arg_sets = [_tp_stack_args(rng) for _ in range(3)]
    plan, base = _run_and_check(meshes[8], _decode_over_the_stack, arg_sets, STACK_SPECS, workers=2)
    put = next(op for op in plan.ops if op.kind == "put")
    assert plan.loops[put.loop].parent >= 0 and plan.tensors[put.out].shape[0] == 12
    _, got = _run_and_check(
        meshes[8], _decode_over_the_stack, arg_sets, STACK_SPECS, workers=2, plan=plan, chaos_seed=5
    )
    _assert_bitwise(got, base, "chaos seed 5")


# ---- a missing rank: bounded waits, named ----------------------------------------------------
def test_missing_rank_times_out_naming_rank_peer_and_task(meshes, rng):
    fn = COLLECTIVES["psum"]
    arg_sets = [[_x(rng, 4, np.float32, rows=4, cols=16)]]
    plan = plan_for_gpu(meshes[4], fn, arg_sets[0], ONE_INPUT, num_workers=1)
    calls = [local_inputs(meshes[4], plan, arg_sets[0], ONE_INPUT["in_specs"])]
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        group_run(plan, calls, timeout_ms=300, skip_rank=1)
    took = time.monotonic() - start
    msg = str(err.value)
    assert took < 10, f"a 300 ms timeout took {took:.1f} s to report"
    assert re.search(r"\brank 1\b", msg), msg  # the peer that never came
    assert {int(r) for r in re.findall(r"\brank (\d+)", msg)} - {1}, msg  # a rank that waited
    tasks = [int(t) for t in re.findall(r"\btask (\d+)", msg) if int(t) < len(plan.tasks)]
    assert tasks, msg
    assert any(
        plan.ops[plan.tasks[t].op].name in msg or f"op {plan.tasks[t].op}" in msg for t in tasks
    ), msg
    # nothing of the failed run is left behind: the next run is right
    _run_and_check(meshes[4], fn, arg_sets, ONE_INPUT, workers=1, plan=plan)
