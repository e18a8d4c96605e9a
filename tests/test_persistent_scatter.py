"""Scatter with device indices (`x.at[i].set(v)`, `.add`, ...): equal to jax.jit on fresh random
inputs, in range, negative (jnp normalizes), out of range (dropped: FILL_OR_DROP, jax's default
for scatters) and clipped (mode="clip"); a KV-cache write `cache.at[:, pos].set(kv)` and a
token write `tokens.at[i].set(tok)` inside a decode fori_loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._reference import interpret


def _leaves(x):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]


def _check(fn, *args, tol=1e-6, workers=(1, 3)):
    want = _leaves(jax.jit(fn)(*args))
    for w in workers:
        got = _leaves(jax.jit(ark.persistent(fn, num_workers=w))(*args))
        for g, r in zip(got, want, strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            if r.dtype.kind in "iub":
                np.testing.assert_array_equal(g, r)
            else:
                assert_close(g, r, tol)
    plan = ark.plan(fn, *args, platform="cpu")
    plan.validate()
    flat = [np.asarray(a) for a in jax.tree_util.tree_leaves(args)]
    for g, r in zip(interpret(plan, *flat), want, strict=True):
        np.testing.assert_allclose(g.reshape(r.shape), r, rtol=tol, atol=tol)
    return want


@pytest.mark.parametrize("i", [0, 3, 7, -1, -8, 8, 100, -9])
def test_set_one_element(rng, i):
    x = rng.standard_normal(8).astype(np.float32)
    v = np.float32(rng.standard_normal())
    _check(lambda x, i, v: x.at[i].set(v), x, np.int32(i), v)


@pytest.mark.parametrize("pos", [0, 5, 15, -1, 16, 40])
def test_kv_cache_write(rng, pos):
    cache = rng.standard_normal((2, 16, 4)).astype(np.float32)
    kv = rng.standard_normal((2, 4)).astype(np.float32)
    _check(lambda c, p, kv: c.at[:, p].set(kv), cache, np.int32(pos), kv)


def test_row_window_and_int_tokens(rng):
    tokens = rng.integers(0, 1000, (3, 10)).astype(np.int32)
    tok = rng.integers(0, 1000, (3,)).astype(np.int32)
    for i in (0, 4, 9, 10, -3):
        _check(lambda t, i, v: t.at[:, i].set(v), tokens, np.int32(i), tok)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    row = rng.standard_normal(6).astype(np.float32)
    for i in (0, 2, 4, 5, -5):
        _check(lambda x, i, r: x.at[i].set(r), x, np.int32(i), row)


def test_add_mul_min_max_with_duplicates(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    idx = np.array([1, 3, 1, -2, 7], np.int32)  # a duplicate, a negative, one dropped
    v = rng.standard_normal((5, 3)).astype(np.float32)
    for fn in (
        lambda x, i, v: x.at[i].add(v),
        lambda x, i, v: x.at[i].mul(v),
        lambda x, i, v: x.at[i].min(v),
        lambda x, i, v: x.at[i].max(v),
    ):
        _check(fn, x, idx, v, tol=1e-6)
    xi = rng.integers(-50, 50, (6,)).astype(np.int32)
    vi = rng.integers(-50, 50, (4,)).astype(np.int32)
    _check(lambda x, i, v: x.at[i].add(v), xi, np.array([0, 5, 0, 2], np.int32), vi)


def test_clip_mode(rng):
    x = rng.standard_normal(8).astype(np.float32)
    for i in (-5, 3, 20):
        _check(lambda x, i: x.at[i].set(9.0, mode="clip"), x, np.int32(i))


@pytest.mark.parametrize("points", [16, 17])
def test_more_than_16_points_are_one_scatter_fold(rng, points):
    """Up to 16 points unroll as selects (they fuse into the readers); from 17 on, the scatter is
    one scatter-fold op (tests/test_persistent_scatter_fold.py)."""
    x = rng.standard_normal(64).astype(np.float32)
    idx = rng.integers(0, 64, points).astype(np.int32)
    fn = lambda x, i: x.at[i].add(1.0)  # noqa: E731
    plan = ark.plan(fn, x, idx, platform="cpu")
    assert sum(op.scatter_fold for op in plan.ops) == (points > 16)
    _check(fn, x, idx)


def test_decode_loop_writes_cache_and_tokens_with_scatter(rng):
    """A decode loop written with .at[].set: the KV cache row and the generated token id are
    scattered at the device position each step, inside ONE persistent call."""
    B, T, d, V = 2, 8, 16, 32
    emb = rng.standard_normal((V, d)).astype(np.float32)
    wk = (rng.standard_normal((d, d)) / 4).astype(np.float32)
    wo = (rng.standard_normal((d, V)) / 4).astype(np.float32)

    def generate(emb, wk, wo, cache, tok):
        def body(pos, c):
            tok, cache, out = c
            x = emb[tok]
            cache = cache.at[:, pos].set(x @ wk)
            s = jnp.einsum("bd,btd->bt", x, cache)
            s = jnp.where(jnp.arange(T)[None, :] <= pos, s, -jnp.inf)
            h = jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), cache)
            tok = jnp.argmax(h @ wo, -1).astype(jnp.int32)
            return tok, cache, out.at[:, pos].set(tok)

        out = jnp.zeros((B, T), jnp.int32)
        return jax.lax.fori_loop(0, T, body, (tok, cache, out))

    cache = rng.standard_normal((B, T, d)).astype(np.float32)
    tok = rng.integers(0, V, (B,)).astype(np.int32)
    want = _check(generate, emb, wk, wo, cache, tok, tol=1e-4)
    assert len(np.unique(want[-1])) > 1


# ---- single-point scatters updated in place (window stores) ---------------------------------


def _window_stores(plan):
    return [op for op in plan.ops if op.store_view >= 0]


def test_kv_cache_write_is_one_window_store(rng):
    """`cache.at[:, pos].set(kv)` of a cache the function returns is one window-store task into
    the cache's own buffer (aliased), not a select over the whole cache."""
    cache = rng.standard_normal((2, 16, 4)).astype(np.float32)
    kv = rng.standard_normal((2, 4)).astype(np.float32)
    plan = ark.plan(lambda c, p, kv: c.at[:, p].set(kv), cache, np.int32(3), kv, platform="cpu")
    (store,) = _window_stores(plan)
    assert plan.tensors[store.out].alias == 0 and plan.outputs == [store.out]
    assert tuple(store.iter_dims) == (2, 1, 4)
    assert all(op.B * op.M * op.N < cache.size for op in plan.ops)


