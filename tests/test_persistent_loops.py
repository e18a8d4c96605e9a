"""Loops as plan constructs (plan v3): `lax.scan` / `fori_loop` with a static trip count are planned
once and their tasks re-run per iteration. Results equal jax.jit(fn) on fresh random inputs for
1..N workers, in chaos mode, and in the Python reference interpreter; the plan shows the loop.

The GPU variant at the end runs the same functions on the CUDA executor (marked gpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Plan, PlanError
from jax_ark._persistent._reference import interpret
from jax_ark._persistent._trace import UnsupportedError

D, F, LAYERS = 32, 64, 8


def _leaves(x):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]


def _check(fn, *args, tol=2e-5, workers=(None,), reference=True):
    """persistent(fn) under jit == jax.jit(fn) (integers exactly), for each worker count, and the
    reference interpreter too."""
    want = _leaves(jax.jit(fn)(*args))
    for w in workers:
        got = _leaves(jax.jit(ark.persistent(fn, num_workers=w))(*args))
        assert len(got) == len(want)
        for g, r in zip(got, want, strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            if r.dtype.kind in "iub" or r.size == 0:
                np.testing.assert_array_equal(g, r)
            else:
                assert_close(g, r, tol)
    if reference:
        plan = ark.plan(fn, *args, platform="cpu")
        flat = [np.asarray(a) for a in jax.tree_util.tree_leaves(args)]
        for g, r in zip(interpret(plan, *flat), want, strict=True):
            if r.size:
                assert_close(g.reshape(r.shape).astype(np.float32), r.astype(np.float32), tol)
    return want


# ---- models --------------------------------------------------------------------------------------
def _rms(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g


def mlp_stack(x, layers):
    """8 pre-norm residual MLP blocks via lax.scan over stacked weights."""

    def block(h, p):
        return h + jax.nn.gelu(_rms(h, p["g"]) @ p["w1"]) @ p["w2"], None

    return jax.lax.scan(block, x, layers)[0]


def transformer_stack(x, layers):
    """8 pre-norm transformer blocks (2-head causal self-attention + MLP) via lax.scan."""
    T, heads = x.shape[0], 2
    hd = x.shape[1] // heads
    mask = jnp.tril(jnp.ones((T, T), bool))

    def block(h, p):
        a = _rms(h, p["g1"])
        q = (a @ p["wq"]).reshape(T, heads, hd).transpose(1, 0, 2)
        k = (a @ p["wk"]).reshape(T, heads, hd).transpose(1, 0, 2)
        v = (a @ p["wv"]).reshape(T, heads, hd).transpose(1, 0, 2)
        s = jnp.einsum("htd,hsd->hts", q, k) / np.float32(np.sqrt(hd))
        s = jnp.where(mask[None], s, -jnp.inf)
        o = jnp.einsum("hts,hsd->htd", jax.nn.softmax(s, axis=-1), v)
        h = h + o.transpose(1, 0, 2).reshape(T, heads * hd) @ p["wo"]
        return h + jax.nn.silu(_rms(h, p["g2"]) @ p["w1"]) @ p["w2"], None

    return jax.lax.scan(block, x, layers)[0]


def _weights(rng, shapes, layers=LAYERS):
    out = {}
    for name, shape in shapes.items():
        if name.startswith("g"):
            out[name] = (1.0 + 0.1 * rng.standard_normal((layers, *shape))).astype(np.float32)
        else:
            out[name] = (rng.standard_normal((layers, *shape)) / np.sqrt(shape[0])).astype(
                np.float32
            )
    return out


def _mlp_args(rng, rows=4):
    x = rng.standard_normal((rows, D)).astype(np.float32)
    return x, _weights(rng, {"g": (D,), "w1": (D, F), "w2": (F, D)})


def _transformer_args(rng, T=8):
    x = rng.standard_normal((T, D)).astype(np.float32)
    shapes = {"g1": (D,), "g2": (D,), "w1": (D, F), "w2": (F, D)}
    shapes |= {w: (D, D) for w in ("wq", "wk", "wv", "wo")}
    return x, _weights(rng, shapes)


# ---- results -------------------------------------------------------------------------------------
def test_scan_mlp_8_layers_1_to_n_workers(rng):
    _check(mlp_stack, *_mlp_args(rng), workers=(1, 2, 3, 8))


def test_scan_prenorm_transformer_8_layers(rng):
    _check(transformer_stack, *_transformer_args(rng), tol=5e-5, workers=(1, 4))


def test_body_is_planned_once_not_unrolled(rng):
    x, w = _mlp_args(rng)
    plan8 = ark.plan(mlp_stack, x, w, platform="cpu", num_workers=2)
    w16 = {k: np.concatenate([v, v]) for k, v in w.items()}
    plan16 = ark.plan(mlp_stack, x, w16, platform="cpu", num_workers=2)
    assert len(plan8.tasks) == len(plan16.tasks) and len(plan8.ops) == len(plan16.ops)
    assert [lp.trip_count for lp in plan8.loops] == [8]
    assert [lp.trip_count for lp in plan16.loops] == [16]
    # stacked weights are read through views that move one layer per iteration
    strided = {v.iter_stride for v in plan8.views if v.iter_stride}
    assert strided >= {D * F, F * D, D}


def test_fori_loop_with_carry_and_loop_index(rng):
    """fori_loop (static bounds: jax lowers it to scan): the index selects a weight row
    (dynamic_slice on a device value) and the carry is a pair."""
    table = rng.standard_normal((10, 16)).astype(np.float32)
    a = (rng.standard_normal((16, 16)) / 4).astype(np.float32)

    def fn(x, y, table, a):
        def body(i, c):
            x, y = c
            row = jax.lax.dynamic_slice(table, (i, 0), (1, 16))
            x = jnp.tanh(x @ a + row)
            return x, y + x.sum() * (i + 1).astype(jnp.float32)

        return jax.lax.fori_loop(0, 7, body, (x, y))

    x = rng.standard_normal((3, 16)).astype(np.float32)
    _check(fn, x, np.float32(rng.standard_normal()), table, a, workers=(1, 3))


def test_integer_carry_is_exact(rng):
    def fn(x):
        def body(i, c):
            return c * 3 + (c >> 2) + i

        return jax.lax.fori_loop(0, 12, body, x)

    _check(fn, rng.integers(-1000, 1000, (5, 7)).astype(np.int32), workers=(1, 2))


def test_scan_emits_stacked_outputs(rng):
    """An RNN: ys (the hidden state per step and a per-step reduction) are stacked outputs, the
    inputs xs a scanned sequence."""
    wh = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    wx = (rng.standard_normal((8, 16)) / 3).astype(np.float32)

    def rnn(h0, xs, wh, wx):
        def step(h, x):
            h = jnp.tanh(h @ wh + x @ wx)
            return h, (h, jnp.max(h, axis=-1))

        return jax.lax.scan(step, h0, xs)

    h0 = rng.standard_normal((2, 16)).astype(np.float32)
    xs = rng.standard_normal((11, 2, 8)).astype(np.float32)
    _check(rnn, h0, xs, wh, wx, workers=(1, 2, 5))
    plan = ark.plan(rnn, h0, xs, wh, wx, platform="cpu")
    assert sum(op.stacked for op in plan.ops) == 2


def test_two_loops_and_work_between(rng):
    def fn(x, w1, w2):
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, w1)[0]
        h = h * 2.0 + 1.0
        h, ys = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), h.sum()), h, w2)
        return h.sum(axis=0), ys

    x = rng.standard_normal((4, 16)).astype(np.float32)
    w1 = (rng.standard_normal((3, 16, 16)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((5, 16, 16)) / 4).astype(np.float32)
    _check(fn, x, w1, w2, workers=(1, 2, 4))
    assert len(ark.plan(fn, x, w1, w2, platform="cpu").loops) == 2


def test_zero_and_one_trip(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    for n in (0, 1):
        w = rng.standard_normal((n, 4, 4)).astype(np.float32)
        _check(lambda x, w: jax.lax.scan(lambda h, w: (h @ w, h), x, w), x, w)


def test_chaos_mode_identical_results(rng, monkeypatch):
    """Chaos mode runs the plan 12 times in adversarial orders (with poisoned workspace) and fails
    on any difference: loop-carried and write-after-read dependencies are complete."""
    args = _transformer_args(rng)
    want = _leaves(jax.jit(transformer_stack)(*args))
    for seed in (1, 2):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        for w in (2, 5):
            got = _leaves(jax.jit(ark.persistent(transformer_stack, num_workers=w))(*args))
            assert_close(got[0], want[0], 5e-5)


def test_reference_interpreter_in_random_worker_orders(rng):
    x, w = _mlp_args(rng)
    want = np.asarray(jax.jit(mlp_stack)(x, w))
    plan = ark.plan(mlp_stack, x, w, platform="cpu", num_workers=3)
    flat = [x] + [np.asarray(v) for v in jax.tree_util.tree_leaves(w)]
    for seed in range(4):
        (got,) = interpret(plan, *flat, rng=np.random.default_rng(seed))
        assert_close(got, want, 2e-5)


# ---- models written by others ------------------------------------------------------------------
def test_flax_nnx_scan_over_layers(rng):
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.RMSNorm(D, rngs=rngs)
            self.up = nnx.Linear(D, F, rngs=rngs)
            self.down = nnx.Linear(F, D, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.gelu(self.up(self.norm(x))))

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(rngs)

    seed = int(rng.integers(1 << 30))
    layers = make(nnx.Rngs(seed))
    graphdef, state = nnx.split(layers)

    def fn(x, state):
        model = nnx.merge(graphdef, state)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(layer, x):
            return layer(x)

        return run(model, x)

    x = rng.standard_normal((4, D)).astype(np.float32)
    jaxpr = jax.make_jaxpr(fn)(x, state)
    assert "scan" in str(jaxpr)  # it traces to a scan, not to an unrolled body
    _check(fn, x, state, tol=5e-5, workers=(2,))


# ---- a greedy decode loop with a KV cache as ONE persistent call ---------------------------------
def _gpt_step(params, cache, token, pos):
    """One decode step of a small 2-layer GPT-style model (pre-norm attention + MLP per layer):
    token id -> embedding gather, K / V of each layer written into its cache at `pos`, causal
    attention over the filled prefix, logits through an unembedding, greedy next token."""
    x = params["embed"][token]  # (B, D)
    new_cache = []
    for layer, (kc, vc) in zip(params["layers"], cache, strict=True):
        h = _rms(x, layer["g1"])
        q, k, v = h @ layer["wq"], h @ layer["wk"], h @ layer["wv"]
        kc = jax.lax.dynamic_update_slice(kc, k[:, None, :], (0, pos, 0))
        vc = jax.lax.dynamic_update_slice(vc, v[:, None, :], (0, pos, 0))
        s = jnp.einsum("bd,btd->bt", q, kc) / np.float32(np.sqrt(q.shape[-1]))
        s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
        x = x + jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), vc) @ layer["wo"]
        x = x + jax.nn.gelu(_rms(x, layer["g2"]) @ layer["w1"]) @ layer["w2"]
        new_cache.append((kc, vc))
    logits = _rms(x, params["gf"]) @ params["unembed"]
    return jnp.argmax(logits, -1).astype(jnp.int32), new_cache


def generate_16(params, cache, token):
    """Greedy decoding of 16 tokens: a fori_loop around the decode step."""

    def body(pos, c):
        tok, cache, out = c
        tok, cache = _gpt_step(params, cache, tok, pos)
        return tok, cache, jax.lax.dynamic_update_slice(out, tok[:, None], (0, pos))

    out = jnp.zeros((token.shape[0], 16), jnp.int32)
    return jax.lax.fori_loop(0, 16, body, (token, cache, out))


def _gpt_args(rng, B=2, T=16, d=32, V=64, layers=2):
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    params = {
        "embed": rng.standard_normal((V, d)).astype(np.float32),
        "unembed": w(d, V) * 4,
        "gf": np.ones(d, np.float32),
        "layers": [
            {
                "g1": np.ones(d, np.float32),
                "g2": np.ones(d, np.float32),
                **{k: w(d, d) for k in ("wq", "wk", "wv", "wo")},
                "w1": w(d, 2 * d),
                "w2": w(2 * d, d),
            }
            for _ in range(layers)
        ],
    }
    cache = [(np.zeros((B, T, d), np.float32), np.zeros((B, T, d), np.float32))] * layers
    return params, cache, rng.integers(0, V, (B,)).astype(np.int32)


def test_greedy_decode_16_tokens_one_call(rng, monkeypatch):
    args = _gpt_args(rng)
    want = _check(generate_16, *args, tol=1e-4, workers=(1, 3))
    tokens = want[-1]
    assert tokens.shape == (2, 16) and len(np.unique(tokens)) > 2  # the model really decodes
    plan = ark.plan(generate_16, *args, platform="cpu")
    assert [lp.trip_count for lp in plan.loops] == [16]  # one loop, not 16 unrolled steps
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "3")
    got = _leaves(jax.jit(ark.persistent(generate_16, num_workers=4))(*args))
    np.testing.assert_array_equal(got[-1], tokens)


def generate_16_scanned_layers(params, layers, kcs, vcs, token):
    """The decode loop as users write it for deep models: the layers' weights and KV caches are
    stacked on a leading layer axis and the step runs them with an inner lax.scan, inside the
    token fori_loop (a nested loop: tokens x layers)."""

    def step(tok, kcs, vcs, pos):
        def layer(x, lw):
            w, kc, vc = lw
            h = _rms(x, w["g1"])
            q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
            kc = jax.lax.dynamic_update_slice(kc, k[:, None, :], (0, pos, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[:, None, :], (0, pos, 0))
            s = jnp.einsum("bd,btd->bt", q, kc) / np.float32(np.sqrt(q.shape[-1]))
            s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
            x = x + jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), vc) @ w["wo"]
            x = x + jax.nn.gelu(_rms(x, w["g2"]) @ w["w1"]) @ w["w2"]
            return x, (kc, vc)

        x, (kcs, vcs) = jax.lax.scan(layer, params["embed"][tok], (layers, kcs, vcs))
        logits = _rms(x, params["gf"]) @ params["unembed"]
        return jnp.argmax(logits, -1).astype(jnp.int32), kcs, vcs

    def body(pos, c):
        tok, kcs, vcs, out = c
        tok, kcs, vcs = step(tok, kcs, vcs, pos)
        return tok, kcs, vcs, jax.lax.dynamic_update_slice(out, tok[:, None], (0, pos))

    out = jnp.zeros((token.shape[0], 16), jnp.int32)
    return jax.lax.fori_loop(0, 16, body, (token, kcs, vcs, out))


def test_decode_tokens_x_scanned_layers_one_call(rng, monkeypatch):
    """16 greedy tokens x 3 layers as an inner scan: ONE persistent call, a nested loop, the
    tokens and caches equal to jax.jit's."""
    params, cache, token = _gpt_args(rng, layers=3)
    layers = jax.tree_util.tree_map(lambda *ws: np.stack(ws), *params.pop("layers"))
    kcs, vcs = (np.stack([c[k] for c in cache]) for k in (0, 1))
    kcs = rng.standard_normal(kcs.shape).astype(np.float32)  # not zeros: masked entries are read
    vcs = rng.standard_normal(vcs.shape).astype(np.float32)
    args = (params, layers, kcs, vcs, token)
    want = _check(generate_16_scanned_layers, *args, tol=1e-4, workers=(1, 3))
    tokens = want[-1]
    assert len(np.unique(tokens)) > 2  # the model really decodes
    plan = ark.plan(generate_16_scanned_layers, *args, platform="cpu")
    assert [(lp.trip_count, lp.parent) for lp in plan.loops] == [(16, -1), (3, 0)]
    plan.validate()
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "3")
    got = _leaves(jax.jit(ark.persistent(generate_16_scanned_layers, num_workers=4))(*args))
    np.testing.assert_array_equal(got[-1], tokens)


