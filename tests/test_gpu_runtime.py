"""GPU runtime through the single-GPU harness: n ranks of one communicator on one GPU (one
cooperative launch per call).

Every op, dtype and rank count against a numpy model of the contract (docs/internals.md): left
fold over ranks 0..n-1, 16-bit floats accumulated in float32 and rounded once.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

OPS = ["all_reduce", "all_gather", "reduce_scatter", "permute", "all_to_all"]
DTYPES = [
    np.dtype(np.float32),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float16),
    np.dtype(np.int32),
]
# Small scratch so that "large" messages need many chunked rounds: LL only up to 1 KiB per peer,
# 2 blocks x 256-byte pieces per round.
SMALL_SCRATCH = dict(ll_bytes=1024, piece_bytes=256, blocks=2)


@pytest.fixture(scope="module")
def cc():
    from jax_ark import _cuda_collectives

    return _cuda_collectives


def _inputs(rng, op, n, count, dtype):
    shape = (n, count) if op in ("reduce_scatter", "all_to_all") else (count,)
    if dtype.kind == "i":
        return [rng.integers(-1000, 1000, size=shape, dtype=np.int32) for _ in range(n)]
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


def _fold(parts, reduce, dtype):
    acc_type = np.int32 if dtype.kind == "i" else np.float32
    fn = {"sum": np.add, "max": np.maximum, "min": np.minimum}[reduce]
    acc = parts[0].astype(acc_type)
    for p in parts[1:]:
        acc = fn(acc, p.astype(acc_type))
    return acc.astype(dtype)


def _partial_ring(n):
    send_to = [r + 1 if r + 1 < n else -1 for r in range(n)]
    recv_from = [r - 1 if r > 0 else -1 for r in range(n)]
    return send_to, recv_from


def _expected(op, reduce, xs, send_to, recv_from):
    n, dtype = len(xs), xs[0].dtype
    if op == "all_reduce":
        return [_fold(xs, reduce, dtype)] * n
    if op == "all_gather":
        return [np.stack(xs)] * n
    if op == "reduce_scatter":
        return [_fold([x[r] for x in xs], reduce, dtype) for r in range(n)]
    if op == "permute":
        return [xs[recv_from[r]] if recv_from[r] >= 0 else np.zeros_like(xs[r]) for r in range(n)]
    return [np.stack([xs[j][r] for j in range(n)]) for r in range(n)]  # all_to_all


def _assert_close(got, want, n):
    if want.dtype.kind == "i":
        np.testing.assert_array_equal(got, want)
        return
    # Same fold order as the kernel, so only the final rounding may differ (not at all, normally).
    tol = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 2e-3}[want.dtype.name]
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol * n
    )


def _check(cc, rng, op, dtype, n, count, reduce="sum", **options):
    xs = _inputs(rng, op, n, count, dtype)
    send_to, recv_from = _partial_ring(n) if op == "permute" else (None, None)
    ys = cc.harness_run(op, reduce, dtype, n, xs, send_to, recv_from, **options)
    want_all = _expected(op, reduce, xs, send_to, recv_from)
    for r, (got, want) in enumerate(zip(ys, want_all, strict=True)):
        assert got.shape == want.shape, (r, got.shape, want.shape)
        _assert_close(got, want, n)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "count, options",
    [(1, {}), (1001, {}), (12_345, SMALL_SCRATCH)],
    ids=["one", "odd-ll", "beyond-scratch"],
)
def test_matches_numpy(cc, rng, op, dtype, n, count, options):
    _check(cc, rng, op, dtype, n, count, **options)


def _bit_mismatches(got: np.ndarray, want: np.ndarray, limit: int = 8) -> str:
    """'' when got and want are equal bit for bit, else each differing index with both bit
    patterns (enough to tell a wrong byte from a wrong value without another GPU run)."""
    view = np.uint16 if want.dtype.itemsize == 2 else np.uint32
    g, w = got.reshape(-1).view(view), want.reshape(-1).view(view)
    bad = np.flatnonzero(g != w)
    if bad.size == 0:
        return ""
    shown = ", ".join(f"[{i}] got {int(g[i]):#x} want {int(w[i]):#x}" for i in bad[:limit])
    return f"{bad.size} of {w.size} elements differ: {shown}"


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("count", [12_344, 12_345, 12_346, 12_347, 777, 778])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES[1:3], ids=lambda d: d.name)
@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
def test_16bit_reductions_bit_exact_at_every_tail(cc, rng, op, dtype, n, count, reduce):
    # The chunked path's scalar tail (the elements after a piece's last 16-byte vector) once wrote
    # a float->uint8 conversion of the result over its low byte (ptxas turned the byte stores of a
    # memcpy'd bf16/f16 into F2I.U8.F16): odd and even counts put 1, 2 or 3 elements in that tail
    # and make the message's last 32-bit word full or half. The kernel folds like _fold (float32,
    # rank order, one rounding), so the result must match bit for bit.
    xs = _inputs(rng, op, n, count, dtype)
    ys = cc.harness_run(op, reduce, dtype, n, xs, **SMALL_SCRATCH)
    for r, (got, want) in enumerate(zip(ys, _expected(op, reduce, xs, None, None), strict=True)):
        problem = _bit_mismatches(got, want)
        assert not problem, f"{op} {dtype.name} n={n} count={count} {reduce} rank {r}: {problem}"


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("options", [{}, SMALL_SCRATCH], ids=["ll", "chunked"])
def test_max_min(cc, rng, op, dtype, reduce, options):
    _check(cc, rng, op, dtype, 4, 777, reduce=reduce, **options)


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_default_scratch_several_rounds(cc, rng, op):
    # 8 ranks x 16 blocks x 32 KiB pieces: 1.5M float32 per block needs several rounds per phase.
    count = 1_500_001 if op == "all_reduce" else 300_001
    _check(cc, rng, op, np.dtype(np.float32), 8, count)


def _check_calls(cc, rng, op, dtype, n, count, iters, sets=3, **options):
    # Call i reads input set i % 3 and writes its own y: calls on one scratch half (i and i + 2)
    # carry different data, so a call that consumed what an earlier call left in scratch (a reuse
    # race) gives a wrong result instead of passing unnoticed with identical inputs.
    input_sets = [_inputs(rng, op, n, count, dtype) for _ in range(sets)]
    send_to, recv_from = _partial_ring(n) if op == "permute" else (None, None)
    ys = cc.harness_run_calls(
        op, "sum", dtype, n, input_sets, send_to, recv_from, iters=iters, **options
    )
    wants = [_expected(op, "sum", xs, send_to, recv_from) for xs in input_sets]
    for r in range(n):
        got = np.stack([ys[i][r] for i in range(iters)])
        want = np.stack([wants[i % sets][r] for i in range(iters)])
        _assert_close(got, want, n)


@pytest.mark.parametrize("options", [{}, SMALL_SCRATCH], ids=["ll", "chunked"])
def test_thousand_back_to_back_calls(cc, rng, options):
    # Call k+1 starts while peers may still read call k: the epoch-parity halves must keep every
    # call's result exact (a reuse race shows up as wrong data or a timeout).
    _check_calls(cc, rng, "all_reduce", np.dtype(np.float32), 8, 3001, iters=1000, **options)


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter", "all_to_all"])
def test_back_to_back_chunked_other_ops(cc, rng, op):
    _check_calls(cc, rng, op, np.dtype(np.int32), 4, 1001, iters=200, **SMALL_SCRATCH)


def test_thousand_back_to_back_permutes(cc, rng):
    # permute moves data between two ranks only; the all-peer arrival keeps epochs in step.
    _check_calls(cc, rng, "permute", np.dtype(np.int32), 4, 513, iters=1000)


@pytest.mark.parametrize("options", [{}, SMALL_SCRATCH], ids=["ll", "chunked"])
@pytest.mark.parametrize("n", [2, 4])
def test_missing_rank_times_out_naming_op_rank_peer(cc, rng, n, options):
    xs = _inputs(rng, "all_reduce", n, 4099, np.dtype(np.float32))
    missing = n - 1
    with pytest.raises(RuntimeError) as info:
        cc.harness_run(
            "all_reduce", "sum", np.float32, n, xs, timeout_ms=300, skip_rank=missing, **options
        )
    message = str(info.value)
    for r in range(n - 1):
        assert f"all_reduce on rank {r} timed out waiting for peer rank {missing}" in message


def test_bad_input_is_rejected_before_launch(cc, rng):
    xs = _inputs(rng, "permute", 4, 8, np.dtype(np.float32))
    with pytest.raises(ValueError, match="disagree"):
        cc.harness_run("permute", "sum", np.float32, 4, xs, [1, 2, 3, 0], [3, 0, 2, 1])
    with pytest.raises(ValueError, match="disagree"):  # rank 1 would wait for a silent rank 0
        cc.harness_run("permute", "sum", np.float32, 4, xs, [-1] * 4, [-1, 0, -1, -1])
    with pytest.raises(ValueError, match="leading axis"):
        cc.harness_run("all_to_all", "sum", np.float32, 4, xs)


def test_timing_entry_points(cc):
    small = cc.harness_time("all_reduce", np.float32, 8, 8192, iters=200)
    host = cc.harness_time("all_reduce", np.float32, 8, 8192, iters=50, graph=False)
    big = cc.harness_time("all_reduce", np.float32, 8, 64 << 20, iters=3)
    copy = cc.copy_bandwidth(64 << 20)
    print(f"8 KiB all_reduce x8: {small:.2f} us (graph), {host:.2f} us (host launches)")
    print(f"64 MiB all_reduce x8: {big:.1f} us; copy {copy:.0f} GB/s")
    assert 0 < small < 1e4 and 0 < host < 1e5 and big > 0 and copy > 0
