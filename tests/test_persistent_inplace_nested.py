"""Stacked KV caches updated in place through nested loops: the decode form users write for deep
models (a tokens fori_loop around a layers scan over stacked weights and stacked caches, the
caches passed through the layers scan as xs and re-stacked as ys, or carried by it) keeps each
cache in ONE tensor, the result aliased to the cache input, and writes only the new row per token
and layer (a window store at (layer, pos)). Plans are inspected (no cache-sized op in either
loop) and results equal jax.jit's on random inputs: 1..3 workers, donation on and off, chaos
mode, and the reference interpreter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._format import Plan
from jax_ark._persistent._reference import interpret

B, T, D, V, L, STEPS = 2, 12, 16, 32, 3, 8


def _leaves(x):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]


def _rms(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


def _attend(x, w, q, kc, vc, pos):
    """Causal attention of one new position over a (B, T, D) cache, then an MLP."""
    s = jnp.einsum("bd,btd->bt", q, kc) / np.float32(np.sqrt(q.shape[-1]))
    s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
    x = x + jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), vc) @ w["wo"]
    return x + jax.nn.gelu(_rms(x, w["g2"]) @ w["w1"]) @ w["w2"]


def _layer_xs(pos, scatter=False):
    """A layer body for scan over (weights, k cache slice, v cache slice) as xs -> ys; the new
    row written with dynamic_update_slice, or (scatter) with `.at[:, pos].set`."""

    def layer(x, lw):
        w, kc, vc = lw
        h = _rms(x, w["g1"])
        q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
        if scatter:
            kc, vc = kc.at[:, pos].set(k), vc.at[:, pos].set(v)
        else:
            kc = jax.lax.dynamic_update_slice(kc, k[:, None, :], (0, pos, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[:, None, :], (0, pos, 0))
        return _attend(x, w, q, kc, vc, pos), (kc, vc)

    return layer


def _greedy(params, x):
    return jnp.argmax(_rms(x, params["gf"]) @ params["unembed"], -1).astype(jnp.int32)


def generate_xs(params, layers, kcs, vcs, token, reverse=False, scatter=False):
    """Greedy decoding of STEPS tokens; layers as an inner scan with the stacked caches as xs,
    re-stacked as ys (the form of flax nnx.scan / a hand-written stacked-layers model)."""

    def body(pos, c):
        tok, kcs, vcs, out = c
        x = params["embed"][tok]
        layer = _layer_xs(pos, scatter)
        x, (kcs, vcs) = jax.lax.scan(layer, x, (layers, kcs, vcs), reverse=reverse)
        tok = _greedy(params, x)
        if scatter:
            return tok, kcs, vcs, out.at[:, pos].set(tok)
        return tok, kcs, vcs, jax.lax.dynamic_update_slice(out, tok[:, None], (0, pos))

    out = jnp.zeros((token.shape[0], STEPS), jnp.int32)
    return jax.lax.fori_loop(0, STEPS, body, (token, kcs, vcs, out))


def generate_carried(params, layers, kcs, vcs, token, scatter=False):
    """The same decoder, the layers scan carrying the whole stacked caches and updating layer
    l's row with dynamic_update_slice at (l, 0, pos, 0) (or `.at[l, :, pos].set`); attention
    reads cache[l]."""

    def body(pos, c):
        tok, kcs, vcs, out = c

        def layer(carry, w):
            x, kcs, vcs, at = carry
            h = _rms(x, w["g1"])
            q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
            if scatter:
                kcs, vcs = kcs.at[at, :, pos].set(k), vcs.at[at, :, pos].set(v)
            else:
                kcs = jax.lax.dynamic_update_slice(kcs, k[None, :, None, :], (at, 0, pos, 0))
                vcs = jax.lax.dynamic_update_slice(vcs, v[None, :, None, :], (at, 0, pos, 0))
            x = _attend(x, w, q, kcs[at], vcs[at], pos)
            return (x, kcs, vcs, at + 1), None

        x = params["embed"][tok]
        (x, kcs, vcs, _), _ = jax.lax.scan(layer, (x, kcs, vcs, jnp.int32(0)), layers)
        tok = _greedy(params, x)
        return tok, kcs, vcs, jax.lax.dynamic_update_slice(out, tok[:, None], (0, pos))

    out = jnp.zeros((token.shape[0], STEPS), jnp.int32)
    return jax.lax.fori_loop(0, STEPS, body, (token, kcs, vcs, out))


def decode_step_xs(params, layers, kcs, vcs, token, pos):
    """ONE decode step (no tokens loop): a top-level layers scan with the caches as xs -> ys."""
    x = params["embed"][token]
    x, (kcs, vcs) = jax.lax.scan(_layer_xs(pos), x, (layers, kcs, vcs))
    return _greedy(params, x), kcs, vcs


def _args(rng, d=D, b=B):
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    params = {
        "embed": rng.standard_normal((V, d)).astype(np.float32),
        "unembed": w(d, V) * 4,
        "gf": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
    }
    layers = {
        "g1": (1 + 0.1 * rng.standard_normal((L, d))).astype(np.float32),
        "g2": (1 + 0.1 * rng.standard_normal((L, d))).astype(np.float32),
        **{k: w(L, d, d) for k in ("wq", "wk", "wv", "wo")},
        "w1": w(L, d, 2 * d),
        "w2": w(L, 2 * d, d),
    }
    # random caches (not zeros): masked entries are read, and untouched rows must survive
    kcs = rng.standard_normal((L, b, T, d)).astype(np.float32)
    vcs = rng.standard_normal((L, b, T, d)).astype(np.float32)
    return params, layers, kcs, vcs, rng.integers(0, V, (b,)).astype(np.int32)


def _compare(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        if r.dtype.kind in "iub":
            np.testing.assert_array_equal(g, r)
        else:
            assert_close(g, r, tol)


def _assert_caches_in_place(plan: Plan, kv_outputs=(1, 2), kv_inputs=None, limit=B * T * D):
    """Both caches are aliased results; no op inside any loop is as large as `limit` (one layer's
    cache); each cache's only writer is one window store of one (B, D) row."""
    assert plan.loops
    flat_inputs = kv_inputs or ()
    for n, o in enumerate(kv_outputs):
        t = plan.outputs[o]
        spec = plan.tensors[t]
        assert spec.storage == "result" and spec.alias >= 0, spec
        if flat_inputs:
            assert spec.alias == flat_inputs[n]
        writers = [op for op in plan.ops if op.out == t]
        assert len(writers) == 1 and writers[0].store_view >= 0
        assert writers[0].B * writers[0].M * writers[0].N == B * D  # one row of one layer
    in_loops = [op for op in plan.ops if op.loop >= 0]
    too_big = [op.name for op in in_loops if op.B * op.M * op.N >= limit]
    assert not too_big, too_big