def test_kv_cache_carried_through_fori_loop_is_updated_in_place(rng):
    """A KV cache carried through a fori_loop and updated with dynamic_update_slice each step is
    ONE tensor, the result aliased to the cache input: per iteration one window-store task writes
    the step's row; no op of the cache's size runs inside the loop (no carry-in copy, no
    whole-cache write), and the results equal jax.jit's, with and without donation."""
    B, T, d = 2, 16, 8

    def decode(w, cache, x):
        def body(pos, c):
            cache, h = c
            cache = jax.lax.dynamic_update_slice(cache, jnp.tanh(h @ w)[:, None, :], (0, pos, 0))
            s = jnp.einsum("bd,btd->bt", h, cache)
            s = jnp.where(jnp.arange(T)[None, :] <= pos, s, -jnp.inf)
            return cache, h + jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), cache)

        return jax.lax.fori_loop(0, T, body, (cache, x))

    w = (rng.standard_normal((d, d)) / 3).astype(np.float32)
    cache = rng.standard_normal((B, T, d)).astype(np.float32)
    x = rng.standard_normal((B, d)).astype(np.float32)
    _check(decode, w, cache, x, tol=1e-4, workers=(1, 3))
    plan = ark.plan(decode, w, cache, x, platform="cpu")
    (loop,) = plan.loops
    state = plan.outputs[0]
    assert plan.tensors[state].storage == "result" and plan.tensors[state].alias == 1
    body = plan.ops[loop.first_op : loop.end_op]
    assert not [op.name for op in body if op.B * op.M * op.N >= B * T * d]  # no cache-sized op
    (store,) = [op for op in body if op.out == state]
    assert store.store_view >= 0 and store.B * store.M * store.N == B * d  # one row per step
    plan.validate()
    want = _leaves(jax.jit(decode)(w, cache, x))
    donated = jax.jit(ark.persistent(decode), donate_argnums=1)
    got = _leaves(donated(w, jnp.asarray(cache), x))
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, 1e-4)