@pytest.mark.parametrize("donate", [False, True])
def test_kv_cache_write_donated(rng, donate):
    cache = rng.standard_normal((3, 12, 8)).astype(np.float32)
    kv = rng.standard_normal((3, 8)).astype(np.float32)

    def step(c, p, kv):
        c = c.at[:, p].set(jnp.tanh(kv))
        return c, jnp.einsum("btd,bd->bt", c, kv)

    for pos in (0, 11, -12, 12, -13, 2**31 - 1):
        want = jax.jit(step)(cache, np.int32(pos), kv)
        fn = jax.jit(ark.persistent(step, num_workers=2), donate_argnums=(0,) if donate else ())
        got = fn(jnp.asarray(cache), np.int32(pos), kv)
        for g, r in zip(got, want, strict=True):
            assert_close(g, r, 1e-5)


def test_chain_of_scatters_and_updates_keeps_program_order(rng, monkeypatch):
    """Overlapping points of `.at[i].set` and dynamic_update_slice stores into one buffer, some
    points out of range (dropped), under chaos mode: the later store wins, as in jax.jit."""

    def fn(buf, a, i, j, k):
        out = buf.at[i].set(jnp.tanh(a[0]))
        out = jax.lax.dynamic_update_slice(out, a[1:3] * 2.0, (j, 0))
        out = out.at[k].set(a[3] - 1.0)
        return out.at[i + 1].set(a[4])

    buf = rng.standard_normal((10, 6)).astype(np.float32)
    a = rng.standard_normal((5, 6)).astype(np.float32)
    for i, j, k in [(2, 2, 3), (9, 8, 9), (-1, 0, 10), (4, 3, -11), (12, 20, 0)]:
        args = [buf, a, np.int32(i), np.int32(j), np.int32(k)]
        want = _check(fn, *args)
        plan = ark.plan(fn, *args, num_workers=3)
        assert len(_window_stores(plan)) == 4
        for seed in (1, 2, 3):
            monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
            got = jax.jit(ark.persistent(fn, num_workers=3))(*args)
            assert_close(got, want[0], 1e-6)
        monkeypatch.delenv("JAX_ARK_PERSISTENT_CHAOS")


