"""Low-level tests of the CPU backend of the `ark_collective` FFI target.

These call the target directly with `jax.ffi.ffi_call` inside `jax.shard_map` (the contract is in
docs/internals.md, "Collectives"), so they test the C++ runtime without the Python API on top.
Results are compared exactly against a numpy model of the documented semantics (left fold over
ranks 0..n-1, 16-bit floats accumulated in float32 and rounded once), and against jax.lax with
dtype-appropriate tolerances.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_ark  # noqa: F401  (registers the ark_collective target)

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, PERMUTE, ALL_TO_ALL = range(5)
SUM, MAX, MIN = range(3)
OPS = {
    "all_reduce": ALL_REDUCE,
    "all_gather": ALL_GATHER,
    "reduce_scatter": REDUCE_SCATTER,
    "permute": PERMUTE,
    "all_to_all": ALL_TO_ALL,
}
DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int32]
# Generous for tests: a failing rendezvous must not be mistaken for a slow machine.
DEFAULT_TIMEOUT_MS = 60_000


def _group_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _comm_key(mesh, axes) -> int:
    """Any int64 that names (mesh axes + sizes, group axes); the Python API uses a real hash."""
    return zlib.crc32(repr((tuple(mesh.shape.items()), tuple(axes))).encode())


def _ark(x, *, op, mesh, axes, reduce=SUM, send_to=(), recv_from=(), timeout_ms=None, site=0):
    """One direct call of the target from inside shard_map (per-device view of x).

    `site` names the call site: independent calls of one program need distinct sites."""
    axes = tuple(axes)
    n = _group_size(mesh, axes)
    others = tuple(a for a in mesh.axis_names if a not in axes)
    rank = lax.axis_index(axes).astype(jnp.int32)
    color = lax.axis_index(others).astype(jnp.int32) if others else jnp.int32(0)
    if op == ALL_GATHER:
        out_shape = (n, *x.shape)
    elif op == REDUCE_SCATTER:
        out_shape = x.shape[1:]
    else:
        out_shape = x.shape
    call = jax.ffi.ffi_call("ark_collective", jax.ShapeDtypeStruct(out_shape, x.dtype))
    return call(
        x,
        rank,
        color,
        op=np.int32(op),
        reduce=np.int32(reduce),
        group_size=np.int64(n),
        comm_key=np.int64(_comm_key(mesh, axes)),
        timeout_ms=np.int64(timeout_ms or DEFAULT_TIMEOUT_MS),
        send_to=np.asarray(send_to, np.int64),
        recv_from=np.asarray(recv_from, np.int64),
        site=np.int64(site),
    )


def _run_sharded(mesh, fn, *xs):
    """Runs fn per device on global arrays shaped (*mesh.shape, *S): each device gets an S."""
    nd = len(mesh.axis_names)
    spec = P(*mesh.axis_names)

    def body(*blocks):
        outs = fn(*[b.reshape(b.shape[nd:]) for b in blocks])
        single = not isinstance(outs, tuple)
        outs = (outs,) if single else outs
        outs = tuple(o.reshape((1,) * nd + o.shape) for o in outs)
        return outs[0] if single else outs

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(spec,) * len(xs), out_specs=spec, check_vma=False
    )
    return jax.jit(sharded)(*xs)


# ---- numpy model of the contract ----
def _members(mesh, axes, coord):
    """(rank of coord, coords of its group in rank order)."""
    names = list(mesh.axis_names)
    idx = [names.index(a) for a in axes]
    dims = [mesh.shape[a] for a in axes]
    members = []
    for r in range(math.prod(dims)):
        c = list(coord)
        for i, v in zip(idx, np.unravel_index(r, dims), strict=True):
            c[i] = int(v)
        members.append(tuple(c))
    rank = int(np.ravel_multi_index([coord[i] for i in idx], dims))
    return rank, members


def _fold(xs, reduce):
    dtype = xs[0].dtype
    acc_dtype = np.float32 if dtype in (jnp.bfloat16, np.float16) else dtype
    fn = {SUM: np.add, MAX: np.maximum, MIN: np.minimum}[reduce]
    acc = xs[0].astype(acc_dtype)
    for x in xs[1:]:
        acc = fn(acc, x.astype(acc_dtype))
    return acc.astype(dtype)


def _reference(op, x, mesh, axes, reduce=SUM, recv_from=()):
    mesh_shape = tuple(mesh.shape.values())
    out = {}
    for coord in np.ndindex(*mesh_shape):
        r, members = _members(mesh, axes, coord)
        xs = [x[m] for m in members]
        if op == ALL_REDUCE:
            y = _fold(xs, reduce)
        elif op == ALL_GATHER:
            y = np.stack(xs)
        elif op == REDUCE_SCATTER:
            y = _fold([v[r] for v in xs], reduce)
        elif op == PERMUTE:
            y = xs[recv_from[r]] if recv_from[r] >= 0 else np.zeros_like(xs[r])
        else:
            y = np.stack([v[r] for v in xs])
        out[coord] = y
    return np.stack([out[c] for c in np.ndindex(*mesh_shape)]).reshape(
        mesh_shape + out[(0,) * len(mesh_shape)].shape
    )


def _random(rng, shape, dtype):
    if np.dtype(dtype) == np.int32:
        return rng.integers(-1000, 1000, size=shape, dtype=np.int32)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def _input_shape(op, n, block_shape):
    return (n, *block_shape) if op in (REDUCE_SCATTER, ALL_TO_ALL) else tuple(block_shape)


def _ring(n, shift=1):
    """send_to / recv_from of a cyclic shift by `shift`."""
    send_to = [(i + shift) % n for i in range(n)]
    recv_from = [(i - shift) % n for i in range(n)]
    return send_to, recv_from


def _check(op, mesh, axes, x, reduce=SUM, send_to=(), recv_from=()):
    y = _run_sharded(
        mesh,
        lambda b: _ark(
            b, op=op, mesh=mesh, axes=axes, reduce=reduce, send_to=send_to, recv_from=recv_from
        ),
        x,
    )
    ref = _reference(op, x, mesh, axes, reduce, recv_from)
    # Exact: the runtime promises the documented reduction order, which the model follows.
    np.testing.assert_array_equal(np.asarray(y), ref)


def _permute_tables(n):
    # A partial permutation with gaps (-1) exercises the zero fill as well as the copies.
    send_to = [-1] * n
    recv_from = [-1] * n
    for src in range(0, n, 2):
        dst = (src + 3) % n
        send_to[src], recv_from[dst] = dst, src
    return send_to, recv_from


# ---- every op x every dtype ----
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", list(OPS))
def test_each_op_and_dtype_matches_model(mesh8, rng, op_name, dtype):
    op = OPS[op_name]
    n = 8
    x = _random(rng, (n, *_input_shape(op, n, (1001,))), dtype)
    send_to, recv_from = _permute_tables(n) if op == PERMUTE else ((), ())
    _check(op, mesh8, ("x",), x, send_to=send_to, recv_from=recv_from)


@pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16, np.int32], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize("reduce", [MAX, MIN], ids=["max", "min"])
@pytest.mark.parametrize("op", [ALL_REDUCE, REDUCE_SCATTER], ids=["all_reduce", "reduce_scatter"])
def test_max_min_match_model(mesh8, rng, op, reduce, dtype):
    x = _random(rng, (8, *_input_shape(op, 8, (77,))), dtype)
    _check(op, mesh8, ("x",), x, reduce=reduce)


# ---- groups on a 2-D mesh ----
@pytest.mark.parametrize("axes", [("x",), ("y",), ("x", "y")], ids=["x", "y", "xy"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_groups_on_2x4_mesh(mesh2x4, rng, op_name, axes):
    op = OPS[op_name]
    n = _group_size(mesh2x4, axes)
    x = _random(rng, (2, 4, *_input_shape(op, n, (5, 13))), np.float32)
    send_to, recv_from = _ring(n) if op == PERMUTE else ((), ())
    _check(op, mesh2x4, axes, x, send_to=send_to, recv_from=recv_from)


# ---- against jax.lax ----
_LAX_TOL = {
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),
    np.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=5e-2),
    np.dtype(np.float16): dict(rtol=2e-3, atol=5e-3),
    np.dtype(np.int32): dict(rtol=0, atol=0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_jax_lax(mesh2x4, rng, dtype):
    axes = ("y",)
    n = 4
    send_to, recv_from = _ring(n, shift=3)
    perm = list(enumerate(send_to))

    def ours(a, b):
        return (
            _ark(a, op=ALL_REDUCE, mesh=mesh2x4, axes=axes),
            _ark(a, op=ALL_REDUCE, mesh=mesh2x4, axes=axes, reduce=MAX),
            _ark(a, op=ALL_GATHER, mesh=mesh2x4, axes=axes),
            _ark(b, op=REDUCE_SCATTER, mesh=mesh2x4, axes=axes),
            _ark(a, op=PERMUTE, mesh=mesh2x4, axes=axes, send_to=send_to, recv_from=recv_from),
            _ark(b, op=ALL_TO_ALL, mesh=mesh2x4, axes=axes),
        )

    def theirs(a, b):
        return (
            lax.psum(a, axes),
            lax.pmax(a, axes),
            lax.all_gather(a, axes),
            lax.psum_scatter(b, axes, scatter_dimension=0, tiled=False),
            lax.ppermute(a, axes, perm),
            lax.all_to_all(b, axes, split_axis=0, concat_axis=0, tiled=False),
        )

    a = _random(rng, (2, 4, 300), dtype)
    b = _random(rng, (2, 4, n, 300), dtype)
    tol = _LAX_TOL[np.dtype(dtype)]
    for got, want in zip(
        _run_sharded(mesh2x4, ours, a, b), _run_sharded(mesh2x4, theirs, a, b), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), **tol)


# ---- sizes ----
@pytest.mark.parametrize("size", [1, 1001, 1 << 20], ids=["1", "odd", "1M"])
def test_all_reduce_sizes(mesh8, rng, size):
    _check(ALL_REDUCE, mesh8, ("x",), _random(rng, (8, size), np.float32))


@pytest.mark.parametrize("op_name", ["all_gather", "reduce_scatter", "all_to_all", "permute"])
def test_size_one_blocks(mesh8, rng, op_name):
    op = OPS[op_name]
    x = _random(rng, (8, *_input_shape(op, 8, (1,))), np.float32)
    send_to, recv_from = _ring(8) if op == PERMUTE else ((), ())
    _check(op, mesh8, ("x",), x, send_to=send_to, recv_from=recv_from)


# ---- re-entry and sequencing ----
def test_call_site_reentered_1000_times_in_fori_loop(mesh8, rng):
    """One jitted function, one loop, the same two call sites entered 1000 times each."""
    n, steps = 8, 1000
    send_to, recv_from = _ring(n)

    def fn(x):
        def body(i, carry):
            v, total = carry
            v = _ark(
                v, op=PERMUTE, mesh=mesh8, axes=("x",), send_to=send_to, recv_from=recv_from, site=1
            )
            s = _ark(v, op=ALL_REDUCE, mesh=mesh8, axes=("x",), site=2)
            return v + 1, total + s

        return lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))

    x = _random(rng, (n, 64), np.int32)
    v, total = _run_sharded(mesh8, fn, x)
    # After k shifts rank r holds x[(r - k) % n] + k; each step adds sum over ranks of v.
    want_v = np.roll(x, steps % n, axis=0) + steps
    want_total = sum(x.sum(axis=0) + n * k for k in range(steps))
    np.testing.assert_array_equal(np.asarray(v), want_v)
    np.testing.assert_array_equal(np.asarray(total), np.broadcast_to(want_total, x.shape))


def test_two_independent_calls_in_a_row(mesh8, rng):
    x = _random(rng, (8, 333), np.float32)
    z = _random(rng, (8, 8, 21), np.float32)

    def fn(a, b):
        return (
            _ark(a, op=ALL_REDUCE, mesh=mesh8, axes=("x",), site=1),
            _ark(b, op=ALL_TO_ALL, mesh=mesh8, axes=("x",), site=2),
        )

    y1, y2 = _run_sharded(mesh8, fn, x, z)
    np.testing.assert_array_equal(np.asarray(y1), _reference(ALL_REDUCE, x, mesh8, ("x",)))
    np.testing.assert_array_equal(np.asarray(y2), _reference(ALL_TO_ALL, z, mesh8, ("x",)))


def test_sites_keep_loop_and_outside_calls_apart(mesh8, rng):
    """Same-shape all_reduces inside fori_loops and outside them, with no data dependency and no
    ordering help: XLA:CPU starts them in different orders on different devices, or concurrently
    on one device. Matching by site must pair each call with its own site on every rank."""
    loops, steps = 2, 3

    def fn(a, b):
        outs = []
        for k in range(loops):
            ak = jnp.sin(a * (k + 1)) + b * k

            def body(i, v, k=k):
                return v + _ark(v * 0.5, op=ALL_REDUCE, mesh=mesh8, axes=("x",), site=10 + k)

            outs.append(lax.fori_loop(0, steps, body, ak))
            bk = jnp.sin(b * (k + 2)) + a * k
            outs.append(_ark(bk, op=ALL_REDUCE, mesh=mesh8, axes=("x",), site=20 + k))
        return tuple(outs)

    def model(a, b):
        outs = []
        for k in range(loops):
            v = np.sin(a * (k + 1)) + b * k
            for _ in range(steps):
                v = v + _reference(ALL_REDUCE, v * 0.5, mesh8, ("x",))
            outs.append(v)
            outs.append(_reference(ALL_REDUCE, np.sin(b * (k + 2)) + a * k, mesh8, ("x",)))
        return outs

    for _ in range(4):
        a = _random(rng, (8, 16384), np.float32)
        b = _random(rng, (8, 16384), np.float32)
        got = _run_sharded(mesh8, fn, a, b)
        # XLA's sin may differ from numpy's in the last bit, which the sums then carry along.
        for g, w in zip(got, model(np.asarray(a), np.asarray(b)), strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-3)


# ---- failures ----
def test_missing_rank_times_out_and_next_call_works(mesh8, rng):
    x = _random(rng, (8, 100), np.float32)

    def skip_rank_3(b):
        return lax.cond(
            lax.axis_index("x") == 3,
            lambda v: v,
            lambda v: _ark(v, op=ALL_REDUCE, mesh=mesh8, axes=("x",), timeout_ms=300),
            b,
        )

    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(_run_sharded(mesh8, skip_rank_3, x))
    message = str(info.value)
    assert "DEADLINE_EXCEEDED" in message
    assert "all_reduce" in message
    assert "waited for rank 3" in message
    assert "comm_key=" in message
    # The waiting rank is named too ("rank <r> waited for rank 3").
    assert any(f"rank {r} waited for rank 3" in message for r in range(8) if r != 3), message

    # The broken communicator was dropped: the same group, same process, works again.
    _check(ALL_REDUCE, mesh8, ("x",), x)


def test_ranks_running_different_collectives_fail_cleanly(mesh8, rng):
    x = _random(rng, (8, 50), np.float32)

    def diverge(b):
        return lax.cond(
            lax.axis_index("x") < 4,
            lambda v: _ark(v, op=ALL_REDUCE, mesh=mesh8, axes=("x",), reduce=SUM),
            lambda v: _ark(v, op=ALL_REDUCE, mesh=mesh8, axes=("x",), reduce=MAX),
            b,
        )

    with pytest.raises(jax.errors.JaxRuntimeError, match="disagree on call"):
        jax.block_until_ready(_run_sharded(mesh8, diverge, x))
    _check(ALL_REDUCE, mesh8, ("x",), x)


def test_bad_arguments_fail_before_the_rendezvous(mesh8, rng):
    x = _random(rng, (8, 16), np.float32)

    def bad_table(b):
        return _ark(b, op=PERMUTE, mesh=mesh8, axes=("x",), send_to=[1] * 8, recv_from=[0] * 8)

    with pytest.raises(jax.errors.JaxRuntimeError, match="send_to and recv_from disagree"):
        jax.block_until_ready(_run_sharded(mesh8, bad_table, x))

    def float64_like(b):
        return _ark(b.astype(jnp.uint32), op=ALL_REDUCE, mesh=mesh8, axes=("x",))

    with pytest.raises(jax.errors.JaxRuntimeError, match="unsupported dtype"):
        jax.block_until_ready(_run_sharded(mesh8, float64_like, x))


# ---- 16-bit float conversions ----
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16], ids=["bfloat16", "float16"])
def test_16bit_sums_bitwise_equal_to_lax_over_all_bit_patterns(mesh2x4, rng, dtype):
    """Every 16-bit pattern (subnormals, infinities, NaNs, rounding ties) through the host
    conversions. Compared with lax.psum, not numpy: XLA runs CPU code with denormals flushed to
    zero, and the handler runs on XLA's threads, so float32 subnormals flush in both."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    a = bits.view(dtype)
    b = rng.permutation(bits).view(dtype)
    # Groups over 'x' have 2 ranks: the devices at (0, j) hold `a`, those at (1, j) hold `b`.
    x = np.stack([np.stack([a] * 4), np.stack([b] * 4)])
    got = np.asarray(
        _run_sharded(mesh2x4, lambda v: _ark(v, op=ALL_REDUCE, mesh=mesh2x4, axes=("x",)), x)
    )
    want = np.asarray(_run_sharded(mesh2x4, lambda v: lax.psum(v, "x"), x))
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("reduce", [MAX, MIN], ids=["max", "min"])
def test_max_min_propagate_nan(mesh8, rng, reduce):
    # Like jnp.maximum / jnp.minimum: a NaN on any rank wins, wherever it stands in the fold.
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[0, 3] = x[5, 10] = x[7, 63] = np.nan
    got = np.asarray(
        _run_sharded(
            mesh8, lambda b: _ark(b, op=ALL_REDUCE, mesh=mesh8, axes=("x",), reduce=reduce), x
        )
    )
    want = _fold(list(x), reduce)
    assert np.isnan(want[[3, 10, 63]]).all()
    for row in got:
        np.testing.assert_array_equal(row, want)