def _flat(args):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(args)]


def _cache_operands(args):
    """Flat operand indices of kcs and vcs (arguments 2 and 3)."""
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    return sum(sizes[:2]), sum(sizes[:3])


@pytest.mark.parametrize(
    "fn",
    [
        generate_xs,
        lambda *a: generate_xs(*a, reverse=True),
        generate_carried,
        lambda *a: generate_xs(*a, scatter=True),
        lambda *a: generate_carried(*a, scatter=True),
    ],
    ids=["xs_to_ys", "xs_to_ys_reversed", "carried", "xs_to_ys_at_set", "carried_at_set"],
)
def test_stacked_caches_in_place_through_tokens_x_layers(rng, fn):
    args = _args(rng)
    want = _leaves(jax.jit(fn)(*args))
    assert len(np.unique(want[-1])) > 2  # the model really decodes
    # the untouched rows of the caches keep their random content
    np.testing.assert_array_equal(want[1][:, :, STEPS:], args[2][:, :, STEPS:])
    plan = ark.plan(fn, *args, platform="cpu")
    assert [(lp.trip_count, lp.parent) for lp in plan.loops] == [(STEPS, -1), (L, 0)]
    # (carried: cache[at] with `at` a layer counter is a view moving with the layer iteration)
    _assert_caches_in_place(plan, kv_inputs=_cache_operands(args))
    plan.validate()
    for workers in (1, 2, 3):
        _compare(_leaves(jax.jit(ark.persistent(fn, num_workers=workers))(*args)), want)
    for g, r in zip(interpret(plan, *_flat(args)), want, strict=True):
        assert_close(g.reshape(r.shape).astype(np.float32), r.astype(np.float32), 1e-4)


@pytest.mark.parametrize("fn", [generate_xs, generate_carried], ids=["xs_to_ys", "carried"])
def test_donated_stacked_caches(rng, fn):
    """With the caches donated the result IS the input's buffer (no copy at all); the values
    equal jax.jit's."""
    args = _args(rng)
    want = _leaves(jax.jit(fn)(*args))
    donated = jax.jit(ark.persistent(fn, num_workers=2), donate_argnums=(2, 3))
    params, layers, kcs, vcs, token = args
    _compare(_leaves(donated(params, layers, jnp.asarray(kcs), jnp.asarray(vcs), token)), want)


@pytest.mark.parametrize("fn", [generate_xs, generate_carried], ids=["xs_to_ys", "carried"])
def test_stacked_caches_in_place_chaos(rng, fn, monkeypatch):
    """Chaos mode (adversarial task orders, races detected): a window store of layer l + 1 or of
    the next token must wait for every reader of the rows it overwrites."""
    args = _args(rng)
    want = _leaves(jax.jit(fn)(*args))
    for seed in ("3", "11"):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", seed)
        _compare(_leaves(jax.jit(ark.persistent(fn, num_workers=3))(*args)), want)