def test_in_place_carry_chaos(rng, monkeypatch):
    def fn(cache, xs):
        def body(c, x):
            i, cache = c
            cache = jax.lax.dynamic_update_slice(cache, x[None], (i, 0))
            return (i + 1, cache), cache.sum()

        return jax.lax.scan(body, (jnp.int32(0), cache), xs)

    cache = rng.standard_normal((6, 4)).astype(np.float32)
    xs = rng.standard_normal((6, 4)).astype(np.float32)
    _check(fn, cache, xs, workers=(1, 2))
    plan = ark.plan(fn, cache, xs, platform="cpu")
    assert any(op.store_view >= 0 and op.loop == 0 for op in plan.ops)
    _chaos_check(fn, cache, xs, monkeypatch=monkeypatch)


@pytest.mark.parametrize("read", [False, True])
def test_tiled_matmul_store_in_a_loop_with_overlapping_windows(rng, monkeypatch, read):
    """On CPU a product stored into the carried buffer is a matmul window store of several tiles:
    each iteration's window overlaps the one before (a tile waits for every other tile's previous
    run); with `read`, the buffer is also read after the store in the same iteration (the read
    waits for every tile; the next iteration's tiles wait for the read)."""

    def fn(xs, w, buf):
        def body(i, c):
            buf, acc = c
            prod = jnp.tanh(jax.lax.dynamic_slice_in_dim(xs, i * 64, 64) @ w)
            buf = jax.lax.dynamic_update_slice(buf, prod, (i * 8, 0))
            return buf, (acc + buf[:96].sum(axis=0)) if read else acc + i

        return jax.lax.fori_loop(0, 5, body, (buf, jnp.zeros(buf.shape[1], buf.dtype)))

    xs = rng.standard_normal((320, 32)).astype(np.float32)
    w = (rng.standard_normal((32, 128)) / 4).astype(np.float32)
    buf = rng.standard_normal((136, 128)).astype(np.float32)
    plan = ark.plan(fn, xs, w, buf, num_workers=3, platform="cpu")
    (store,) = [i for i, op in enumerate(plan.ops) if op.store_view >= 0]
    assert plan.ops[store].kind == "matmul" and plan.ops[store].loop == 0
    tiles = [t for t, task in enumerate(plan.tasks) if task.op == store]
    assert len(tiles) > 1
    assert all(set(tiles) - {t} <= set(plan.tasks[t].deps) for t in tiles)
    _check(fn, xs, w, buf, tol=1e-4, workers=(1, 2, 3))
    _chaos_check(fn, xs, w, buf, monkeypatch=monkeypatch, tol=1e-4)


