"""Scatters of many points (more than 16 per batch element) as one scatter-fold op: an embedding's
gradient, segment_sum / max / min / prod, bincount, histogram, `x.at[perm].set(v)`. Against
jax.jit on fresh random inputs (exact for integers), against numpy's serial `ufunc.at` for the
order of duplicate indices (float32 sums rounded point by point, in point order), through the
numpy reference interpreter for plans made for a GPU, and refused by both plan checks when a hand
edit breaks a fold's rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._reference import interpret
from jax_ark._persistent._trace import UnsupportedError

OPS_AT = 14  # header word: the op records' word offset (docs/plan_format.md)
OP_WORDS = 40


def _leaves(x):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]


def _assert_same(got, want, tol: float = 0.0):
    """Integers exactly; floats with NaN in the same places (a NaN's sign bit is XLA's choice),
    exactly when tol is 0."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if not np.issubdtype(want.dtype, np.inexact):
        np.testing.assert_array_equal(got, want)
        return
    g, w = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    if tol == 0.0:
        np.testing.assert_array_equal(g, w)
    else:
        assert_close(np.nan_to_num(g), np.nan_to_num(w), tol)


def _folds(plan) -> list:
    return [op for op in plan.ops if op.scatter_fold]


def _check(fn, *args, tol: float = 0.0, gpu: bool = True):
    """ark.persistent (1 and 3 workers) and, for a plan made for a GPU, the reference interpreter
    against jax.jit; the plan holds one scatter fold, one task, per scatter."""
    want = _leaves(jax.jit(fn)(*args))
    for w in (1, 3):
        for g, r in zip(
            _leaves(jax.jit(ark.persistent(fn, num_workers=w))(*args)), want, strict=True
        ):
            _assert_same(g, r, tol)
    plan = ark.plan(fn, *args, platform="gpu", num_workers=16) if gpu else None
    if plan is not None:
        folds = [i for i, op in enumerate(plan.ops) if op.scatter_fold]
        assert folds, plan.summary()
        assert all(sum(t.op == i for t in plan.tasks) == 1 for i in folds)
        for g, r in zip(_leaves(interpret(plan, *args)), want, strict=True):
            _assert_same(g, r, tol)


def _segments(rng, n, num, dtype=np.int32):
    return rng.integers(0, num, n).astype(dtype)


@pytest.mark.parametrize("reducer", ["sum", "max", "min", "prod"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.int8, jnp.uint8])
def test_segment_reductions_match_jit(rng, reducer, dtype):
    x = rng.standard_normal(300) * 3
    if jnp.issubdtype(dtype, jnp.integer):
        lo = 0 if dtype == jnp.uint8 else -100
        x = rng.integers(lo, 100, 300)
    if reducer == "prod":
        x = (
            1 + 0.01 * rng.standard_normal(300)
            if not jnp.issubdtype(dtype, jnp.integer)
            else (rng.integers(1, 4, 300))
        )  # products of integers wrap, as XLA's
    x = np.asarray(x).astype(np.float32 if dtype == jnp.bfloat16 else dtype)
    seg = _segments(rng, 300, 11)
    fold = getattr(jax.ops, f"segment_{reducer}")

    def fn(x, s):
        return fold(x.astype(dtype), s, 11)

    _check(fn, x, seg)


def test_duplicate_indices_fold_in_point_order(rng):
    """Terms of very different magnitudes into 5 bins: a float32 sum's bits depend on the order.
    numpy's add.at applies them one at a time in order, in float32, as XLA's serial scatter: the
    fold equals both exactly."""
    x = (rng.standard_normal(2000) * np.exp(rng.standard_normal(2000) * 6)).astype(np.float32)
    s = _segments(rng, 2000, 5)
    want = np.zeros(5, np.float32)
    np.add.at(want, s, x)

    def fn(x, s):
        return jnp.zeros(5, jnp.float32).at[s].add(x)

    _assert_same(ark.persistent(fn)(x, s), want)
    _assert_same(jax.jit(fn)(x, s), want)
    # and the order matters here: summed in another order, the bits differ
    assert not np.array_equal(want, np.array([x[s == k][::-1].sum() for k in range(5)], np.float32))


@pytest.mark.parametrize("mode", [None, "clip", "drop", "promise_in_bounds"])
def test_out_of_range_points(rng, mode):
    """Indices from -12 to 12 into 9 elements: jnp normalizes negative ones (from -9), drops the
    rest by default (FILL_OR_DROP) and with "drop", clamps them with "clip"."""
    x = rng.standard_normal(200).astype(np.float32)
    s = rng.integers(-12, 13, 200).astype(np.int32)
    if mode == "promise_in_bounds":
        s = np.clip(s, -9, 8).astype(np.int32)

    def fn(x, s):
        return jnp.ones(9).at[s].add(x, mode=mode), jnp.zeros(9).at[s].set(x, mode=mode)

    _check(fn, x, s, tol=1e-6)


