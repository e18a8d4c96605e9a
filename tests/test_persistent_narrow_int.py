"""8- and 16-bit integer tensors (int8, uint8, int16, uint16) inside ark.persistent, exact against
jax.jit: arithmetic that wraps at the dtype's width, right shifts of the value's own bits, float
conversions that saturate, reductions and running folds, sorting, indexing with narrow indices,
and the models that use them: uint8 images normalized in the function, an int8 weight-only
quantized matmul. The plans made for a GPU, run by the numpy reference interpreter, too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ark as ark
from jax_ark._persistent._reference import interpret

NARROW = [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16]


def _values(rng, dtype, shape) -> np.ndarray:
    """Uniform over the whole range, with the extremes and 0 in the first row."""
    info = np.iinfo(dtype)
    x = rng.integers(info.min, int(info.max) + 1, shape, dtype=np.int64)
    x.reshape(-1)[:4] = [info.min, info.max, 0, info.min + 1]
    return x.astype(dtype)


def _assert_same(fn, *args, gpu_plan: bool = True):
    want = jax.jit(fn)(*args)
    runs = [jax.jit(ark.persistent(fn))(*args)]
    if gpu_plan:
        runs.append(interpret(ark.plan(fn, *args, platform="gpu", num_workers=16), *args))
    for got in runs:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(g).dtype == np.asarray(w).dtype
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("dtype", NARROW)
def test_arithmetic_wraps_at_the_width(rng, dtype):
    x, y = _values(rng, dtype, (8, 40)), _values(rng, dtype, (8, 40))

    def fn(x, y):
        return (
            x + y, x - y, x * y, -x, jnp.abs(x), x // jnp.where(y == 0, 1, y), jax.lax.div(x, y),
            jax.lax.rem(x, y), ~x, x & y, x | y, x ^ y, jnp.maximum(x, y), x < y, x == y,
            x * 3 + 100, jax.lax.integer_pow(x, 3), jnp.sign(x), jnp.clip(x, -5, 90),
            # read after a wrap: each op's result must wrap before the next op reads it
            (x + y) < x, (x * y) // 3, jax.lax.shift_right_arithmetic(x + y, dtype(1)),
            jnp.maximum(x + y, x - y), (x * y).astype(jnp.float32), jnp.cumsum(x * y, axis=1),
        )  # fmt: skip

    _assert_same(fn, x, y)


@pytest.mark.parametrize("dtype", NARROW)
def test_shifts_bit_counts_and_high_products(rng, dtype):
    x = _values(rng, dtype, (6, 50))
    width = 8 * np.dtype(dtype).itemsize
    amounts = (np.arange(6 * 50) % (width + 3)).reshape(6, 50).astype(dtype)  # past the width too

    def fn(x, n):
        return (
            jax.lax.shift_left(x, n), jax.lax.shift_right_logical(x, n),
            jax.lax.shift_right_arithmetic(x, n), jax.lax.population_count(x), jax.lax.clz(x),
            jax.lax.mulhi(x, x[::-1]),
        )  # fmt: skip

    _assert_same(fn, x, amounts)


@pytest.mark.parametrize("dtype", NARROW)
def test_conversions_wrap_and_saturate(rng, dtype):
    """int32 -> narrow wraps; float -> narrow saturates (NaN -> 0) and truncates toward zero;
    narrow -> float / int32 / bool / another narrow dtype."""
    wide = rng.integers(-(2**31), 2**31, (4, 64), dtype=np.int64).astype(np.int32)
    f = (rng.standard_normal((4, 64)) * 1e5).astype(np.float32)
    f[0, :6] = [np.nan, np.inf, -np.inf, 1e10, -0.7, 255.9]
    x = _values(rng, dtype, (4, 64))

    def fn(wide, f, x):
        return (
            wide.astype(dtype), f.astype(dtype), f.astype(jnp.bfloat16).astype(dtype),
            x.astype(jnp.float32), x.astype(jnp.float16), x.astype(jnp.int32), x.astype(bool),
            x.astype(jnp.uint8), x.astype(jnp.int16), (x > 0).astype(dtype),
        )  # fmt: skip

    _assert_same(fn, wide, f, x)


@pytest.mark.parametrize("dtype", NARROW)
def test_reductions_folds_and_sorting(rng, dtype):
    x = _values(rng, dtype, (12, 33))

    def fn(x):
        return (
            x.sum(axis=0, dtype=dtype), x.max(axis=1), x.min(axis=0), jnp.argmax(x, axis=1),
            jnp.cumsum(x, axis=1, dtype=dtype), jax.lax.cummax(x, axis=0),
            jax.lax.cummin(x, axis=1),
            jnp.prod(x[:5], axis=0, dtype=dtype), jnp.sort(x, axis=1), jnp.argsort(x, axis=0),
            jax.lax.top_k(x, 3)[0], x.astype(jnp.int32).sum(),
        )  # fmt: skip

    _assert_same(fn, x)


def test_narrow_indices_gather_and_scatter(rng):
    table = rng.standard_normal((40, 16)).astype(np.float32)
    ids = rng.integers(-45, 45, (6, 5)).astype(np.int8)  # out-of-range ids: clamped / dropped
    pos = rng.integers(0, 40, (7,)).astype(np.uint8)

    def fn(table, ids, pos):
        rows = table[ids]
        taken = jnp.take(table, ids.astype(jnp.int16), axis=0, mode="fill", fill_value=-1.0)
        added = table.at[pos].add(1.0)
        return rows, taken, added, jax.lax.dynamic_slice_in_dim(table, pos[0], 3)

    _assert_same(fn, table, ids, pos)


def test_uint8_images_normalized_inside_a_cnn(rng):
    """A uint8 batch of images normalized in the function (the usual input pipeline of vision
    models), then a convolution and pooling."""
    images = rng.integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    kernel = (rng.standard_normal((3, 3, 3, 8)) / 5).astype(np.float32)

    def fn(images, kernel):
        x = images.astype(jnp.float32) / 255.0 - 0.5
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    want = jax.jit(fn)(images, kernel)
    got = jax.jit(ark.persistent(fn))(images, kernel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


def test_int8_weight_only_quantized_matmul_and_requantization(rng):
    """int8 weights with per-column scales (weight-only quantization) dequantized to bfloat16 for
    the matmul, and the activations requantized to int8 (round, saturate)."""
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, (32,)).astype(np.float32)

    def fn(x, w, scale):
        w_deq = (w.astype(jnp.float32) * scale).astype(jnp.bfloat16)
        y = jnp.dot(x.astype(jnp.bfloat16), w_deq, preferred_element_type=jnp.float32)
        amax = jnp.max(jnp.abs(y), axis=1, keepdims=True)
        q = jnp.clip(jnp.round(y / amax * 127.0), -127, 127).astype(jnp.int8)
        return y, q

    want_y, want_q = jax.jit(fn)(x, w, scale)
    got_y, got_q = jax.jit(ark.persistent(fn))(x, w, scale)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    assert got_q.dtype == np.int8
    # A rounding boundary may differ with the matmul's summation order: at most one step.
    assert np.abs(np.asarray(got_q, np.int32) - np.asarray(want_q, np.int32)).max() <= 1


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint16])
def test_collectives_of_narrow_integers_under_shard_map(mesh8, rng, dtype):
    """psum (wrapping), all_gather and pmax of narrow integers planned inside the kernel."""
    from jax.sharding import PartitionSpec as P

    x = _values(rng, dtype, (8 * 4, 16))

    def fn(x):
        return (
            jax.lax.psum(x * 3, "x"),
            jax.lax.all_gather(x, "x", tiled=True),
            jax.lax.pmax(x, "x"),
        )

    specs = dict(in_specs=P("x"), out_specs=(P(), P(), P()), check_vma=False)
    want = jax.jit(jax.shard_map(fn, mesh=mesh8, **specs))(x)
    got = jax.jit(jax.shard_map(ark.persistent(fn), mesh=mesh8, **specs))(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("float_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("int_dtype", [jnp.int16, jnp.uint16])
def test_16_bit_bitcasts_of_every_pattern(float_dtype, int_dtype):
    """bitcast_convert_type between 16-bit floats and integers, both ways, over all 65536 bit
    patterns: exact, except that a signalling NaN comes back quiet (a float register's rounding
    quiets it; its sign and top payload bits stay)."""
    quiet_bit = 0x40 if float_dtype == jnp.bfloat16 else 0x200
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    to_float = lambda x: jax.lax.bitcast_convert_type(x, float_dtype)  # noqa: E731
    to_int = lambda y: jax.lax.bitcast_convert_type(y, int_dtype)  # noqa: E731
    x = patterns.astype(int_dtype) if int_dtype == jnp.uint16 else patterns.view(np.int16)
    floats = jax.jit(to_float)(x)
    nan = np.isnan(np.asarray(floats, np.float32))
    signalling = nan & ((patterns & quiet_bit) == 0)
    expected = np.where(signalling, patterns | quiet_bit, patterns)
    got_floats = np.asarray(jax.jit(ark.persistent(to_float))(x)).view(np.uint16)
    np.testing.assert_array_equal(got_floats, expected)
    got_ints = np.asarray(jax.jit(ark.persistent(to_int))(floats))
    assert got_ints.dtype == np.dtype(int_dtype)
    np.testing.assert_array_equal(got_ints.view(np.uint16), expected)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_signbit_and_copysign_of_16_bit_floats(rng, dtype):
    """jnp.signbit / copysign of 16-bit floats bitcast them to int16: exact, signed zeros too."""
    x = (rng.standard_normal(200) * 3).astype(np.float32)
    x[:5] = [0.0, -0.0, np.inf, -np.inf, 1e-6]

    def fn(x):
        h = x.astype(dtype)
        return jnp.signbit(h), jnp.copysign(h, -h[::-1])

    (got_sign, got_copy), (want_sign, want_copy) = jax.jit(ark.persistent(fn))(x), jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(got_sign), np.asarray(want_sign))
    assert got_copy.dtype == want_copy.dtype
    np.testing.assert_array_equal(
        np.asarray(got_copy).view(np.uint16), np.asarray(want_copy).view(np.uint16)
    )


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.uint16, jnp.int32, jnp.uint32])
@pytest.mark.parametrize("length", [0, 7])
def test_bitwise_and_extremum_folds_including_empty_axes(rng, dtype, length):
    """reduce_and / or / xor / max / min: over an empty axis each is its identity at the dtype's
    width (and: all ones, max: the dtype's minimum)."""
    x = _values(rng, dtype, (5, length, 3)) if length else np.zeros((5, 0, 3), dtype)

    def fn(x):
        axes = (1,)
        return (
            jax.lax.reduce_and(x, axes), jax.lax.reduce_or(x, axes), jax.lax.reduce_xor(x, axes),
            jax.lax.reduce_max(x, axes), jax.lax.reduce_min(x, axes),
        )  # fmt: skip

    _assert_same(fn, x, gpu_plan=bool(length))


@pytest.mark.parametrize(
    ("lhs", "rhs", "depth"),
    [
        (jnp.int8, jnp.int8, 64),  # one float32 chunk
        (jnp.int8, jnp.int8, 2500),  # three chunks of 1,024 products, the last padded
        (jnp.uint8, jnp.uint8, 700),  # 65,025 per product: chunks of 258
        (jnp.int8, jnp.uint8, 1030),
        (jnp.int16, jnp.int8, 40),  # 2^22 per product: chunks of 4
    ],
)
def test_integer_matmuls_are_exact(rng, lhs, rhs, depth):
    """int8 x int8 -> int32 (a W8A8 quantized matmul's accumulators) and other 8-bit pairs, over
    the whole range of each dtype, with contractions long enough to need several exact float32
    chunks; equal to XLA's integer dot bit for bit, the GPU plan's interpretation too."""
    a, b = _values(rng, lhs, (6, depth)), _values(rng, rhs, (depth, 5))
    # One row and column of extremes: products of one sign whose running sums leave float32's
    # exact integers after 1,040 terms (random signs mostly cancel).
    a[1], b[:, 1] = np.iinfo(lhs).max, np.iinfo(rhs).max
    a[2], b[:, 2] = np.iinfo(lhs).max, np.iinfo(rhs).min

    def fn(a, b):
        return jax.lax.dot(a, b, preferred_element_type=jnp.int32)

    _assert_same(fn, a, b)


def test_integer_matmul_shapes_and_result_dtypes(rng):
    """Batched and multi-axis contractions, a result in the operands' own dtype (wrapping at 8
    bits, as XLA's), a float32 result, and booleans."""
    a, b = _values(rng, jnp.int8, (3, 4, 1500)), _values(rng, jnp.int8, (3, 1500, 5))
    c, d = _values(rng, jnp.int8, (4, 40, 50)), _values(rng, jnp.int8, (40, 50, 3))

    def fn(a, b, c, d):
        return (
            jnp.einsum("bij,bjk->bik", a, b, preferred_element_type=jnp.int32),
            jax.lax.dot_general(
                c, d, (((1, 2), (0, 1)), ((), ())), preferred_element_type=jnp.int32
            ),
            a[0] @ b[0],  # int8 result: the exact sum wrapped to 8 bits
            jax.lax.dot(a[1], b[1], preferred_element_type=jnp.float32),
            jax.lax.dot(a[2] > 0, b[2] > 0, preferred_element_type=jnp.int32),
        )

    _assert_same(fn, a, b, c, d)


def test_w8a8_quantized_linear_layer(rng):
    """Weights and activations both int8 (per-row activation scales, per-column weight scales):
    the int8 x int8 matmul accumulates exactly in int32, then one float32 rescale."""
    x = rng.standard_normal((16, 512)).astype(np.float32)
    w = rng.integers(-127, 128, (512, 64)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.02, (64,)).astype(np.float32)

    def fn(x, w, w_scale):
        x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
        xq = jnp.clip(jnp.round(x * (1.0 / x_scale)), -127, 127).astype(jnp.int8)
        acc = jax.lax.dot(xq, w, preferred_element_type=jnp.int32)
        return acc, acc.astype(jnp.float32) * x_scale * w_scale

    want_acc, want_y = jax.jit(fn)(x, w, w_scale)
    got_acc, got_y = jax.jit(ark.persistent(fn))(x, w, w_scale)
    np.testing.assert_array_equal(np.asarray(got_acc), np.asarray(want_acc))
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-6, atol=1e-6)


def test_wide_integer_matmuls_are_refused_by_name(rng):
    a = rng.integers(-5, 5, (4, 4)).astype(np.int32)
    with pytest.raises(ark.UnsupportedError, match=r"dot_general of int32 x int32 .*exactly"):
        ark.plan(lambda a, b: a @ b, a, a)


def test_integer_matmul_float_results_and_empty_contractions():
    """A float32 result of an integer matmul sums its chunks in float32: past 2^31 it does not
    wrap (XLA converts the operands and accumulates in float); an empty contraction is zeros."""
    numbers = (((1,), (0,)), ((), ()))

    def fn(a, b, c, d):
        return (
            jax.lax.dot_general(a, b, numbers, preferred_element_type=jnp.float32),
            jax.lax.dot_general(c, d, numbers, preferred_element_type=jnp.int32),
        )

    a, b = np.full((1, 1000), -128, np.int8), np.full((1000, 2), -32768, np.int16)
    c, d = np.zeros((3, 0), np.int8), np.zeros((0, 4), np.int8)
    _assert_same(fn, a, b, c, d)