def test_tiles_of_a_loop_store_wait_for_each_others_previous_run(rng, monkeypatch):
    """The window moves by half a tile per iteration, its start computed inside the store's
    program (no op between two runs of the store): a tile's window overlaps the other tile's
    window of the iteration before, and only their carried dependencies order the two."""

    def fn(xs, w, buf):
        def body(i, buf):
            prod = jnp.tanh(jax.lax.dynamic_slice_in_dim(xs, i * 2, 2) @ w)
            return jax.lax.dynamic_update_slice(buf, prod, (0, i * 32))

        return jax.lax.fori_loop(0, 6, body, buf)

    xs = rng.standard_normal((12, 32)).astype(np.float32)
    w = (rng.standard_normal((32, 128)) / 4).astype(np.float32)
    buf = rng.standard_normal((2, 320)).astype(np.float32)
    plan = ark.plan(fn, xs, w, buf, num_workers=2, platform="cpu")
    assert [op.kind for op in plan.ops] == ["matmul"]  # the store alone in the loop
    assert len(plan.tasks) == 2 and all(task.deps == [1 - t] for t, task in enumerate(plan.tasks))
    _check(fn, xs, w, buf, tol=1e-5, workers=(1, 2))
    want = _leaves(jax.jit(fn)(xs, w, buf))
    for seed in range(1, 9):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        got = _leaves(run_plan(plan, [xs, w, buf])[0])
        assert_close(got[0], want[0], 1e-5)


