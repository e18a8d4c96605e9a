"""ark.persistent with integer and boolean tensors (plan v2), zero-size dims, and models written by
others (flax nnx, equinox): results equal jax.jit(fn), integers exactly, and the Python reference
interpreter agrees with the CPU executor.

The GPU variants at the end run the same functions on the CUDA executor (marked gpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._reference import interpret
from jax_ark._persistent._trace import UnsupportedError

I32 = st.integers(-(2**31), 2**31 - 1)
U32 = st.integers(0, 2**32 - 1)
# A few fixed shapes (values are fresh each example): jax.jit compiles each signature once.
SHAPES = st.sampled_from([(7,), (3, 5), (2, 3, 4)])
FAST = settings(max_examples=8, deadline=None, database=None)


def _exact_or_close(got, want, tol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want)
        return
    got, want = got.astype(np.float32), want.astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])  # inf / nan where jax has them
    if finite.any():
        assert_close(got[finite], want[finite], tol)


def _check(fn, *args, tol=1e-5, reference=True):
    """persistent(fn) under jit == jax.jit(fn), and the reference interpreter == jax.jit(fn)."""
    want = jax.tree_util.tree_leaves(jax.jit(fn)(*args))
    got = jax.tree_util.tree_leaves(jax.jit(ark.persistent(fn))(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        _exact_or_close(g, w, tol)
    if reference:
        plan = ark.plan(fn, *args, platform="cpu")
        flat = [np.asarray(a) for a in jax.tree_util.tree_leaves(args)]
        for r, w in zip(interpret(plan, *flat), want, strict=True):
            _exact_or_close(r.reshape(np.shape(w)), w, tol)


# ---- integer arithmetic with XLA's edge cases (division by 0, INT_MIN / -1, shifts >= 32) ----
def _int_ops(a, b):
    return (
        a + b,
        a - b,
        a * b,
        jax.lax.div(a, b),
        jax.lax.rem(a, b),
        a // b,
        a % b,
        -a,
        jnp.abs(a),
        jnp.sign(a),
        a**2,
        jnp.maximum(a, b),
        jnp.minimum(a, b),
        a & b,
        a | b,
        a ^ b,
        ~a,
        jax.lax.shift_left(a, b),
        jax.lax.shift_right_arithmetic(a, b),
        jax.lax.shift_right_logical(a, b),
        jax.lax.clamp(jnp.int32(-1000), a, jnp.int32(1000)) if a.dtype == jnp.int32 else a,
    )


def _cmp_ops(a, b):
    return (a == b, a != b, a < b, a <= b, a > b, a >= b, (a < b) & (a != 0), (a > b) | ~(a == b))


@FAST
@given(data=st.data(), shape=SHAPES)
def test_int32_ops_match_jit(data, shape):
    a = data.draw(hnp.arrays(np.int32, shape, elements=I32))
    # small values, zeros and -1 often: the divisors and shift amounts XLA special-cases
    b = data.draw(hnp.arrays(np.int32, shape, elements=st.one_of(st.integers(-40, 40), I32)))
    _check(_int_ops, a, b)
    _check(_cmp_ops, a, b)


@FAST
@given(data=st.data(), shape=SHAPES)
def test_uint32_ops_match_jit(data, shape):
    a = data.draw(hnp.arrays(np.uint32, shape, elements=U32))
    b = data.draw(hnp.arrays(np.uint32, shape, elements=st.one_of(st.integers(0, 40), U32)))
    _check(_int_ops, a, b)
    _check(_cmp_ops, a, b)


def _conversions(x, i, u):
    return (
        x.astype(jnp.int32),
        x.astype(jnp.uint32),
        x.astype(jnp.bfloat16).astype(jnp.int32),
        i.astype(jnp.float32),
        u.astype(jnp.float32),
        i.astype(jnp.uint32),
        u.astype(jnp.int32),
        i.astype(jnp.bool_),
        (x > 0).astype(jnp.int32),
        (i > 0).astype(jnp.float32) + x,  # (not * x: XLA rewrites 0 * inf to 0)
        jnp.where(i > 0, i, u.astype(jnp.int32)),
        jax.lax.select_n(jnp.clip(i, 0, 2), i, -i, i * 2),
        (i % 1024).astype(jnp.bfloat16),  # small integers: exact in bfloat16
    )


@FAST
@given(data=st.data(), shape=SHAPES)
def test_conversions_match_jit(data, shape):
    x = data.draw(
        hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_subnormal=False))
    )
    i = data.draw(hnp.arrays(np.int32, shape, elements=I32))
    u = data.draw(hnp.arrays(np.uint32, shape, elements=U32))
    _check(_conversions, x, i, u)


def _reductions(x, i, u):
    return (
        i.sum(-1),
        i.max(0),
        i.min(-1),
        u.max(-1),
        u.min(0),
        jnp.argmax(x, -1),
        jnp.argmin(x, 0),
        jnp.argmax(i, 0),
        jnp.argmin(i, -1),
        (x > 0).all(-1),
        (i > 0).any(0),
        jnp.cumsum(i, -1),
        jnp.cumsum(i, 0, dtype=jnp.int32),
        jax.lax.cumsum(x, axis=x.ndim - 1, reverse=True),
        x.min(-1),
    )


@FAST
@given(data=st.data(), shape=SHAPES)
def test_reductions_match_jit(data, shape):
    # few distinct values: ties, where argmax must pick the first
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([-1.5, 0.0, 2.0, 7.25])))
    i = data.draw(hnp.arrays(np.int32, shape, elements=st.one_of(st.integers(-3, 3), I32)))
    u = data.draw(hnp.arrays(np.uint32, shape, elements=U32))
    _check(_reductions, x, i, u, tol=1e-5)


def test_argmax_nan_and_ties_as_xla():
    x = np.array([[1.0, np.nan, 3.0, np.nan], [2.0, 2.0, -1.0, 2.0], [-np.inf] * 4], np.float32)
    _check(lambda x: (jnp.argmax(x, 1), jnp.argmin(x, 1), jnp.argmax(x, 0)), x)


def test_iota_and_causal_mask(rng):
    x = rng.standard_normal((2, 6, 6)).astype(np.float32)

    def masked_softmax(x):
        q = jnp.arange(6)[:, None]
        k = jnp.arange(6)[None, :]
        return jax.nn.softmax(jnp.where(k <= q, x, -jnp.inf), axis=-1), jnp.arange(12.0)

    _check(masked_softmax, x)


# ---- zero-size dims ---------------------------------------------------------------------------
def test_zero_size_dims_as_jit(rng):
    x = rng.standard_normal((0, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    a = rng.standard_normal((3, 0)).astype(np.float32)
    b = rng.standard_normal((0, 4)).astype(np.float32)

    _check(lambda x, w: x @ w, x, w)  # (0,16) @ (16,8): an empty result, no task
    _check(lambda a, b: jax.nn.relu(a @ b + 1.0), a, b)  # empty K: every element is relu(0 + 1)
    # an empty reduced axis: the identities (lax: jnp.max refuses empty axes)
    _check(lambda a: (a.sum(1), jax.lax.reduce_max(a, (1,)), jax.lax.reduce_min(a, (1,))), a)
    _check(lambda a, x: (a.astype(jnp.int32).sum(1), (a > 0).all(1), (a > 0).any(1)), a, x)
    _check(lambda x, w: (x @ w, jnp.tanh(w)), x, w)  # an empty output next to a real one


# ---- errors name the argument and the line -----------------------------------------------------
def test_errors_name_the_argument_by_pytree_path():
    def step(x, cache):
        return x + jnp.real(cache["k"])

    with pytest.raises(UnsupportedError, match=r"complex64.*argument cache\['k'\]"):
        ark.plan(step, jnp.ones(4), {"k": jnp.ones(4, jnp.complex64)})

    def unsupported(x, cache):
        return jax.lax.igamma(cache["k"], x) + x

    with pytest.raises(
        UnsupportedError,
        match=r"'igamma' is not supported.*test_persistent_int.py:\d+.*cache\['k'\]",
    ):
        ark.plan(unsupported, jnp.ones(4), {"k": jnp.ones(4)})


# ---- models written by others ------------------------------------------------------------------
def test_flax_nnx_prenorm_block_with_causal_mask():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, d, heads, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=heads, in_features=d, decode=False, rngs=rngs
            )
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            mask = nnx.make_causal_mask(x[..., 0])  # iota, int32 compare, bool and
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

    graphdef, state = nnx.split(Block(32, 4, nnx.Rngs(0)))

    def block(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    _check(block, state, x, tol=1e-5, reference=False)


def test_equinox_layernorm_mlp():
    eqx = pytest.importorskip("equinox")
    model = (eqx.nn.LayerNorm(32), eqx.nn.MLP(32, 32, 64, 2, key=jax.random.key(2)))
    params, static = eqx.partition(model, eqx.is_array)

    def apply(params, x):
        ln, mlp = eqx.combine(params, static)  # LayerNorm's jnp.var: an int32 ddof, converted
        return jax.vmap(lambda v: mlp(ln(v)))(x)

    x = jax.random.normal(jax.random.key(3), (8, 32))
    _check(apply, params, x, tol=1e-5)


# ---- indexing: device indices, clamped as XLA clamps them ---------------------------------------
def _indexing(x, ids, pos):
    return (
        x[ids],  # embedding lookup: gather, promise_in_bounds (clamped)
        jnp.take(x, ids, axis=0),  # fill_or_drop: out-of-range rows are NaN
        jnp.take_along_axis(x, jnp.abs(ids[:, :2]) % 9, axis=1),  # gather with batching dims
        jnp.take_along_axis(x, ids[:, :2], axis=1, mode="clip"),
        jax.lax.dynamic_slice(x, (pos, pos - 2), (3, 4)),
        jax.lax.dynamic_update_slice(x, -x[:2, :3], (pos, pos + 5)),
        jnp.concatenate([x[:, :2], 2 * x, x[:1, :].repeat(x.shape[0], 0)], axis=1),
        jax.lax.pad(x, jnp.float32(0.5), ((1, -1, 1), (2, 0, 0))),
        jnp.pad(x, ((0, 2), (3, 1))),
        jnp.flip(x, 0),
        jax.lax.rev(x, (0, 1)),
    )


@FAST
@given(data=st.data())
def test_indexing_matches_jit(data):
    x = data.draw(hnp.arrays(np.float32, (6, 9), elements=st.floats(-4, 4, width=32)))
    ids = data.draw(hnp.arrays(np.int32, (6, 4), elements=st.integers(-10, 10)))
    pos = np.int32(data.draw(st.integers(-3, 12)))
    _check(_indexing, x, ids, pos)


def test_integer_indexing_matches_jit(rng):
    table = rng.integers(-(2**31), 2**31, (7, 5), dtype=np.int64).astype(np.int32)
    ids = rng.integers(-9, 9, (4,)).astype(np.int32)
    _check(lambda t, i: (t[i], jnp.flip(t, 1), jnp.concatenate([t, t + 1])), table, ids)


def _decode_step(params, cache, token, pos):
    """One decode step of a 1-layer GPT-style model: token id -> embedding gather, K / V written
    into the cache at `pos` (dynamic_update_slice), causal attention over the filled prefix
    (iota <= pos), logits, greedy next token (argmax)."""
    x = params["embed"][token]  # (B, D)
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    q, k, v = h @ params["wq"], h @ params["wk"], h @ params["wv"]
    kc = jax.lax.dynamic_update_slice(cache["k"], k[:, None, :], (0, pos, 0))
    vc = jax.lax.dynamic_update_slice(cache["v"], v[:, None, :], (0, pos, 0))
    s = jnp.einsum("bd,btd->bt", q, kc) / np.sqrt(q.shape[-1]).astype(np.float32)
    s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
    a = jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), vc)
    y = x + a @ params["wo"]
    logits = y @ params["embed"].T
    return jnp.argmax(logits, -1).astype(jnp.int32), {"k": kc, "v": vc}


def test_kv_cache_decode_step(rng):
    B, T, D, V = 2, 16, 32, 50
    params = {
        "embed": rng.standard_normal((V, D)).astype(np.float32),
        **{
            w: (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
            for w in ("wq", "wk", "wv", "wo")
        },
    }
    cache = {
        "k": rng.standard_normal((B, T, D)).astype(np.float32),
        "v": rng.standard_normal((B, T, D)).astype(np.float32),
    }
    token = rng.integers(0, V, (B,)).astype(np.int32)
    step = jax.jit(ark.persistent(_decode_step))
    want_step = jax.jit(_decode_step)
    got_cache, want_cache = dict(cache), dict(cache)
    got_tok, want_tok = token, token
    for pos in range(3):  # three steps, each feeding the previous step's token and cache back
        got_tok, got_cache = step(params, got_cache, got_tok, np.int32(pos))
        want_tok, want_cache = want_step(params, want_cache, want_tok, np.int32(pos))
        np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok))
        for name in ("k", "v"):
            assert_close(got_cache[name], want_cache[name], 1e-5)
    _check(_decode_step, params, cache, token, np.int32(T + 3))  # pos past the end: clamped


# ---- in-place state: a donated input aliased to its output --------------------------------------
def test_kv_cache_updated_in_place(rng):
    cache = rng.standard_normal((2, 16, 8)).astype(np.float32)
    row = rng.standard_normal((2, 1, 8)).astype(np.float32)

    def write(cache, row, pos):
        return jax.lax.dynamic_update_slice(cache, jnp.tanh(row), (0, pos, 0))

    plan = ark.plan(write, cache, row, np.int32(3), platform="cpu")
    (store,) = plan.ops  # one window-store task: the row, at a device offset; not the cache
    assert store.store_view >= 0 and len(plan.tasks) == 1
    assert plan.tensors[plan.outputs[0]].alias == 0
    step = jax.jit(ark.persistent(write), donate_argnums=0)
    hlo = step.lower(cache, row, np.int32(3)).compile().as_text()
    assert " copy(" not in hlo and "copy-start" not in hlo  # no per-step copy of the cache
    want = jax.jit(write)(cache, row, np.int32(3))
    buf = jnp.asarray(cache)
    ptr = buf.unsafe_buffer_pointer()
    out = step(buf, row, np.int32(3))
    assert out.unsafe_buffer_pointer() == ptr  # the donated buffer itself
    assert_close(out, want, 1e-6)  # tanh: libm vs XLA, an ulp apart
    for pos in (-4, 0, 15, 40):  # clamped as XLA clamps; without donation XLA copies once
        _check(write, cache, row, np.int32(pos))


def test_decode_step_updates_both_caches_in_place(rng):
    B, T, D, V = 2, 16, 32, 50
    params = {
        "embed": rng.standard_normal((V, D)).astype(np.float32),
        **{
            w: (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
            for w in ("wq", "wk", "wv", "wo")
        },
    }
    cache = {"k": np.zeros((B, T, D), np.float32), "v": np.zeros((B, T, D), np.float32)}
    plan = ark.plan(_decode_step, params, cache, np.zeros(B, np.int32), np.int32(0))
    aliased = sorted(plan.tensors[o].alias for o in plan.outputs if plan.tensors[o].alias >= 0)
    assert len(aliased) == 2  # cache['k'], cache['v'] (flattened operand indices)
    step = jax.jit(ark.persistent(_decode_step), donate_argnums=1)
    want_step = jax.jit(_decode_step)
    got_cache = {k: jnp.asarray(v) for k, v in cache.items()}
    want_cache = dict(cache)
    got_tok = want_tok = rng.integers(0, V, (B,)).astype(np.int32)
    for pos in range(4):
        ptrs = {k: v.unsafe_buffer_pointer() for k, v in got_cache.items()}
        got_tok, got_cache = step(params, got_cache, got_tok, np.int32(pos))
        want_tok, want_cache = want_step(params, want_cache, want_tok, np.int32(pos))
        assert {k: v.unsafe_buffer_pointer() for k, v in got_cache.items()} == ptrs
        np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok))
        for name in ("k", "v"):
            assert_close(got_cache[name], want_cache[name], 1e-5)


# ---- the CUDA executor ---------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_integer_ops_and_reductions(rng):
    a = rng.integers(-(2**31), 2**31, (5, 37), dtype=np.int64).astype(np.int32)
    b = rng.integers(-40, 40, (5, 37)).astype(np.int32)
    u = rng.integers(0, 2**32, (5, 37), dtype=np.int64).astype(np.uint32)
    x = rng.choice(np.float32([-1.5, 0.0, 2.0, np.nan, 1e10, -1e10]), (5, 37))
    # sums in another order than XLA's must stay exact: no 1e10 + 2 - 1e10 in the reductions
    small = rng.choice(np.float32([-1.5, 0.0, 2.0, 7.25]), (5, 37))
    gpu = jax.devices("gpu")[0]
    put = lambda *v: [jax.device_put(t, gpu) for t in v]  # noqa: E731
    for fn, args in (
        (_int_ops, (a, b)),
        (_cmp_ops, (a, b)),
        (_int_ops, (u, u % 40)),
        (_conversions, (x, a, u)),
        (_reductions, (small, a, u)),
        (_indexing, (small[:, :9], b[:, :4], np.int32(4))),
        (lambda t, i: (t[i], jnp.flip(t, 1)), (a, b[0])),
        (lambda c, r, p: jax.lax.dynamic_update_slice(c, r, (p, 0)), (x, x[:1] * 2, np.int32(3))),
    ):
        want = jax.tree_util.tree_leaves(jax.jit(fn)(*put(*args)))
        got = jax.tree_util.tree_leaves(jax.jit(ark.persistent(fn))(*put(*args)))
        for g, w in zip(got, want, strict=True):
            _exact_or_close(g, w, 1e-4)
    # NaN rows: jnp.argmax documents the first NaN's index (numpy agrees). XLA:GPU's reduction
    # returns some NaN's index (24 and 16 instead of 2 and 3 on the first H200 run), so numpy is
    # the reference here.
    got = jax.jit(ark.persistent(lambda x: (jnp.argmax(x, 1), jnp.argmin(x, 0))))(*put(x))
    np.testing.assert_array_equal(np.asarray(got[0]), np.argmax(x, 1))
    np.testing.assert_array_equal(np.asarray(got[1]), np.argmin(x, 0))


# ---- plans with integer programs: JSON round trip, validation of register kinds --------------
def test_integer_plan_round_trips_and_validates(rng):
    a = rng.integers(-(2**31), 2**31, (4, 6), dtype=np.int64).astype(np.int32)
    ids = rng.integers(-9, 9, (3,)).astype(np.int32)

    def fn(a, ids):
        return (a ^ jnp.int32(-(2**31))) + jnp.uint32(2**32 - 1).astype(jnp.int32), a[ids]

    plan = ark.plan(fn, a, ids, platform="cpu")
    again = ark.Plan.from_json(plan.to_json())
    np.testing.assert_array_equal(again.to_binary(), plan.to_binary())
    outs = jax.jit(ark.persistent(fn, plan=again))(a, ids)
    for got, want in zip(outs, jax.jit(fn)(a, ids), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    bad = plan.copy()
    prog = next(op.epilogue for op in bad.ops if any(i.op == "xor" for i in op.epilogue))
    xor = next(i for i in prog if i.op == "xor")
    prog[int(xor.a)].dtype = "float32"  # its operand now holds a float: refused before running
    with pytest.raises(ark.PlanError, match="xor takes integer operands"):
        bad.validate()
    with pytest.raises(ark.PlanError, match="integer operands"):
        ark.persistent(fn, plan=bad)


@pytest.mark.gpu
def test_gpu_decode_step_in_place(rng):
    B, T, D, V = 2, 16, 32, 50
    gpu = jax.devices("gpu")[0]
    params = {
        "embed": rng.standard_normal((V, D)).astype(np.float32),
        **{
            w: (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
            for w in ("wq", "wk", "wv", "wo")
        },
    }
    params = jax.device_put(params, gpu)
    cache = {k: jax.device_put(np.zeros((B, T, D), np.float32), gpu) for k in ("k", "v")}
    want_cache = {k: np.zeros((B, T, D), np.float32) for k in ("k", "v")}
    step = jax.jit(ark.persistent(_decode_step), donate_argnums=1)
    got_tok = want_tok = jax.device_put(rng.integers(0, V, (B,)).astype(np.int32), gpu)
    for pos in range(4):
        ptrs = {k: v.unsafe_buffer_pointer() for k, v in cache.items()}
        got_tok, cache = step(params, cache, got_tok, np.int32(pos))
        with jax.default_matmul_precision("highest"):  # float32 reference, not TF32
            want_tok, want_cache = jax.jit(_decode_step)(
                params, want_cache, want_tok, np.int32(pos)
            )
        assert {k: v.unsafe_buffer_pointer() for k, v in cache.items()} == ptrs
        np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok))
        for name in ("k", "v"):
            assert_close(cache[name], want_cache[name], 1e-4)


def test_int_to_bf16_rounds_as_xla_cpu():
    """int -> bfloat16 goes int -> float32 -> bfloat16 in ark, the executors and the reference,
    and XLA:CPU rounds twice the same way: 2^24 + 2^16 + 1 becomes 2^24 (one rounding would give
    2^24 + 2^17). Pinned so that a change on either side shows up."""
    x = np.array([2**24 + 2**16 + 1, -(2**24 + 2**16 + 1), 2**24 + 2**16, 5, 2**31 - 1], np.int32)

    def fn(i, u):
        return i.astype(jnp.bfloat16), u.astype(jnp.bfloat16)

    args = (x, x.view(np.uint32))
    want = jax.jit(fn)(*args)
    assert float(want[0][0]) == 2.0**24  # XLA:CPU rounds twice
    for got in (jax.jit(ark.persistent(fn))(*args), interpret(ark.plan(fn, *args), *args)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32])
def test_bit_counts_and_high_products_are_exact(rng, dtype):
    """population_count, clz and mulhi over random 32-bit patterns, each power of two and its
    neighbours, 0, -1 and the extremes: exact against jax.jit."""
    powers = [1 << k for k in range(32)]
    edges = powers + [p - 1 for p in powers] + [p + 1 for p in powers] + [0, 2**32 - 1, 2**31 - 1]
    words = np.concatenate(
        [rng.integers(0, 2**32, 900, dtype=np.uint64), np.array(edges, np.uint64)]
    )
    x = words.astype(np.uint32).view(np.int32)
    y = np.roll(x, 7)

    def fn(x, y):
        x, y = x.astype(dtype), y.astype(dtype)
        return jax.lax.population_count(x), jax.lax.clz(x), jax.lax.mulhi(x, y), jax.lax.mulhi(x, x)

    for got, want in zip(jax.jit(ark.persistent(fn))(x, y), jax.jit(fn)(x, y), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