# Run in a fresh process: the group must be larger than the 8 inputs the host kernel folds per
# pass (17 = a first pass of 8, a middle one of 8, a last one of 1), and this process has 8 devices.
_WIDE_GROUP_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=17"
    os.environ["PJRT_NPROC"] = "40"
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_ark as ark

    n = 17
    mesh = Mesh(np.array(jax.devices("cpu")[:n]), ("x",))
    rng = np.random.default_rng(0)

    def fold(xs, fn):
        acc = xs[0].astype(np.float32)
        for x in xs[1:]:
            acc = fn(acc, x.astype(np.float32))
        return acc.astype(xs[0].dtype)

    for dtype in (np.float32, jnp.bfloat16):
        # 2 tiles of the kernel plus a ragged end, per block.
        x = rng.standard_normal((n, n * 4200)).astype(dtype)
        # NaN from a rank of the first pass and from one of the last: max must propagate both.
        x[3, 5] = x[16, 9000] = np.nan
        for api, fn, spec in [
            (ark.psum, np.add, P()),
            (ark.pmax, np.maximum, P()),
            (partial(ark.psum_scatter, tiled=True), np.add, P("x")),
        ]:
            f = jax.jit(jax.shard_map(
                lambda b: api(b[0], axis_name="x"), mesh=mesh, in_specs=P("x"), out_specs=spec
            ))
            got = np.asarray(f(x))
            want = fold(list(x), fn)
            nan = np.isnan(want.astype(np.float32))
            assert nan[[5, 9000]].all()
            np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
            # Bit for bit where not NaN (so signed zeros count too).
            np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    print("ok")
    """
)


def test_groups_wider_than_one_fold_pass_match_the_left_fold(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _WIDE_GROUP_SCRIPT],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