# ---- the plan shows the loop ---------------------------------------------------------------------
def test_plan_json_and_summary_show_the_loop(rng):
    x, w = _mlp_args(rng)
    plan = ark.plan(mlp_stack, x, w, platform="cpu", num_workers=2)
    d = plan.to_dict()
    assert d["version"] == 3
    (loop,) = d["loops"]
    assert loop["trip_count"] == LAYERS and loop["first_op"] < loop["end_op"]
    assert "test_persistent_loops.py" in loop["source"]
    body = [op for op in d["ops"] if op["loop"] == 0]
    assert len(body) == loop["end_op"] - loop["first_op"]
    assert any(v.get("iter_stride") for v in d["views"])
    summary = plan.summary()
    assert f"loop 0: ops {loop['first_op']}..{loop['end_op'] - 1} run {LAYERS} times" in summary
    back = Plan.from_json(plan.to_json())
    back.validate()
    got = jax.jit(ark.persistent(mlp_stack, plan=back))(x, w)
    assert_close(got, jax.jit(mlp_stack)(x, w), 2e-5)


def _loop_plan(rng):
    x, w = _mlp_args(rng)
    return ark.plan(mlp_stack, x, w, platform="cpu", num_workers=2), (x, w)


def test_missing_carried_dependency_is_found_by_validate(rng):
    """A carry's writer moved to another worker still runs before the next iteration's carry-in
    (its dependency on the previous iteration); without that dependency validate() reports it."""
    x, w = _mlp_args(rng)
    plan = ark.plan(mlp_stack, x, w, platform="cpu", num_workers=4, tile_m=2, tile_n=8)
    first, last = plan.loops[0].first_op, plan.loops[0].end_op - 1
    carry_in = next(t for t, task in enumerate(plan.tasks) if task.op == first)
    writer = next(d for d in plan.tasks[carry_in].deps if plan.tasks[d].op == last)
    assert plan.carried(carry_in, writer)
    home = next(q for q in plan.queues if writer in q)
    other = next(q for q in plan.queues if writer not in q and carry_in not in q)
    home.remove(writer)
    other.append(writer)  # the last op of the loop: still the end of that worker's segment
    plan.validate()
    got = jax.jit(ark.persistent(mlp_stack, plan=plan))(x, w)
    assert_close(got, jax.jit(mlp_stack)(x, w), 2e-5)
    plan.tasks[carry_in].deps.remove(writer)
    with pytest.raises(PlanError, match="previous iteration.*missing dependency"):
        plan.validate()


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d["loops"][0].update(trip_count=0), r"trip_count"),
        (lambda d: d["loops"][0].update(trip_count=(1 << 24) + 1), r"trip_count"),
        (lambda d: d["ops"][0].update(loop=-1), r"loop"),
        (lambda d: d.update(version=2), r"version 3"),
        (lambda d: d["views"][-1].update(iter_stride=-4), r"iter_stride|negative"),
    ],
)
def test_malformed_loop_fields_refused(rng, edit, pattern):
    plan, _ = _loop_plan(rng)
    d = plan.to_dict()
    edit(d)
    with pytest.raises(PlanError, match=pattern):
        Plan.from_json(d).validate()


def test_iteration_stride_past_the_tensor_refused_by_both_checkers(rng):
    """A view whose LAST iteration reads past its tensor: Python's validate and the runtime's
    check_plan (given the plan without validate) both refuse it before anything runs."""
    plan, (x, w) = _loop_plan(rng)
    v = next(i for i, view in enumerate(plan.views) if view.iter_stride)
    view = plan.views[v]
    plan.views[v] = type(view)(view.tensor, view.offset, view.strides, view.iter_stride * 2)
    with pytest.raises(PlanError, match="reads element"):
        plan.validate()
    flat = [x] + [np.asarray(v) for v in jax.tree_util.tree_leaves(w)]
    with pytest.raises(Exception, match="reads outside tensor") as e:
        jax.block_until_ready(run_plan(plan, flat, timeout_ms=5000)[0])
    assert "INVALID_ARGUMENT" in str(e.value)


def _flat(args):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(args)]


def test_edited_nested_and_while_plans_refused_by_both_checkers(rng):
    """Nested / reversed / while loop fields edited out of shape: Python's validate and the
    runtime's check_plan (given the plan without validate) both refuse them before anything runs."""
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = (rng.standard_normal((3, 4, 8, 8)) / 3).astype(np.float32)
    u = rng.standard_normal((3, 8)).astype(np.float32)
    base = ark.plan(layers_x_microsteps, x, w, u, platform="cpu")

    def refused(edit, py, rt):
        p = base.copy()
        edit(p)
        with pytest.raises(PlanError, match=py):
            p.validate()
        with pytest.raises(Exception, match=rt):
            jax.block_until_ready(run_plan(p, [x, w, u], timeout_ms=5000)[0])

    def outside_parent(p):  # the outer loop ends inside the inner one
        p.loops[0].end_op = p.loops[1].end_op - 1

    refused(outside_parent, "not inside", "not inside")
    v = next(i for i, view in enumerate(base.views) if view.outer_iter_stride)

    def far_outer(p):
        view = p.views[v]
        p.views[v] = type(view)(
            view.tensor, view.offset, view.strides, view.iter_stride, view.outer_iter_stride * 4
        )

    refused(far_outer, "reads element", "reads outside tensor")

    def backwards_from_zero(p):  # a reversed walk that starts at the first slice: below 0
        view = p.views[v]
        p.views[v] = type(view)(
            view.tensor, 0, view.strides, -abs(view.iter_stride), view.outer_iter_stride
        )

    refused(backwards_from_zero, "below 0|reads element", "reads outside tensor")
    a = np.abs(rng.standard_normal((3, 8))).astype(np.float32) + 0.5
    wplan = ark.plan(newton_sqrt, a, np.float32(1e-3), platform="cpu", max_while_iterations=8)
    (loop,) = wplan.loops
    p = wplan.copy()
    p.loops[0].pred_op = loop.first_op  # the carry-in op: not a stacked bool predicate
    with pytest.raises(PlanError, match="stacked bool"):
        p.validate()
    with pytest.raises(Exception, match="stacked bool"):
        jax.block_until_ready(run_plan(p, [a, np.float32(1e-3)], timeout_ms=5000)[0])