def test_two_scattered_dims_and_point_dims_in_the_update(rng):
    """x.at[i, j].set(v) (two scattered dims, either out of range drops the point), and a
    lax.scatter whose update keeps the point's size-1 dim (indices of shape (1, 1))."""
    x = rng.integers(-100, 100, (5, 7)).astype(np.int32)
    v = np.int32(1234)
    for i, j in [(0, 0), (4, 6), (5, 0), (0, 7), (-1, -7), (-6, 2)]:
        _check(lambda x, i, j, v: x.at[i, j].set(v), x, np.int32(i), np.int32(j), v)
    dn = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )

    def rows(x, i, r):
        return jax.lax.scatter(x, jnp.reshape(i, (1, 1)), r[None, :], dn)

    y = rng.standard_normal((6, 3)).astype(np.float32)
    r = rng.standard_normal(3).astype(np.float32)
    for i in (0, 5, 6, -1):
        _check(rows, y, np.int32(i), r)
    assert len(_window_stores(ark.plan(rows, y, np.int32(1), r, platform="cpu"))) == 1


def test_bf16_cache_and_clip_mode_in_place(rng):
    cache = rng.standard_normal((2, 9, 4)).astype(jnp.bfloat16)
    kv = rng.standard_normal((2, 4)).astype(np.float32)
    for pos in (0, 8, 9, -3, 50):
        _check(
            lambda c, p, kv: c.at[:, p].set(kv.astype(jnp.bfloat16), mode="clip"),
            cache, np.int32(pos), kv, tol=1e-2,
        )  # fmt: skip
        _check(
            lambda c, p, kv: c.at[:, p].set(kv.astype(jnp.bfloat16)), cache, np.int32(pos), kv,
            tol=1e-2,
        )  # fmt: skip


def test_old_value_read_elsewhere_is_not_updated_in_place(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    row = rng.standard_normal(5).astype(np.float32)

    def fn(x, i, r):
        return x.at[i].set(r), x.sum(axis=0)  # x survives the update: computed whole

    for i in (1, 4, -2):
        _check(fn, x, np.int32(i), row)
    assert not _window_stores(ark.plan(fn, x, np.int32(1), row, platform="cpu"))


def test_decode_loop_scatters_are_window_stores(rng):
    """The KV-cache and token writes of a decode loop written with .at[].set run as window stores
    inside the loop: no op of the cache's size runs per token."""
    B, T, d = 2, 16, 8
    w = (rng.standard_normal((d, d)) / 3).astype(np.float32)

    def decode(cache, x, w):
        def body(pos, c):
            cache, x, out = c
            k = jnp.tanh(x @ w)
            cache = cache.at[:, pos].set(k)
            x = jnp.einsum("btd,bd->bd", cache, k) / T
            return cache, x, out.at[:, pos].set(x[:, 0])

        return jax.lax.fori_loop(0, T, body, (cache, x, jnp.zeros((B, T), jnp.float32)))

    cache = rng.standard_normal((B, T, d)).astype(np.float32)
    x = rng.standard_normal((B, d)).astype(np.float32)
    _check(decode, cache, x, w, tol=1e-5)
    plan = ark.plan(decode, cache, x, w, platform="cpu")
    assert len(_window_stores(plan)) == 2
    assert all(op.B * op.M * op.N < cache.size for op in plan.ops)


def test_points_along_one_index_dim_are_one_window_store(rng):
    """`cache.at[jnp.arange(B), pos].set(kv)`: each sequence of a batch written at its own
    position (ragged decode) is ONE window-store task over (points, *window), each point dropped
    when out of range; also a plain `x.at[idx].set(rows)` of distinct indices."""
    b, t, d = 4, 16, 8
    cache = rng.standard_normal((b, t, d)).astype(np.float32)
    kv = rng.standard_normal((b, d)).astype(np.float32)

    def ragged(c, pos, kv):
        return c.at[jnp.arange(b), pos].set(jnp.tanh(kv))

    for pos in ([0, 5, 15, 3], [16, -1, 2, 2], [100, -17, 7, 0], [-16, 15, -15, 14]):
        _check(ragged, cache, np.array(pos, np.int32), kv)
    plan = ark.plan(ragged, cache, np.zeros(b, np.int32), kv, platform="cpu")
    (store,) = _window_stores(plan)
    assert tuple(store.iter_dims) == (b, 1, 1, d) and plan.tensors[store.out].alias == 0
    x = rng.standard_normal((9, 3)).astype(np.float32)
    rows = rng.standard_normal((3, 3)).astype(np.float32)
    for idx in ([0, 4, 8], [-1, 2, 9], [3, -10, 1]):
        _check(lambda x, i, r: x.at[i].set(r), x, np.array(idx, np.int32), rows)
    # a rank-6 operand leaves no dim for the points: the whole-result select, still right
    y = rng.standard_normal((3, 2, 2, 2, 2, 3)).astype(np.float32)
    v = rng.standard_normal((2, 2, 2, 2, 2, 3)).astype(np.float32)
    _check(lambda y, i, v: y.at[i].set(v), y, np.array([2, 0], np.int32), v)


def test_ragged_decode_loop_writes_in_place(rng):
    """A decode loop whose sequences sit at different positions (pos + start[b]) writes its
    cache with one window store per token, no cache-sized op per token; positions run past the
    end for some sequences (dropped), as jax.jit does."""
    b, t, d = 3, 10, 8
    w = (rng.standard_normal((d, d)) / 3).astype(np.float32)

    def decode(cache, x, w, start):
        def body(i, c):
            cache, x = c
            k = jnp.tanh(x @ w)
            cache = cache.at[jnp.arange(b), start + i].set(k)
            return cache, jnp.einsum("btd,bd->bd", cache, k) / t

        return jax.lax.fori_loop(0, 6, body, (cache, x))

    cache = rng.standard_normal((b, t, d)).astype(np.float32)
    x = rng.standard_normal((b, d)).astype(np.float32)
    start = np.array([0, 3, 7], np.int32)  # the last sequence runs off the end after 3 tokens
    _check(decode, cache, x, w, start, tol=1e-5)
    plan = ark.plan(decode, cache, x, w, start, platform="cpu")
    assert len(_window_stores(plan)) == 1
    assert all(op.B * op.M * op.N < cache.size for op in plan.ops)


def _batched_scatter_add(operand, indices, updates, operand_batch: int, window: bool):
    """lax.scatter_add whose operand dim `operand_batch` is paired with indices dim 1 (batching
    dims), two points per batch element along indices dim 0, and a window of the operand's last
    dim when `window`."""
    rank = operand.ndim
    scattered = next(d for d in range(rank) if d != operand_batch)
    dn = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2,) if window else (),
        inserted_window_dims=(scattered,)
        if window
        else tuple(d for d in range(rank) if d != operand_batch),
        scatter_dims_to_operand_dims=(scattered,),
        operand_batching_dims=(operand_batch,),
        scatter_indices_batching_dims=(1,),
    )
    return jax.lax.scatter_add(
        operand, indices, updates, dn, mode=jax.lax.GatherScatterMode.FILL_OR_DROP
    )


