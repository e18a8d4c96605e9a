"""ark.persistent on the CUDA executor: results equal jax.jit(fn) and the Python reference
interpreter, timelines are consistent, a deadlocked plan fails with a clear error.

All tests need an NVIDIA GPU and the CUDA build (skipped otherwise, see conftest.py). Plans use one
worker per SM and narrow column tiles, as the decode benchmark does, so the GEMV fast path (rows
<= 16, weights contiguous along N) and the GEMM fallbacks (transposed operands, many rows) all run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from persistent_models import assert_close as _assert_close
from persistent_models import attention, mlp_chain, random_args, rms_mlp

import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._reference import interpret

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
TOL = {np.float32: 1e-4, BF16: 3e-2}


def _close(got, want, dtype=np.float32):
    _assert_close(got, want, TOL[dtype])


@pytest.fixture(autouse=True)
def _float32_reference():
    """XLA's default precision on GPU runs float32 dots on TF32 tensor cores (10-bit mantissa:
    relative errors of 1e-3 on the first H200 run). ark computes them in float32, so the jax.jit
    references run at HIGHEST precision; ark ignores the precision setting."""
    with jax.default_matmul_precision("highest"):
        yield


def _sms() -> int:
    return int(getattr(jax.devices("gpu")[0], "core_count", 0) or 108)


@pytest.mark.parametrize(
    "dtype,batch,d,tile_n",
    [
        (BF16, 1, 1024, 8),  # one 16-byte vector per weight row per tile, 128 tiles per layer
        (BF16, 16, 1024, 32),  # batch 16: the 16-row GEMV variant
        (np.float32, 3, 512, 16),  # batch padded to 4
        (BF16, 1, 4096, 32),  # the d=4096 decode shape, 128 tiles of 32 columns
    ],
)
def test_decode_chain_gemv_path(rng, dtype, batch, d, tile_n):
    layers = 3
    x = random_args(rng, [(batch, d)], dtype)[0]
    ws = [w * np.asarray(1.5, dtype) for w in random_args(rng, [(d, d)] * layers, dtype)]
    workers = min(_sms(), max(1, d // tile_n))
    fn = ark.persistent(mlp_chain, num_workers=workers, tile_n=tile_n)
    got = jax.jit(fn)(x, ws)
    _close(got, jax.jit(mlp_chain)(x, ws), dtype)
    _close(got, interpret(fn.plan(x, ws), x, *ws)[0], dtype)


def test_default_plan_uses_one_worker_per_sm(rng):
    """No num_workers / tile_n: the GPU defaults (a worker per SM, ~one GEMV column tile per SM)."""
    from jax_ark._ffi import cuda_module

    d, layers = 1024, 4
    x = random_args(rng, [(1, d)], BF16)[0]
    ws = random_args(rng, [(d, d)] * layers, BF16)
    fn = ark.persistent(mlp_chain)
    plan = fn.plan(x, ws)
    resident = cuda_module().persistent_max_workers(0)
    assert plan.num_workers == min(_sms(), resident)
    assert plan.ops[0].tile_n == 8 * math.ceil(math.ceil(d / plan.num_workers) / 8)  # 132 SMs: 8
    assert ark.plan(mlp_chain, x, ws).to_binary().tobytes() == plan.to_binary().tobytes()
    _close(jax.jit(fn)(x, ws), jax.jit(mlp_chain)(x, ws), BF16)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_mlp_chain_32_layers(rng, dtype):
    d, layers = 256, 32
    x = random_args(rng, [(4, d)], dtype)[0]
    ws = [w * np.asarray(1.5, dtype) for w in random_args(rng, [(d, d)] * layers, dtype)]
    fast = jax.jit(ark.persistent(mlp_chain, num_workers=_sms(), tile_n=8))
    _close(fast(x, ws), jax.jit(mlp_chain)(x, ws), dtype)


def test_rms_norm_mlp_block_and_reference_interpreter(rng):
    args = random_args(rng, [(12, 256), (256,), (256, 512), (512, 256)])
    want = jax.jit(rms_mlp)(*args)
    fn = ark.persistent(rms_mlp, num_workers=_sms(), tile_n=16)
    got = jax.jit(fn)(*args)
    _close(got, want)
    _close(got, interpret(fn.plan(*args), *args)[0])


@pytest.mark.parametrize("rows,cols,workers", [(1, 5003, None), (3, 5003, None), (200, 301, 4)])
def test_row_reductions_of_every_kind_for_few_and_many_rows(rng, rows, cols, workers):
    """A task of few rows (one per SM-wide plan) splits each row across warps (row_fold), also for
    the kinds folded as (bits, index) pairs: argmax / argmin of logits (greedy sampling), integer
    sum / max, float min; 4 workers over 200 rows give tasks of 50 rows, one warp per row. Exact
    where the fold order cannot matter; float sums within float32 tolerance."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[:, cols // 2] = x.max(axis=1)  # a tie for the maximum: the lower index wins
    k = rng.integers(-1000, 1000, (rows, cols), dtype=np.int32)

    def fn(x, k):
        exact = (jnp.argmax(x, -1), jnp.argmin(x, -1), jnp.min(x, -1), jnp.max(x, -1))
        return exact + (jnp.sum(k, -1), jnp.max(k, -1)), jnp.sum(x, -1)

    (got_exact, got_sum), (want_exact, want_sum) = (
        jax.jit(ark.persistent(fn, num_workers=workers or _sms()))(x, k),
        jax.jit(fn)(x, k),
    )
    for g, w in zip(got_exact, want_exact, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    _close(got_sum, want_sum)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_softmax_attention_seq128(rng, dtype):
    args = random_args(rng, [(128, 64), (64, 32), (64, 32), (64, 32)], dtype)
    want = jax.jit(attention)(*args)
    fn = ark.persistent(attention, num_workers=_sms())
    got = jax.jit(fn)(*args)
    _close(got, want, dtype)
    _close(got, interpret(fn.plan(*args), *args)[0], dtype)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_shapes_not_dividing_tiles_batched_and_transposed(rng, dtype):
    def fn(a, b, c, bias):
        y = jnp.einsum("bmk,bnk->bmn", a, b)  # batched, rhs transposed
        z = c.T @ y[0]  # lhs transposed
        return jax.nn.tanh(z + bias), jnp.max(y, axis=1), jnp.sum(y, axis=(0, 2))

    args = random_args(rng, [(3, 37, 19), (3, 70, 19), (37, 5), (70,)], dtype)
    fast = jax.jit(ark.persistent(fn, num_workers=_sms(), tile_m=16, tile_n=24))
    for got, want in zip(fast(*args), jax.jit(fn)(*args), strict=True):
        _close(got, want, dtype)


def test_gemv_unaligned_tiles_and_weights_computed_in_the_kernel(rng):
    # tile_n = 12 bf16 columns: vectors straddle tile edges (masked scalar loads); the weights
    # of the second matmul are produced inside the plan (coherent loads, read after the wait).
    def fn(x, w1, w2):
        return jax.nn.gelu(x @ w1) @ (w2 * jnp.asarray(0.5, w2.dtype))

    args = random_args(rng, [(2, 200), (200, 300), (300, 100)], BF16)
    f = ark.persistent(fn, num_workers=_sms(), tile_n=12)
    got = jax.jit(f)(*args)
    _close(got, jax.jit(fn)(*args), BF16)
    _close(got, interpret(f.plan(*args), *args)[0], BF16)


def test_timeline_is_consistent(rng):
    args = random_args(rng, [(16, 128), (128, 256), (256, 128)])
    fn = lambda x, w1, w2: x + jax.nn.gelu(x @ w1) @ w2  # noqa: E731
    prof_fn = ark.persistent(fn, num_workers=_sms(), profile=True, tile_n=16)
    out, prof = jax.jit(prof_fn)(*args)
    _close(out, jax.jit(fn)(*args))
    plan = prof_fn.plan(*args)
    tl = ark.timeline(prof, plan)
    assert sorted(r["task"] for r in tl.records) == list(range(len(plan.tasks)))
    by_task = {r["task"]: r for r in tl.records}
    for r in tl.records:
        assert 0 <= r["wait_begin"] <= r["start"] <= r["end"], r
        assert plan.tasks[r["task"]].op == r["op"]
        assert r["task"] in plan.queues[r["worker"]], r
        for d in plan.tasks[r["task"]].deps:
            assert by_task[d]["end"] <= r["start"], (d, r["task"])


def test_chaos_mode_is_deterministic(rng, monkeypatch):
    args = random_args(rng, [(16, 96), (96, 128), (128, 96)])
    fn = lambda x, w1, w2: jax.nn.softmax(x + jax.nn.gelu(x @ w1) @ w2, axis=-1)  # noqa: E731
    base = np.asarray(jax.jit(ark.persistent(fn, num_workers=_sms(), tile_n=16))(*args))
    for seed in (1, 2, 3):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        got = np.asarray(jax.jit(ark.persistent(fn, num_workers=_sms(), tile_n=16))(*args))
        assert np.array_equal(got, base), seed
    _close(base, jax.jit(fn)(*args))


def test_deadlocked_plan_times_out_naming_task_and_worker(rng):
    """The GPU handler never synchronizes, so the failure of a call is reported by the NEXT
    ark_persistent call on the device; the process stays usable afterwards."""
    args = random_args(rng, [(4, 64), (64, 64)])
    fn = lambda x, w: jnp.tanh(x @ w) @ w  # noqa: E731
    plan = ark.plan(fn, *args, num_workers=2).copy()
    queue = next(q for q in plan.queues if len(q) >= 2)
    first, last = queue[0], queue[-1]
    plan.tasks[first].deps.append(last)  # waits for a task queued behind it on its own worker
    jax.block_until_ready(run_plan(plan, args, timeout_ms=200)[0])  # times out on the device
    good = ark.plan(fn, *args, num_workers=2)
    with pytest.raises(Exception, match=r"worker \d+ timed out after [\d.]+ ms waiting for task"):
        jax.block_until_ready(run_plan(good, args)[0])
    # The record was consumed: the next call runs normally.
    _close(run_plan(good, args)[0][0], jax.jit(fn)(*args))


def test_more_workers_than_resident_blocks_is_refused(rng):
    args = random_args(rng, [(4, 64), (64, 64)])
    fn = lambda x, w: jnp.tanh(x @ w)  # noqa: E731
    # More than 8 blocks per SM never fit (the kernel takes 255 registers a thread); the plan
    # format caps workers at 1024, which a GPU of 128+ SMs reaches first.
    too_many = min(1024, 8 * _sms() + 1)
    with pytest.raises(Exception, match="workers but this GPU keeps only"):
        jax.block_until_ready(jax.jit(ark.persistent(fn, num_workers=too_many, tile_n=1))(*args))


# ---- the kernel's per-task path (issue 9 item 5): staging reused per op, the one-time queue check


def _op_runs(f, *args):
    """Each worker's queue as op ids (consecutive equal ids: runs that reuse one staging)."""
    plan = f.plan(*args)
    return [[plan.tasks[t].op for t in q] for q in plan.queues]


@pytest.mark.parametrize("rows,tile_m", [(4, 16), (40, 16)])  # the GEMV path; the GEMM path
def test_consecutive_tiles_of_one_op_reuse_its_staging(rng, rows, tile_m):
    """Two workers, narrow tiles: each worker runs many tiles of one op back to back, which the
    kernel stages once (program, resolved loads, output shape), then the next op's tiles. Ops
    alternate between matmul (bias and residual loads in the epilogue), reduce and map, so a
    stale staging (the previous op's program or views) gives wrong numbers."""

    def fn(x, w1, w2, b):
        h = jax.nn.gelu(x @ w1 + b)
        y = x + h @ w2
        return y, jnp.max(h, axis=1), jax.nn.softmax(y, axis=-1) * jnp.sum(h, axis=1, keepdims=True)

    args = random_args(rng, [(rows, 96), (96, 256), (256, 96), (256,)])
    f = ark.persistent(fn, num_workers=2, tile_m=tile_m, tile_n=8)
    runs = _op_runs(f, *args)
    assert any(q[i] == q[i + 1] for q in runs for i in range(len(q) - 1)), runs
    got = jax.jit(f)(*args)
    for g, w in zip(got, jax.jit(fn)(*args), strict=True):
        _close(g, w)
    for g, w in zip(got, interpret(f.plan(*args), *args), strict=True):
        _close(g, w)


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_reruns_the_same_op_with_each_iterations_views(rng, workers):
    """One or two workers: the loop body's ops run back to back, the same op in consecutive
    iterations. Staging is keyed by (op, iteration), so each iteration reads its own slice of the
    stacked weights and writes its own slice of the stacked output."""

    def fn(x, ws, bs):
        def body(c, p):
            w, b = p
            h = jnp.tanh(c @ w + b)
            return h, jnp.sum(h, axis=1)

        return jax.lax.scan(body, x, (ws, bs))

    x, ws, bs = random_args(rng, [(4, 64), (6, 64, 64), (6, 64)])
    ws = ws * np.float32(np.sqrt(6) / 8)  # ~N(0, 1/64): tanh stays away from saturation
    f = ark.persistent(fn, num_workers=workers, tile_n=16)
    got, want = jax.jit(f)(x, ws, bs), jax.jit(fn)(x, ws, bs)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        _close(g, w)


def test_bad_task_record_is_refused_by_the_queue_check(rng):
    """A task record edited after the host check (its tile past the op's columns) is caught by the
    kernel's one-time check of every queued task before the queue is walked (reported, like every
    device-side verdict, by the next call on the device); the process stays usable."""
    args = random_args(rng, [(4, 64), (64, 64)])
    fn = lambda x, w: jnp.tanh(x @ w)  # noqa: E731
    plan = ark.plan(fn, *args, num_workers=2)
    words = plan.to_binary().copy()
    tasks_at = int(words[15])  # Header.tasks_at; TaskRecord: [op, flags, b0, b1, m0, m1, n0, n1]
    last = len(plan.tasks) - 1
    words[tasks_at + 8 * last + 7] = 1 << 30
    jax.block_until_ready(run_plan(plan, args, words=words)[0])
    refused = rf"rejected the plan at task {last} .*tile bounds out of range"
    with pytest.raises(Exception, match=refused):
        jax.block_until_ready(run_plan(plan, args)[0])
    _close(run_plan(plan, args)[0][0], jax.jit(fn)(*args))


@pytest.mark.parametrize("pos", [0, 7, -1, 8, 1000])
def test_kv_cache_scatter_window_store_drops_out_of_range_points(rng, pos):
    """`cache.at[:, pos].set(kv)` is one window store into the donated cache; a position out of
    range stores nothing (the kDropStore offset), as jax.jit's scatter drops it."""
    cache = rng.standard_normal((4, 8, 64)).astype(np.float32)
    kv = rng.standard_normal((4, 64)).astype(np.float32)

    def step(c, p, kv):
        c = c.at[:, p].set(jnp.tanh(kv))
        return c, jnp.einsum("btd,bd->bt", c, kv)

    want = jax.jit(step)(cache, np.int32(pos), kv)
    got = jax.jit(ark.persistent(step), donate_argnums=(0,))(jnp.asarray(cache), np.int32(pos), kv)
    for g, r in zip(got, want, strict=True):
        _close(g, r)


def test_ragged_kv_cache_scatter_is_one_window_store(rng):
    """`cache.at[jnp.arange(B), pos].set(kv)` (each sequence at its own position, some out of
    range): one window store over (B, 1, 1, d) whose threads store the points in parallel."""
    cache = rng.standard_normal((4, 8, 64)).astype(np.float32)
    kv = rng.standard_normal((4, 64)).astype(np.float32)

    def step(c, pos, kv):
        c = c.at[jnp.arange(4), pos].set(jnp.tanh(kv))
        return c, jnp.einsum("btd,bd->bt", c, kv)

    for pos in ([0, 7, 3, 3], [8, -1, -9, 2]):
        pos = np.array(pos, np.int32)
        want = jax.jit(step)(cache, pos, kv)
        got = jax.jit(ark.persistent(step), donate_argnums=(0,))(jnp.asarray(cache), pos, kv)
        for g, r in zip(got, want, strict=True):
            _close(g, r)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, BF16])