def test_queue_that_runs_a_loop_task_after_later_work_refused(rng):
    def fn(x, w):
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, w)[0]
        return h + 1.0

    x = rng.standard_normal((4, 16)).astype(np.float32)
    w = (rng.standard_normal((3, 16, 16)) / 4).astype(np.float32)
    plan = ark.plan(fn, x, w, platform="cpu", num_workers=1)
    q = plan.queues[0]
    q[-1], q[-2] = q[-2], q[-1]  # the op after the loop before the loop's last task
    with pytest.raises(PlanError, match="later stage|deadlock"):
        plan.validate()


# ---- what is not supported yet names itself ------------------------------------------------------
def test_while_loop_inside_scan_refused_with_line(rng):
    def fn(x):
        def body(h, _):
            return jax.lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c * 2.0, h), None

        return jax.lax.scan(body, x, None, length=2)[0]

    x = rng.standard_normal((3,)).astype(np.float32) + 1.0
    with pytest.raises(UnsupportedError, match=r"while_loop.*test_persistent_loops.py:\d+"):
        jax.jit(ark.persistent(fn))(x)


def test_cond_and_switch_on_device_predicates(rng):
    """cond / switch: every branch is planned and the device index selects (exact for pure
    functions, including a branch that would divide by zero)."""

    def fn(x, i, w):
        a = jax.lax.cond(x.sum() > 0, lambda x: x @ w, lambda x: jnp.log(x) / 0.0, x)
        b = jax.lax.switch(i, [lambda x: x * 2.0, lambda x: jnp.tanh(x @ w), jnp.sin], x)
        return a, b

    w = (rng.standard_normal((4, 4)) / 2).astype(np.float32)
    for sign in (1.0, -1.0):
        x = (sign * np.abs(rng.standard_normal((3, 4)))).astype(np.float32)
        for i in (-3, 0, 1, 2, 7):  # switch clamps its index
            _check(fn, x, np.int32(i), w, workers=(1, 2))


def test_cond_inside_a_scan_body(rng):
    def fn(x, ws):
        def body(c, w):
            h, i = c
            h = jax.lax.cond(i % 2 == 0, lambda h: jnp.tanh(h @ w), lambda h: h @ w.T * 0.5, h)
            return (h, i + 1), None

        return jax.lax.scan(body, (x, jnp.int32(0)), ws)[0][0]

    x = rng.standard_normal((3, 8)).astype(np.float32)
    ws = (rng.standard_normal((5, 8, 8)) / 3).astype(np.float32)
    _check(fn, x, ws, workers=(1, 3))


# ---- reverse and nested loops ----------------------------------------------------------------
def _chaos_check(fn, *args, tol=2e-5, monkeypatch=None):
    """persistent(fn) in chaos mode (adversarial orders, races detected) == jax.jit(fn)."""
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "7")
    want = _leaves(jax.jit(fn)(*args))
    got = _leaves(jax.jit(ark.persistent(fn, num_workers=3))(*args))
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, tol)


def reverse_rnn(x, ws, us):
    """scan(reverse=True): xs read from the last slice back, ys stored from the last slice back."""

    def body(h, wu):
        w, u = wu
        h = jnp.tanh(h @ w + u)
        return h, (h.sum(axis=-1), h * 2.0)

    return jax.lax.scan(body, x, (ws, us), reverse=True)