def test_one_decode_step_with_a_top_level_layers_scan(rng):
    """One decode step (the layers scan at top level, caches as xs -> ys): in place too."""
    params, layers, kcs, vcs, token = _args(rng)
    args = (params, layers, kcs, vcs, token, np.int32(5))
    want = _leaves(jax.jit(decode_step_xs)(*args))
    plan = ark.plan(decode_step_xs, *args, platform="cpu")
    assert [lp.trip_count for lp in plan.loops] == [L]
    _assert_caches_in_place(plan, kv_inputs=_cache_operands(args))
    for workers in (1, 3):
        _compare(_leaves(jax.jit(ark.persistent(decode_step_xs, num_workers=workers))(*args)), want)
    donated = jax.jit(ark.persistent(decode_step_xs), donate_argnums=(2, 3))
    got = donated(params, layers, jnp.asarray(kcs), jnp.asarray(vcs), token, np.int32(5))
    _compare(_leaves(got), want)


def test_cache_read_before_its_update_is_not_in_place_and_still_right(rng):
    """A layer that reads its old cache slice besides updating it needs the old value after the
    update: that cache is not updated in place (the stacked ys is computed) and the results
    still equal jax.jit's; the other cache stays in place."""

    def fn(params, layers, kcs, vcs, token):
        def body(pos, c):
            tok, kcs, vcs = c

            def layer(x, lw):
                w, kc, vc = lw
                h = _rms(x, w["g1"]) + kc[:, 0, :]  # the old first row
                q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
                kc = jax.lax.dynamic_update_slice(kc, k[:, None, :], (0, pos, 0))
                vc = jax.lax.dynamic_update_slice(vc, v[:, None, :], (0, pos, 0))
                return _attend(x, w, q, kc, vc, pos), (kc, vc)

            x, (kcs, vcs) = jax.lax.scan(layer, params["embed"][tok], (layers, kcs, vcs))
            return _greedy(params, x), kcs, vcs

        return jax.lax.fori_loop(0, STEPS, body, (token, kcs, vcs))

    args = _args(rng)
    want = _leaves(jax.jit(fn)(*args))
    plan = ark.plan(fn, *args, platform="cpu")
    k_out, v_out = (plan.tensors[plan.outputs[i]] for i in (1, 2))
    assert k_out.alias < 0 and v_out.alias >= 0
    for workers in (1, 3):
        _compare(_leaves(jax.jit(ark.persistent(fn, num_workers=workers))(*args)), want)


def test_wide_rows_wait_for_every_tile_of_the_new_row(rng, monkeypatch):
    """d=128: the new K / V row comes from a matmul of several column tiles, and the window store
    of that row into the stacked cache (a window of lower rank than the cache) must wait for all
    of them (its reads are indexed over the window; indexing them over the cache's shape made it
    wait for the first tile only, and it stored unwritten values)."""
    args = _args(rng, d=128, b=1)
    want = _leaves(jax.jit(generate_xs)(*args))
    plan = ark.plan(generate_xs, *args, platform="cpu")
    for seed in range(3):  # the reference interpreter in random dependency-respecting orders
        got = interpret(plan, *_flat(args), rng=np.random.default_rng(seed))
        for g, r in zip(got, want, strict=True):
            assert_close(g.reshape(r.shape).astype(np.float32), r.astype(np.float32), 1e-4)
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "5")
    _compare(_leaves(jax.jit(ark.persistent(generate_xs, num_workers=3))(*args)), want)


@pytest.mark.parametrize("reverse", [False, True])
def test_loop_counter_indexes_are_moving_views(rng, reverse):
    """A counter carry (fori_loop's index from a nonzero start, or `i + 1` in a scan) is start +
    iteration: no carry tensor, and ws[i] / dynamic_slice at it is a view moving with the
    iteration (no run-time offset, no copy); its final value and the results equal jax.jit's."""

    def fn(ws, x):
        def body(c, _):
            i, h = c
            w = ws[i - 2]  # negative-index wrapping and clamping included
            blk = jax.lax.dynamic_slice(ws, (i - 2, 0, 0), (1, 8, 8))[0]
            return (i + 1, jnp.tanh(h @ w + h @ blk.T)), i * 2

        return jax.lax.scan(body, (jnp.int32(2), x), None, length=5, reverse=reverse)

    ws = (rng.standard_normal((5, 8, 8)) / 3).astype(np.float32)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    want = _leaves(jax.jit(fn)(ws, x))
    plan = ark.plan(fn, ws, x, platform="cpu")
    (loop,) = plan.loops
    body = plan.ops[loop.first_op : loop.end_op]
    programs = [list(op.prologue) + list(op.epilogue) for op in body]
    assert not [i for prog in programs for i in prog if i.op == "load_at"]
    assert not [op.name for op in body if op.B * op.M * op.N >= 8 * 8]  # no copy of ws[i]
    for workers in (1, 3):
        _compare(_leaves(jax.jit(ark.persistent(fn, num_workers=workers))(ws, x)), want, 2e-5)
    for g, r in zip(interpret(plan, ws, x), want, strict=True):
        assert_close(g.reshape(r.shape).astype(np.float32), r.astype(np.float32), 2e-5)