@pytest.mark.parametrize("operand_batch", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_scatter_with_batching_dims(rng, operand_batch, dtype):
    """Each batch element's points land in its own operand row only; out-of-range points are
    dropped. 2 points x 20 batch rows: more than the 16 points unrolled without batching dims."""
    rows, n = 20, 9
    shape = (rows, n) if operand_batch == 0 else (n, rows)
    operand = rng.integers(-9, 9, shape).astype(dtype)
    indices = rng.integers(-2, n + 2, (2, rows, 1)).astype(np.int32)
    updates = rng.integers(-9, 9, (2, rows)).astype(dtype)
    _check(
        lambda o, i, u: _batched_scatter_add(o, i, u, operand_batch, window=False),
        operand,
        indices,
        updates,
    )
    # With a window: the scattered dim picks a row of 3 columns (the operand's last dim).
    operand3 = rng.integers(-9, 9, (rows, n, 3)).astype(dtype)
    indices3 = rng.integers(-2, n + 2, (2, rows, 1)).astype(np.int32)
    updates3 = rng.integers(-9, 9, (2, rows, 3)).astype(dtype)
    _check(
        lambda o, i, u: _batched_scatter_add(o, i, u, 0, window=True), operand3, indices3, updates3
    )


def test_integer_label_cross_entropy_gradient(rng):
    """The gradient of take_along_axis (optax's integer-label cross entropy) is a scatter-add with
    batching dims, one point per example: 64 examples, not a 16-point limit."""
    logits = rng.standard_normal((64, 100)).astype(np.float32)
    labels = rng.integers(0, 100, (64,)).astype(np.int32)

    def loss(logits, labels):
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    grad = jax.grad(loss)
    text = str(jax.make_jaxpr(grad)(logits, labels))  # the scatter sits in a nested jaxpr
    assert re.search(
        r"scatter-add\[\s*dimension_numbers=[^\]]*operand_batching_dims=\(0,\)", text
    ), "the test no longer covers a scatter with batching dims"
    _check(grad, logits, labels, tol=1e-5)