def test_reverse_scan_matches_jit(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ws = (rng.standard_normal((5, 8, 8)) / 3).astype(np.float32)
    us = rng.standard_normal((5, 3, 8)).astype(np.float32)
    _check(reverse_rnn, x, ws, us, workers=(1, 2, 4))
    plan = ark.plan(reverse_rnn, x, ws, us, platform="cpu")
    assert len(plan.loops) == 1
    assert any(v.iter_stride < 0 for v in plan.views)  # the xs views walk backwards
    assert sum(op.stack_reversed for op in plan.ops) == 2  # ys stored from the last slice back
    plan.validate()


def test_reverse_cumulative_scan_exact_int(rng):
    """Integer carries and ys through a reversed scan: exact."""

    def fn(xs):
        return jax.lax.scan(
            lambda c, x: (c * 3 + x, c ^ x), jnp.ones(4, jnp.int32), xs, reverse=True
        )

    xs = rng.integers(-1000, 1000, size=(9, 4)).astype(np.int32)
    _check(fn, xs, workers=(1, 3))


def test_scan_passes_an_integer_carry_through(rng):
    """A carry and a ys that are the body's inputs unchanged (int32 and float): copied with the
    integer move for int32 (validate() refuses a float copy of integer bits)."""

    def fn(k, h, xs):
        return jax.lax.scan(lambda c, x: ((c[0], c[1] * 0.5 + x), (c[0], x)), (k, h), xs)

    k = rng.integers(-99, 99, (3,)).astype(np.int32)
    h = rng.standard_normal((3,)).astype(np.float32)
    xs = rng.standard_normal((4, 3)).astype(np.float32)
    _check(fn, k, h, xs, workers=(1, 2))
    ark.plan(fn, k, h, xs, platform="cpu").validate()


def layers_x_microsteps(x, w, u):
    """An outer scan over layers whose body runs an inner scan over microsteps (xs of both: w is
    [layers, steps, d, d], u is [layers, d]), with a carry of each loop and ys of each."""

    def layer(h, wl_ul):
        wl, ul = wl_ul

        def step(g, ws):
            g = jnp.tanh(g @ ws + ul)
            return g, g.mean()

        g, means = jax.lax.scan(step, h * 0.5, wl)
        return h + g, means

    return jax.lax.scan(layer, x, (w, u))


def test_nested_scan_matches_jit(rng):
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = (rng.standard_normal((3, 4, 8, 8)) / 3).astype(np.float32)
    u = rng.standard_normal((3, 8)).astype(np.float32)
    _check(layers_x_microsteps, x, w, u, workers=(1, 2, 3))
    plan = ark.plan(layers_x_microsteps, x, w, u, platform="cpu")
    assert len(plan.loops) == 2
    outer, inner = plan.loops
    assert inner.parent == 0 and outer.parent == -1
    assert outer.first_op <= inner.first_op < inner.end_op <= outer.end_op
    # the inner body reads w[j, i] through a view moving with both loops, planned once
    assert any(v.iter_stride and v.outer_iter_stride for v in plan.views)
    plan.validate()
    assert "inside loop 0" in plan.summary()


def test_nested_scan_chaos(rng, monkeypatch):
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = (rng.standard_normal((3, 4, 8, 8)) / 3).astype(np.float32)
    u = rng.standard_normal((3, 8)).astype(np.float32)
    _chaos_check(layers_x_microsteps, x, w, u, monkeypatch=monkeypatch)


def test_nested_fori_loops_reverse_inner(rng):
    """fori_loop around a reversed scan: the inner scan's xs are a constant of the outer body."""

    def fn(x, ws):
        def outer(i, h):
            def inner(g, w):
                return jnp.tanh(g @ w) + i.astype(jnp.float32) * 0.01, g[0]

            g, ys = jax.lax.scan(inner, h, ws, reverse=True)
            return g + ys.sum(axis=0) * 0.1

        return jax.lax.fori_loop(0, 3, outer, x)

    x = rng.standard_normal((2, 8)).astype(np.float32)
    ws = (rng.standard_normal((4, 8, 8)) / 3).astype(np.float32)
    _check(fn, x, ws, workers=(1, 2))


def test_three_nested_loops_refused(rng):
    def fn(x, w):
        def l1(h, a):
            def l2(g, b):
                return jax.lax.scan(lambda k, c: (k @ c, None), g, b)[0], None

            return jax.lax.scan(l2, h, a)[0], None

        return jax.lax.scan(l1, x, w)[0]

    x = rng.standard_normal((2, 4)).astype(np.float32)
    w = rng.standard_normal((2, 2, 2, 4, 4)).astype(np.float32)
    with pytest.raises(UnsupportedError, match="nested more than 2 loops deep"):
        ark.plan(fn, x, w, platform="cpu")


# ---- while_loop: the predicate is computed on the device ----------------------------------------
def newton_sqrt(a, tol):
    """Until convergence: Newton steps for sqrt(a) while any element moved more than tol, with a
    step counter (an int carry) in the predicate too."""

    def cond(c):
        x, prev, k = c
        return (jnp.max(jnp.abs(x - prev)) > tol) & (k < 50)

    def body(c):
        x, _, k = c
        return 0.5 * (x + a / x), x, k + 1

    return jax.lax.while_loop(cond, body, (a + 1.0, jnp.zeros_like(a), jnp.int32(0)))


def test_while_loop_until_convergence(rng):
    a = rng.uniform(0.5, 50.0, (3, 8)).astype(np.float32)
    steps = []
    for tol in (np.float32(1e-3), np.float32(1.0), np.float32(1e9)):  # many, few, no body runs
        steps.append(int(_check(newton_sqrt, a, tol, workers=(1, 2, 4))[-1]))
    assert steps[0] > steps[1] > steps[2] == 0
    plan = ark.plan(newton_sqrt, a, np.float32(1e-3), platform="cpu")
    (loop,) = plan.loops
    assert loop.pred_op >= 0 and loop.trip_count == 65537  # the default guard + the final check
    pred = plan.ops[loop.pred_op]
    assert pred.stacked and plan.tensors[pred.out].dtype == "bool"
    plan.validate()
    assert "while op" in plan.summary()
    back = Plan.from_json(plan.to_json())
    back.validate()
    assert back.loops[0].pred_op == loop.pred_op


def test_vmapped_while_loop_keeps_each_elements_carry(rng):
    """jax.vmap of a while_loop (a Newton solve per element, each converging in its own number
    of steps) binds a while with a predicate per batch element: the loop runs while any holds,
    and a converged element keeps its carry. It planned once into a loop whose predicate was not
    a scalar, which the runtime's plan check refused."""

    def per_element(a, tol):
        def body(c):
            x, n = c
            return 0.5 * (x + a / x), n + 1

        return jax.lax.while_loop(lambda c: jnp.abs(c[0] * c[0] - a) > tol * a, body, (a, 0))

    fn = jax.vmap(jax.vmap(per_element, in_axes=(0, None)), in_axes=(0, None))
    a = rng.uniform(0.01, 1e4, (3, 7)).astype(np.float32)
    roots, steps = _check(fn, a, np.float32(1e-5), workers=(1, 3))
    assert len(np.unique(np.asarray(steps))) > 1  # elements stopped at different steps


def test_while_loop_fori_with_traced_bounds(rng):
    """fori_loop with a trip count read from a device value lowers to while_loop."""

    def fn(x, n):
        return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h * 1.5) + i.astype(h.dtype), x)

    x = rng.standard_normal((4, 8)).astype(np.float32)
    for n in (0, 1, 7):
        _check(fn, x, np.int32(n), workers=(1, 3))