def test_scatter_folds_fold_duplicates_in_order(rng, dtype):
    """Scatters of many points are one scatter-fold task (run_scatter_fold: per 256-value chunk,
    thread j folds the values whose element is j mod 256). An embedding-style row scatter-add with
    duplicate rows, segment max / min, bincount and a `set` whose duplicates keep the last value:
    float32 / int32 equal to numpy's in-order fold bit for bit, every case equal to jax.jit."""
    rows = rng.integers(0, 40, 600).astype(np.int32)
    upd = (rng.standard_normal((600, 48)) * 4).astype(dtype)

    def fn(rows, upd):
        table = jnp.zeros((40, 48), upd.dtype).at[rows].add(upd)
        flat = upd[:, 0]
        return (
            table,
            jax.ops.segment_max(flat, rows, 40),
            jax.ops.segment_min(flat, rows, 40),
            jnp.bincount(rows, length=40),
            jnp.zeros(40, upd.dtype).at[rows].set(flat),
        )

    got = jax.jit(ark.persistent(fn))(rows, upd)
    want = jax.jit(fn)(rows, upd)
    for g, w in zip(got, want, strict=True):
        if dtype == BF16:
            _close(np.asarray(g, np.float32), np.asarray(w, np.float32), BF16)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if dtype != BF16:  # the sum's order: numpy's add.at folds one value at a time, in order
        serial = np.zeros((40, 48), dtype)
        np.add.at(serial, rows, upd)
        np.testing.assert_array_equal(np.asarray(got[0]), serial)


