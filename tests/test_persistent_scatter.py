"""Scatter with device indices (`x.at[i].set(v)`, `.add`, ...): equal to jax.jit on fresh random
inputs, in range, negative (jnp normalizes), out of range (dropped: FILL_OR_DROP, jax's default
for scatters) and clipped (mode="clip"); a KV-cache write `cache.at[:, pos].set(kv)` and a
token write `tokens.at[i].set(tok)` inside a decode fori_loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._reference import interpret
from jax_ark._persistent._trace import UnsupportedError


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


def test_too_many_points_refused(rng):
    x = rng.standard_normal(64).astype(np.float32)
    idx = np.arange(20, dtype=np.int32)
    with pytest.raises(UnsupportedError, match="scatter-add of 20 scatter points"):
        ark.plan(lambda x, i: x.at[i].add(1.0), x, idx, platform="cpu")


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
