"""Convolutions and pooling inside ark.persistent (jax_ark/_persistent/_conv.py): every layout,
stride, padding, dilation and group count against jax.jit on fresh random inputs (and the numpy
reference interpreter), the convolutions autodiff makes (transposed, batch-grouped), max / min
pooling's gradient (select_and_scatter_add), a flax.linen CNN's training step with optax, and a
data-parallel CNN step whose gradient pmean is planned with the convolutions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._reference import interpret

TOL = 2e-5
NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _check(fn, *args, tol=TOL):
    """ark.persistent equal to jax.jit, and the plan valid and equal under the numpy reference
    interpreter (the executors' specification)."""
    want = jax.jit(fn)(*args)
    assert_close(jax.jit(ark.persistent(fn))(*args), want, tol)
    plan = ark.plan(fn, *args, platform="cpu")
    plan.validate()
    (ref,) = interpret(plan, *[np.asarray(a) for a in args])
    assert_close(ref.reshape(want.shape), want, tol)


CONVS = {
    "same": dict(window_strides=(1, 1), padding="SAME"),
    "valid_stride2": dict(window_strides=(2, 2), padding="VALID"),
    "odd_padding": dict(window_strides=(1, 2), padding=((2, 1), (0, 3))),
    "negative_padding": dict(window_strides=(1, 1), padding=((-1, 2), (1, -1))),
    "rhs_dilation": dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3)),
    "lhs_dilation": dict(window_strides=(1, 1), padding=((2, 2), (1, 1)), lhs_dilation=(2, 3)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_2d_matches_jit(rng, case):
    x, k = _normal(rng, 2, 9, 8, 3), _normal(rng, 3, 3, 3, 5)

    def fn(x, k):
        return lax.conv_general_dilated(x, k, dimension_numbers=NHWC, **CONVS[case])

    _check(fn, x, k)


def test_conv_nchw_oihw_layouts(rng):
    x, k = _normal(rng, 2, 3, 7, 10), _normal(rng, 6, 3, 2, 3)
    _check(lambda x, k: lax.conv_general_dilated(x, k, (2, 1), "SAME"), x, k)
    # Mixed orders: the batch and feature dims anywhere, the output in a third order.
    x2 = np.ascontiguousarray(x.transpose(2, 0, 3, 1))  # H N W C
    _check(
        lambda x, k: lax.conv_general_dilated(
            x, k, (1, 1), "VALID", dimension_numbers=("HNWC", "OIHW", "CWNH")
        ),
        x2,
        k,
    )


@pytest.mark.parametrize("groups", [3, 6])
def test_grouped_and_depthwise_conv(rng, groups):
    x, k = _normal(rng, 2, 8, 8, 6), _normal(rng, 3, 3, 6 // groups, 12)

    def fn(x, k):
        return lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=groups
        )

    _check(fn, x, k)


def test_conv_1d_causal_and_3d(rng):
    x, k = _normal(rng, 2, 16, 4), _normal(rng, 5, 4, 8)
    _check(
        lambda x, k: lax.conv_general_dilated(
            x, k, (1,), ((4, 0),), dimension_numbers=("NWC", "WIO", "NWC")
        ),
        x,
        k,
    )
    # Eight logical dims in the 3-D im2col: more than a plan's six, folded (_Space).
    v, k3 = _normal(rng, 2, 5, 6, 7, 3), _normal(rng, 2, 3, 3, 3, 4)
    _check(
        lambda v, k: lax.conv_general_dilated(
            v, k, (1, 2, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        ),
        v,
        k3,
    )


def test_bfloat16_conv(rng):
    x, k = _normal(rng, 2, 8, 8, 3), _normal(rng, 3, 3, 3, 4)

    def fn(x, k):
        y = lax.conv_general_dilated(
            x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (1, 1), "SAME", dimension_numbers=NHWC
        )
        return y.astype(jnp.float32)

    _check(fn, x, k, tol=2e-2)  # bf16 outputs: sums in another order may round one ulp apart


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_gradients(rng, groups):
    """jax.grad's transposed convolutions: lhs_dilation for a strided input gradient, swapped
    dimension numbers for the kernel's, batch_group_count for a grouped kernel's."""
    x, k = _normal(rng, 2, 9, 8, 3), _normal(rng, 3, 3, 3 // groups, 6)

    def loss(x, k):
        y = lax.conv_general_dilated(
            x, k, (2, 2), "SAME", dimension_numbers=NHWC, feature_group_count=groups
        )
        return jnp.sum(jnp.tanh(y) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    convs = [e for e in jax.make_jaxpr(grad)(x, k).jaxpr.eqns if "conv" in e.primitive.name]
    if groups > 1:  # the test covers what it names
        assert any(e.params["batch_group_count"] > 1 for e in convs)
    assert any(any(d > 1 for d in e.params["lhs_dilation"]) for e in convs)
    got, want = jax.jit(ark.persistent(grad))(x, k), jax.jit(grad)(x, k)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 5e-5)


@pytest.mark.parametrize(
    "padding, window, kinds",
    [
        ("SAME", 3, ["map", "map", "matmul"]),  # pad, im2col copy, matmul
        ("VALID", 3, ["map", "matmul"]),  # im2col copy, matmul
        ("VALID", 1, ["matmul"]),  # a 1x1 kernel reads the input itself
    ],
)
def test_conv_plan_is_pad_copy_and_matmul(rng, padding, window, kinds):
    """The im2col is a copy of a strided view of the (padded) input: no index arithmetic per
    element, its program one LOAD; an activation lands in the matmul's epilogue."""
    x, k = _normal(rng, 2, 9, 8, 3), _normal(rng, window, window, 3, 4)

    def fn(x, k):
        y = lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=NHWC)
        return jax.nn.relu(y)

    plan = ark.plan(fn, x, k)
    assert [op.kind for op in plan.ops] == kinds
    assert plan.ops[-1].name.startswith("conv_general_dilated")
    if window > 1:
        assert [i.op for i in plan.ops[-2].epilogue] == ["load"]  # the im2col copy
    if padding == "SAME":  # the pad: one pass, bound checks on the two spatial dims only
        assert len(plan.ops[0].epilogue) <= 24
    _check(fn, x, k)


PADDED = ((0, 0), (1, 1), (0, 1), (0, 0))
POOLS = {
    "max_same": (-np.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME", {}),
    "avg_valid": (0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID", {}),
    "min_padded": (np.inf, lax.min, (1, 3, 2, 1), (1, 1, 1, 1), PADDED, {}),
    "sum_dilated": (
        0.0,
        lax.add,
        (1, 2, 2, 1),
        (1, 1, 1, 1),
        "SAME",
        {"base_dilation": (1, 2, 1, 1), "window_dilation": (1, 1, 2, 1)},
    ),
}


@pytest.mark.parametrize("case", sorted(POOLS))
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_pooling_matches_jit(rng, case, dtype):
    init, op, window, strides, padding, extra = POOLS[case]
    if dtype == np.int32:
        x = rng.integers(-50, 50, (2, 9, 8, 3)).astype(np.int32)
        init = {-np.inf: np.iinfo(np.int32).min, np.inf: np.iinfo(np.int32).max}.get(init, 0)
    else:
        x = _normal(rng, 2, 9, 8, 3)

    def fn(x):
        return lax.reduce_window(x, dtype(init), op, window, strides, padding, **extra)

    got, want = jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x)
    if dtype == np.int32:
        np.testing.assert_array_equal(got, want)
    else:
        assert_close(got, want, TOL)


def test_avg_pool_gradient_and_3d_max_pool(rng):
    x = _normal(rng, 2, 8, 8, 3)

    def loss(x):
        return jnp.sum(lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") ** 2)

    _check(jax.grad(loss), x)
    v = _normal(rng, 2, 5, 6, 7, 3)
    _check(
        lambda v: lax.reduce_window(v, -jnp.inf, lax.max, (1, 2, 2, 2, 1), (1, 1, 2, 2, 1), "SAME"),
        v,
    )


@pytest.mark.parametrize(
    "case", ["max_tiled", "max_untiled", "max_same", "max_overlapping", "min_padded"]
)
@pytest.mark.parametrize("ties", [False, True])
def test_max_and_min_pool_gradients(rng, case, ties):
    """jax.grad of max / min pooling (select_and_scatter_add): each window's cotangent lands on
    its first maximum (minimum), also where windows overlap and where values tie (small
    integers), exactly as jax.jit."""
    init, op, window, strides, padding = {
        # windows that tile the input (max_pool(2, 2): one pass over stride-0 views), and the
        # same on 9 rows, whose last row no window covers
        "max_tiled": (-np.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        "max_untiled": (-np.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        "max_same": (-np.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"),
        "max_overlapping": (-np.inf, lax.max, (1, 3, 2, 1), (1, 1, 1, 1), "SAME"),
        "min_padded": (
            np.inf,
            lax.min,
            (1, 2, 3, 1),
            (1, 2, 1, 1),
            ((0, 0), (1, 0), (1, 2), (0, 0)),
        ),
    }[case]
    shape = (2, 8, 8, 3) if case == "max_tiled" else (2, 9, 8, 3)
    if ties:
        x = rng.integers(-3, 3, shape).astype(np.float32)
    else:
        x = _normal(rng, *shape)

    def loss(x):
        y = lax.reduce_window(x, np.float32(init), op, window, strides, padding)
        return jnp.sum(jnp.sin(y) * 3.0)

    grad = jax.grad(loss)
    assert "select_and_scatter_add" in str(jax.make_jaxpr(grad)(x))
    _check(grad, x)


@pytest.mark.parametrize(
    "window, strides, padding",
    [((1, 1, 1, 1), (1, 1, 1, 1), "VALID"), ((1, 1, 1, 1), (1, 2, 2, 1), "SAME")],
)
def test_one_element_window_gradients(rng, window, strides, padding):
    """Max pooling over 1-element windows (an identity, a strided subsample): no tap dims at
    all in the window argmax and in the scatter (the tiled path and the general one)."""
    x = _normal(rng, 2, 5, 5, 3)

    def loss(x):
        return jnp.sum(lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding) ** 2)

    _check(jax.grad(loss), x)


def test_integer_conv_is_refused():
    x, k = np.ones((1, 4, 4, 1), np.int32), np.ones((2, 2, 1, 1), np.int32)
    fn = ark.persistent(
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)
    )
    with pytest.raises(ark.UnsupportedError, match="conv_general_dilated of int32"):
        jax.jit(fn)(x, k)


def _flax_cnn():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        """flax's MNIST example network, smaller: conv, relu, then avg_pool and max_pool, then
        two Dense layers."""

        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
            x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), strides=(2, 2))
            x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    return CNN()


def test_flax_cnn_training_step(rng):
    optax = pytest.importorskip("optax")
    model, tx = _flax_cnn(), optax.adam(1e-3)
    x = _normal(rng, 4, 12, 12, 1)
    labels = rng.integers(0, 10, (4,)).astype(np.int32)
    params = jax.tree.map(
        lambda p: _normal(rng, *p.shape) * 0.3, model.init(jax.random.key(0), x)["params"]
    )
    opt_state = tx.init(params)

    def step(params, opt_state, x, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    got = jax.jit(ark.persistent(step))(params, opt_state, x, labels)
    want = jax.jit(step)(params, opt_state, x, labels)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if np.issubdtype(np.asarray(w).dtype, np.integer):
            np.testing.assert_array_equal(g, w)
        else:
            assert_close(g, w, 5e-5)


def test_data_parallel_cnn_gradient_pmean(mesh8, rng):
    """Each device's convolution gradients and their pmean over 8 devices, one persistent call
    per device."""
    model = _flax_cnn()
    x = _normal(rng, 16, 12, 12, 1)
    target = _normal(rng, 16, 10)
    params = jax.tree.map(
        lambda p: _normal(rng, *p.shape) * 0.3, model.init(jax.random.key(0), x[:2])["params"]
    )

    def grads(params, x, target):
        g = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2))(params)
        return jax.lax.pmean(g, "x")

    specs = {"mesh": mesh8, "in_specs": (P(), P("x"), P("x")), "out_specs": P()}
    got = jax.jit(jax.shard_map(ark.persistent(grads), **specs))(params, x, target)
    want = jax.jit(jax.shard_map(grads, **specs))(params, x, target)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, 5e-5)


def test_equinox_cnn_under_vmap_and_its_gradient(rng):
    """equinox's Conv2d / MaxPool2d / AvgPool2d (unbatched layers, batched with jax.vmap), and
    the gradient of a loss over the batch."""
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(1), 3)
    conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, key=keys[0])
    conv2 = eqx.nn.Conv2d(8, 4, 3, stride=2, key=keys[1])
    pool_max, pool_avg = eqx.nn.MaxPool2d(2, stride=2), eqx.nn.AvgPool2d(3, stride=1, padding=1)
    model = (conv1, conv2)

    def net(model, x):  # x: (C, H, W), equinox's layout
        c1, c2 = model
        y = pool_max(jax.nn.relu(c1(x)))
        return jnp.mean(pool_avg(jnp.tanh(c2(y))))

    def loss(model, xs):
        return jnp.mean(jax.vmap(net, in_axes=(None, 0))(model, xs) ** 2)

    params, static = eqx.partition(model, eqx.is_array)

    def grad_of(params, xs):
        return jax.grad(lambda p: loss(eqx.combine(p, static), xs))(params)

    xs = _normal(rng, 4, 3, 12, 12)
    got = jax.jit(ark.persistent(grad_of))(params, xs)
    want = jax.jit(grad_of)(params, xs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, 5e-5)


def test_residual_conv_blocks_in_a_scan_and_their_gradient(rng):
    """Five residual conv blocks as a scan over stacked kernels (planned once, run five times),
    rematerialized, and the kernels' gradient through the loop."""
    x = _normal(rng, 2, 8, 8, 4)
    ws = _normal(rng, 5, 3, 3, 4, 4) / 6

    def net(x, ws):
        def block(h, w):
            y = lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=NHWC)
            return h + jax.nn.relu(y), None

        return lax.scan(jax.checkpoint(block), x, ws)[0]

    _check(net, x, ws)
    grad = jax.grad(lambda x, ws: jnp.sum(net(x, ws) ** 2), argnums=1)
    assert_close(jax.jit(ark.persistent(grad))(x, ws), jax.jit(grad)(x, ws), 5e-5)