def test_linear_algebra_loops(rng):
    """cholesky / triangular solves / LU as column loops in one launch: a GP likelihood and its
    gradient, and jnp.linalg.solve, against jax.jit (cuSOLVER)."""
    x = rng.standard_normal((8, 8)).astype(np.float32)
    k = x @ x.T + 8 * np.eye(8, dtype=np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)

    def nll(k, y):
        low = jnp.linalg.cholesky(k)
        alpha = jax.scipy.linalg.cho_solve((low, True), y)
        return 0.5 * jnp.sum(y * alpha) + jnp.sum(jnp.log(jnp.diag(low)))

    def fn(k, y):
        return jax.value_and_grad(nll)(k, y), jnp.linalg.solve(k + x, y)

    for g, w in zip(
        jax.tree.leaves(jax.jit(ark.persistent(fn))(k, y)),
        jax.tree.leaves(jax.jit(fn)(k, y)),
        strict=True,
    ):
        _assert_close(g, w, 1e-3)


def test_long_scans_radix_sorts_top_k_and_integer_matmuls(rng):
    """Algorithms planned from jax.numpy (docs/internals.md): blocked scans over 32,768, a radix
    sort of 5,000 (32 passes, a scatter fold each), top_k(40) of 32,000 (a radix select), an
    int8 x int8 -> int32 matmul in exact float32 chunks, and the top-k / top-p samplers of a
    decode step; every integer and index bit for bit as jax.jit."""
    x = rng.standard_normal((2, 32768)).astype(np.float32)
    logits = (rng.standard_normal((2, 32000)) * 2).astype(np.float32)
    keys = rng.standard_normal((2, 5000)).astype(np.float32)
    a = rng.integers(-128, 128, (16, 3000)).astype(np.int8)
    w = rng.integers(-128, 128, (3000, 64)).astype(np.int8)

    def fn(x, logits, keys, a, w, key):
        values, index = jax.lax.top_k(logits, 40)
        probs = jax.nn.softmax(logits, axis=-1)
        ranked = jnp.sort(probs, axis=-1)[:, ::-1]
        cutoff = jnp.take_along_axis(
            ranked, jnp.argmax(jnp.cumsum(ranked, axis=-1) > 0.9, axis=-1)[:, None], axis=-1
        )
        nucleus = jax.random.categorical(key, jnp.where(probs >= cutoff, logits, -jnp.inf))
        return (
            jnp.cumsum(x, axis=1),
            jax.lax.cummax(x, axis=1, reverse=True),
            jnp.argsort(keys, axis=1),
            values,
            index,
            jax.lax.dot(a, w, preferred_element_type=jnp.int32),
            nucleus,
        )

    args = (x, logits, keys, a, w, jax.random.key(5))
    got, want = jax.jit(ark.persistent(fn))(*args), jax.jit(fn)(*args)
    _assert_close(got[0], want[0], 1e-4)
    for g, v in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(v))