def test_set_keeps_the_last_duplicate_and_inverts_a_permutation(rng):
    x = rng.standard_normal(100).astype(np.float32)
    s = _segments(rng, 100, 6)
    perm = rng.permutation(64).astype(np.int32)

    def fn(x, s, perm):
        inverse = jnp.zeros(64, jnp.int32).at[perm].set(jnp.arange(64, dtype=jnp.int32))
        return jnp.full(6, -1.0).at[s].set(x), inverse

    got = ark.persistent(fn)(x, s, perm)
    last = np.full(6, -1.0, np.float32)
    for v, k in zip(x, s, strict=True):
        last[k] = v
    _assert_same(got[0], last)
    np.testing.assert_array_equal(got[1], np.argsort(perm))
    _check(fn, x, s, perm)


@pytest.mark.parametrize("case", ["rows", "batched", "two_dims", "window", "bincount", "histogram"])
def test_scatter_shapes(rng, case):
    x = rng.standard_normal((6, 40)).astype(np.float32)
    i = rng.integers(0, 9, (6, 40)).astype(np.int32)
    fns = {
        # embedding-style: whole rows at 40 indices
        "rows": lambda x, i: jnp.zeros((9, 6)).at[i[0]].add(x.T),
        # a batching dim (each row of x scatters into its own row)
        "batched": lambda x, i: jnp.zeros((6, 9)).at[jnp.arange(6)[:, None], i].add(x),
        # points indexed by two dims, 120 of them
        "two_dims": lambda x, i: jnp.zeros((9, 9)).at[i[:3], i[3:]].max(x[:3]),
        # a window of 4 columns per point, partly out of range (dropped)
        "window": lambda x, i: lax.scatter_add(
            jnp.zeros((9, 12)),
            i[0][:, None],
            x[:4].T.reshape(40, 4),
            lax.ScatterDimensionNumbers(
                update_window_dims=(1,),
                inserted_window_dims=(0,),
                scatter_dims_to_operand_dims=(0,),
            ),
        ),
        "bincount": lambda x, i: jnp.bincount(i.ravel(), length=9),
        "histogram": lambda x, i: jnp.histogram(x, bins=8, range=(-2, 2))[0],
    }
    _check(fns[case], x, i)


@pytest.mark.parametrize("points", [5, 60])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_scatter_sub(rng, points, dtype):
    """lax.scatter_sub (`x.at[i].subtract(v)`): unrolled selects for 5 points, a fold of the
    negated updates for 60 (old - u is old + (-u) exactly)."""
    x = rng.integers(-50, 50, 12).astype(dtype)
    i = rng.integers(0, 12, points).astype(np.int32)
    v = (rng.standard_normal(points) * 10).astype(dtype)
    _check(lambda x, i, v: x.at[i].subtract(v), x, i, v, gpu=points > 16)


def test_scatter_apply_is_refused(rng):
    """lax.scatter_apply binds `scatter` with an update function; planned as a set, it would store
    the placeholder updates (found by JAX's own testScatterApply records)."""
    x = rng.standard_normal(10).astype(np.float32)
    i = np.array([[1], [3], [3]], np.int32)
    dn = lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    fn = lambda x, i: lax.scatter_apply(x, i, jnp.sin, dn, update_shape=(3,))  # noqa: E731
    with pytest.raises(UnsupportedError, match="scatter_apply"):
        ark.plan(fn, x, i)


def test_fold_inside_scan_and_while_loop(rng):
    """Gradient accumulation over microbatches (a scan) and a while_loop re-running the fold."""
    x = rng.standard_normal((5, 64)).astype(np.float32)
    s = _segments(rng, 5 * 64, 7).reshape(5, 64)

    def scanned(x, s):
        def body(c, xs):
            return c + jax.ops.segment_sum(jnp.tanh(xs[0]), xs[1], 7), None

        return lax.scan(body, jnp.zeros(7), (x, s))[0]

    def looped(x, s):
        def body(c):
            return c[0] * 0.5 + jax.ops.segment_max(x[c[1]], s[c[1]], 7), c[1] + 1

        return lax.while_loop(lambda c: c[1] < 5, body, (jnp.zeros(7), 0))[0]

    _check(scanned, x, s, tol=1e-6)
    _check(looped, x, s, tol=1e-6)