def test_while_loop_chaos(rng, monkeypatch):
    a = rng.uniform(0.5, 50.0, (3, 8)).astype(np.float32)
    _chaos_check(newton_sqrt, a, np.float32(1e-3), monkeypatch=monkeypatch)


def test_while_loop_guard_is_an_error_not_a_hang(rng):
    def fn(x):
        return jax.lax.while_loop(lambda c: c[1] < 1000, lambda c: (c[0] * 0.5, c[1] + 1), (x, 0))

    x = rng.standard_normal((4,)).astype(np.float32)
    with pytest.raises(Exception, match="did not end within 10 iterations"):
        jax.block_until_ready(jax.jit(ark.persistent(fn, max_while_iterations=10))(x))
    plan = ark.plan(fn, x, platform="cpu", max_while_iterations=10)
    with pytest.raises(PlanError, match="did not end within 10 iterations"):
        interpret(plan, x)
    got = jax.jit(ark.persistent(fn, max_while_iterations=1000))(x)  # exactly the guard: fine
    assert int(got[1]) == 1000
    with pytest.raises(PlanError, match="max_while_iterations"):
        ark.persistent(fn, max_while_iterations=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_while_loops_in_untaken_cond_branches_run_no_iteration(rng, sign):
    """Every cond branch is planned; a while loop in the branch not taken must not run: here its
    carries would loop forever (doubling a negative number until it reaches 100), and before,
    the call failed on the while guard where jax.jit returns the other branch's value. Also a
    switch whose branch holds a cond holding a while loop (guards combine), and an index out of
    range (clamped, as XLA clamps it)."""
    x = (np.abs(rng.standard_normal((3,))) * sign).astype(np.float32)

    def doubling(v):
        return jax.lax.while_loop(lambda u: u[0] < 100.0, lambda u: u * 2.0, v)

    def fn(x, i):
        nested = lambda v: jax.lax.cond(v[0] > 0, doubling, lambda w: w + 1.0, v)  # noqa: E731
        counting = lambda v: jax.lax.while_loop(lambda u: u[0] > -50.0, lambda u: u - 7.0, v)  # noqa: E731
        return (
            jax.lax.cond(x[0] > 0, doubling, lambda v: v - 1.0, x),
            jax.lax.switch(i, [lambda v: v * 3.0, nested, counting], x),
        )

    for i in (0, 1, 2, 7):
        got = jax.jit(ark.persistent(fn, max_while_iterations=200))(x, np.int32(i))
        for g, w in zip(got, jax.jit(fn)(x, np.int32(i)), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        plan = ark.plan(fn, x, np.int32(i), platform="cpu", max_while_iterations=200)
        for g, w in zip(interpret(plan, x, np.int32(i)), jax.jit(fn)(x, np.int32(i)), strict=True):
            np.testing.assert_array_equal(g.reshape(w.shape), np.asarray(w))


def test_while_loop_inside_a_loop_refused(rng):
    def fn(x):
        def body(h, _):
            return jax.lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c * 2.0, h), None

        return jax.lax.scan(body, x, None, length=3)[0]

    x = np.abs(rng.standard_normal((4,))).astype(np.float32) + 0.1
    with pytest.raises(UnsupportedError, match="while_loop inside a loop body"):
        ark.plan(fn, x, platform="cpu")


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_scan_models_match_jit(rng):
    gpu = jax.devices("gpu")[0]
    for fn, args, tol in (
        (mlp_stack, _mlp_args(rng), 2e-4),
        (transformer_stack, _transformer_args(rng), 5e-4),
    ):
        args = jax.device_put(args, gpu)
        with jax.default_matmul_precision("highest"):
            want = _leaves(jax.jit(fn)(*args))
        got = _leaves(jax.jit(ark.persistent(fn))(*args))
        assert_close(got[0], want[0], tol)


@pytest.mark.gpu
def test_gpu_reverse_nested_while_and_in_place_loops_match_jit(rng):
    """The CUDA executor's loop extensions (compiled here, run only where a GPU is lent): a
    reversed scan, a nested scan, a while loop with a device predicate, an in-place carry."""
    gpu = jax.devices("gpu")[0]
    x = rng.standard_normal((3, 8)).astype(np.float32)

    def in_place(cache, xs):
        def body(c, v):
            i, cache = c
            cache = jax.lax.dynamic_update_slice(cache, v[None], (i, 0))
            return (i + 1, cache), cache.sum()

        return jax.lax.scan(body, (jnp.int32(0), cache), xs)

    cases = (
        (reverse_rnn, (x, (rng.standard_normal((5, 8, 8)) / 3).astype(np.float32),
                       rng.standard_normal((5, 3, 8)).astype(np.float32))),
        (layers_x_microsteps, (x[:2], (rng.standard_normal((3, 4, 8, 8)) / 3).astype(np.float32),
                               rng.standard_normal((3, 8)).astype(np.float32))),
        (newton_sqrt, (np.abs(x) + 0.5, np.float32(1e-3))),
        (in_place, (rng.standard_normal((6, 4)).astype(np.float32),
                    rng.standard_normal((6, 4)).astype(np.float32))),
    )  # fmt: skip
    for fn, args in cases:
        args = jax.device_put(args, gpu)
        with jax.default_matmul_precision("highest"):
            want = _leaves(jax.jit(fn)(*args))
        got = _leaves(jax.jit(ark.persistent(fn))(*args))
        for g, r in zip(got, want, strict=True):
            if r.dtype.kind in "iub":
                np.testing.assert_array_equal(g, r)
            else:
                assert_close(g, r, 5e-4)