_GRAPH_REPLAY = """
import jax, jax.numpy as jnp, numpy as np
import jax_ark as ark

def mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2

def step(x, w1, w2):  # XLA fusions around the persistent call: one command buffer with them
    y = ark.persistent(mlp)(x * 0.5 + 1.0, w1, w2)
    return jnp.sin(y) * 2.0 + x

def want(x, w1, w2):
    return jnp.sin(mlp(x * 0.5 + 1.0, w1, w2)) * 2.0 + x

f = jax.jit(step)
rng = np.random.default_rng(11)
shapes = [(16, 256), (256, 512), (512, 256)]
args = [rng.standard_normal(s).astype(np.float32) / 8 for s in shapes]
assert "ark_persistent_graph" in f.lower(*args).as_text()
for call in range(4):
    if call % 2:  # new buffers every other call: XLA records the launch again
        args = [rng.standard_normal(s).astype(np.float32) / 8 for s in shapes]
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(want)(*args))
    got = np.asarray(f(*args))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
ark.check()
print("graph replays ok")
"""


def test_graph_target_replays_under_xla_command_buffers():
    # JAX_ARK_CUDA_GRAPHS=1: a plan without put tasks lowers to ark_persistent_graph, which XLA may
    # record into its CUDA graph together with the fusions around it and replay without running
    # the handler (xla_ffi/gpu/persistent.cc says why that is correct). Command buffers with custom
    # calls on, from one operation up, in a fresh process (the flags are read at backend start).
    import subprocess
    import sys

    from subprocess_env import TESTS_DIR, subprocess_env

    flags = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    out = subprocess.run(
        [sys.executable, "-c", _GRAPH_REPLAY],
        capture_output=True,
        text=True,
        timeout=60,  # gpu_check.sh gives this file's step 90 s: a hang must not take it all
        env=subprocess_env(XLA_FLAGS=flags, JAX_ARK_CUDA_GRAPHS="1"),
        cwd=TESTS_DIR,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "graph replays ok" in out.stdout