def test_embedding_language_model_adamw_step(rng):
    """A flax.linen LM (Embed, a Dense block, tied output logits) trained by optax.adamw on
    integer tokens: the embedding's gradient is a scatter-add of batch x length points. The whole
    step (forward, backward, optimizer) is one persistent call, equal to jax.jit's."""
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")
    vocab, d, batch, length = 50, 32, 4, 24

    class TinyLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(vocab, d, name="embed")
            h = embed(tokens)
            h = h + nn.Dense(d, name="mix")(nn.gelu(nn.Dense(2 * d, name="up")(h)))[..., :d]
            return embed.attend(nn.LayerNorm(name="norm")(h))

    model, tx = TinyLM(), optax.adamw(1e-2)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
    opt_state = tx.init(params)

    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads["embed"]["embedding"]

    plan = ark.plan(step, params, opt_state, tokens)
    assert any(op.reduce_kind == "sum" for op in _folds(plan)), plan.summary()
    want = _leaves(jax.jit(step)(params, opt_state, tokens))
    got = _leaves(jax.jit(ark.persistent(step))(params, opt_state, tokens))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 2e-4)


def test_graph_aggregation_under_shard_map(mesh8, rng):
    """A message-passing step: each device gathers its edges' source features, sums them per
    destination node (segment_sum of 96 edges), and the partial sums are psum'd."""
    nodes, d, edges = 12, 8, 96 * 8
    feats = rng.standard_normal((nodes, d)).astype(np.float32)
    src = rng.integers(0, nodes, edges).astype(np.int32)
    dst = rng.integers(0, nodes, edges).astype(np.int32)

    def layer(feats, src, dst):
        messages = jnp.tanh(feats[src])
        return jax.lax.psum(jax.ops.segment_sum(messages, dst, nodes), "x")

    specs = {"mesh": mesh8, "in_specs": (P(), P("x"), P("x")), "out_specs": P()}
    want = jax.jit(jax.shard_map(layer, **specs))(feats, src, dst)
    got = jax.jit(jax.shard_map(ark.persistent(layer), **specs))(feats, src, dst)
    assert_close(got, want, 1e-5)


def _fold_plan(rng):
    x = rng.standard_normal(40).astype(np.float32)
    s = _segments(rng, 40, 5)
    fn = lambda x, s: jax.ops.segment_sum(x, s, 5) * 2.0 + jnp.max(x)  # noqa: E731
    return ark.plan(fn, x, s, platform="cpu"), [x, s], np.asarray(jax.jit(fn)(x, s))


def test_plan_summary_and_json_round_trip(rng):
    plan, args, want = _fold_plan(rng)
    (fold,) = _folds(plan)
    assert fold.kind == "reduce" and fold.kept_rank == 0 and fold.K == 40
    assert "sum-fold of [40] into" in plan.summary()
    again = ark.Plan.from_json(plan.to_json())
    _assert_same(run_plan(again, args, check_on_host=True)[0][0], want, 1e-6)


@pytest.mark.parametrize(
    "edit", ["reads_itself", "two_tasks", "argmax", "last_outside_fold", "float_store_at"]
)
def test_broken_folds_are_refused(rng, edit):
    """Python's validate refuses each edit; the runtime's host check refuses the ones that can be
    written as plan words past validate."""
    plan, args, _ = _fold_plan(rng)
    p = plan.copy()
    i = next(k for k, op in enumerate(p.ops) if op.scatter_fold)
    op = p.ops[i]
    if edit == "reads_itself":  # the prologue loads the output instead of the update
        load = next(ins for ins in op.prologue if ins.op == "load" and ins.dtype == "float32")
        load.a = op.store_view
        with pytest.raises(PlanError, match="read its own output"):
            p.validate()
        return
    if edit == "two_tasks":
        (t,) = [t for t in p.tasks if t.op == i]
        t.m1 = 2
        p.tasks.append(type(t)(i, 0, 1, 2, op.M, 0, 1))
        with pytest.raises(PlanError, match="exactly one task"):
            p.validate()
        return
    words = p.to_binary()
    at = int(words[OPS_AT]) + OP_WORDS * i
    if edit == "argmax":
        op.reduce_kind, words[at + 3] = "argmax", 8
        message = "combining kind|arg reduce kind"
    elif edit == "last_outside_fold":  # jnp.max's reduce op
        j = next(k for k, o in enumerate(p.ops) if o.kind == "reduce" and not o.scatter_fold)
        p.ops[j].reduce_kind, words[int(words[OPS_AT]) + OP_WORDS * j + 3] = "last", 17
        message = "reduce kind"
    else:  # store_at names the value (a float register), not the offset
        op.store_at, words[at + 37] = len(op.prologue) - 1, len(op.prologue)
        message = "store_at"
    with pytest.raises(PlanError, match=message):
        p.validate()
    with pytest.raises(PlanError, match="the runtime's check refuses this plan"):
        jax.jit(lambda *a: run_plan(p, list(a), words=words, check_on_host=True)[0]).trace(*args)
