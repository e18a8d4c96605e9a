"""Sorts along long axes, sorts by several keys, and top_k of any k inside ark.persistent: a
least-significant-digit radix sort written in jax.numpy and planned like any jaxpr.

The rank sort of _sort.py compares all pairs of an axis (O(L^2)); a top-p sampler sorts a
vocabulary of 32,000 or more. Here each key becomes an integer whose unsigned order is jax's sort
order (lax._sort_lt_comparator: floats in total order with -0.0 equal to +0.0 and every NaN equal
and last), and one pass per bit, from the lowest, moves the elements whose bit is 0 before those
whose bit is 1, each group in its current order: a stable partition whose positions come from one
running count of the 1 bits (a blocked cumsum, _prefix.py) and which is applied by a scatter of
distinct positions (a scatter fold). After the passes of every key, least significant key first,
the permutation gathers each operand: exact for every dtype, stable as lax.sort. Work per pass
O(L * 8); passes: the key's width (32 for float32 / int32, 16 for bfloat16 and 16-bit integers,
19 for float16, 8 for 8-bit integers, 1 for bool).

top_k(x, k) for a k too large for _trace._top_k's k rounds: a radix select (see top_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr

from jax_ark._persistent._algorithm import jaxpr_over

_INT32_MIN = np.int32(-(2**31))


def _unsigned_order_key(x, sort_order: bool = True) -> tuple[jax.Array, int, int]:
    """(key, lo, hi): int32 keys whose order as unsigned 32-bit patterns is jax's sort order for
    x, and the bits [lo, hi) in which two keys can differ (the passes a radix sort needs).
    sort_order=False: for floats, XLA's total order of top_k instead (-NaN < -inf < ... < -0.0 <
    +0.0 < ... < +inf < +NaN, NaNs by payload)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(jnp.int32), 0, 1
    if jnp.issubdtype(dtype, jnp.floating):
        f = x.astype(jnp.float32)
        if sort_order:
            f = jnp.where(f == 0, jnp.float32(0.0), f)  # -0.0 sorts with +0.0
            f = jnp.where(jnp.isnan(f), jnp.float32(np.nan), f)  # every NaN one value, last
        bits = lax.bitcast_convert_type(f, jnp.int32)
        signed = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # signed order = total order
        # The float32 image of a 16-bit float leaves its low mantissa bits 0 (all 1 for a
        # negative one, once flipped): equal in every key of one sign, so no pass reads them.
        lo = {"bfloat16": 16, "float16": 13}.get(dtype.name, 0)
        return signed ^ _INT32_MIN, lo, 32
    width = 8 * dtype.itemsize
    if width == 32:
        if jnp.issubdtype(dtype, jnp.signedinteger):
            return x ^ _INT32_MIN, 0, 32
        return lax.bitcast_convert_type(x, jnp.int32), 0, 32
    if jnp.issubdtype(dtype, jnp.signedinteger):  # offset into [0, 2^width)
        return x.astype(jnp.int32) + np.int32(2 ** (width - 1)), 0, width
    return x.astype(jnp.int32), 0, width


def _stable_partition_pass(bit_index, carry):
    """One radix pass over the last axis: elements whose bit `bit_index` is 0 first, then those
    whose bit is 1, each group in its current order. carry: (keys, perm), both (rows, L) int32 in
    the current order; perm holds each element's original position."""
    keys, perm = carry
    rows, length = keys.shape
    bit = (keys >> bit_index) & 1
    ones_through = jnp.cumsum(bit, axis=-1, dtype=jnp.int32)
    ones_before = ones_through - bit
    zeros = length - ones_through[:, -1:]
    position = jnp.arange(length, dtype=jnp.int32)
    to = jnp.where(bit == 1, zeros + ones_before, position - ones_before)
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    moved = (
        jnp.zeros((rows, length, 2), jnp.int32)
        .at[row, to]
        .set(jnp.stack([keys, perm], axis=-1), unique_indices=True, mode="promise_in_bounds")
    )
    return moved[..., 0], moved[..., 1]


def _sorting_permutation(keys: list) -> jax.Array:
    """The stable sorting permutation of (rows, L) arrays, by keys[0], then keys[1], ..."""
    rows, length = keys[0].shape
    perm = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    for key in reversed(keys):  # least significant key first: each pass is stable
        ordered, lo, hi = _unsigned_order_key(key)
        ordered = jnp.take_along_axis(ordered, perm, axis=-1)
        _, perm = lax.fori_loop(lo, hi, _stable_partition_pass, (ordered, perm))
    return perm


def _rows(x, axis: int):
    """x with `axis` last and the others flattened into rows, and the function undoing that."""
    moved = jnp.moveaxis(x, axis, -1)
    lead = moved.shape[:-1]

    def back(y):
        return jnp.moveaxis(y.reshape(*lead, y.shape[-1]), -1, axis)

    return moved.reshape(-1, moved.shape[-1]), back


def sort(operands, dimension: int, num_keys: int) -> list:
    """lax.sort(operands, dimension, is_stable=True, num_keys)."""
    rows = [_rows(x, dimension) for x in operands]
    perm = _sorting_permutation([r for r, _ in rows[:num_keys]])
    return [back(jnp.take_along_axis(r, perm, axis=-1)) for r, back in rows]


# Bits of the k-th largest key found per step of the radix select (2^bits - 1 candidates counted
# per step, 32 / bits dependent steps). CPU executor, top_k(40) of 2 rows: 1 bit 0.31 ms (512
# logits) / 14.3 ms (32,000), 2 bits 0.37 / 17.8, 4 bits 0.60 / 32.5. On a GPU fewer, wider
# steps may win: not measured.
_SELECT_BITS = 1


def _kth_largest(signed, k: int):
    """Per row, the k-th largest of int32 keys: the largest t with at least k keys >= t, built
    _SELECT_BITS at a time from the top (in the unsigned image of the keys, where larger digits
    make a larger t). The counts fall as the digit grows, so the number of digits whose count
    reaches k is the largest such digit."""
    digits = jnp.arange(1, 2**_SELECT_BITS, dtype=jnp.int32)

    def next_digit(i, threshold):
        shift = 32 - _SELECT_BITS * (i + 1)
        candidates = threshold[:, None] | lax.shift_left(digits, shift)[None, :]
        above = signed[:, None, :] >= (candidates ^ _INT32_MIN)[:, :, None]
        counts = jnp.sum(above, axis=-1, dtype=jnp.int32)
        digit = jnp.sum(counts >= k, axis=-1, dtype=jnp.int32)
        return threshold | lax.shift_left(digit, shift)

    steps = 32 // _SELECT_BITS
    unsigned = lax.fori_loop(0, steps, next_digit, jnp.zeros(signed.shape[:1], jnp.int32))
    return unsigned ^ _INT32_MIN


def top_k(x, k: int, axis: int) -> list:
    """lax.top_k(x, k) along `axis`: (values, int32 indices), largest first, ties to the lower
    index (XLA's total order for floats). A radix select, not a sort: the k-th largest key t
    (32 counting passes), the keys > t and the first ties of t up to k, compacted in index order
    by a running count and a scatter, then only those k sorted (by the complemented key: stable,
    so ties stay in index order)."""
    r, back = _rows(x, axis)
    ordered, _, _ = _unsigned_order_key(r, sort_order=False)
    signed = ordered ^ _INT32_MIN  # signed order = XLA's order
    rows, length = signed.shape
    kth = _kth_largest(signed, k)[:, None]
    above, tie = signed > kth, signed == kth
    ties_wanted = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    chosen = above | (tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= ties_wanted))
    slot = jnp.where(chosen, jnp.cumsum(chosen, axis=-1, dtype=jnp.int32) - 1, k)  # k: dropped
    position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    picked = (
        jnp.zeros((rows, k, 2), jnp.int32)
        .at[row, slot]
        .set(jnp.stack([~signed, position], axis=-1), mode="drop")
    )
    _, index = lax.sort((picked[..., 0], picked[..., 1]), dimension=1, num_keys=1)
    return [back(jnp.take_along_axis(r, index, axis=-1)), back(index)]


def exact_top_k(x, k: int, axis: int, largest: bool) -> list:
    """lax.approx_max_k / approx_min_k answered exactly (recall 1, as XLA does on CPU and GPU):
    the k largest (smallest) along `axis` in XLA's total order, ties to the lower index (XLA's
    min_k leaves the order of ties unspecified), NaNs last for the smallest."""
    r, back = _rows(x, axis)
    if largest:
        values, index = lax.top_k(r, k)
        return [back(values), back(index)]
    ranked = r
    if jnp.issubdtype(r.dtype, jnp.floating):  # XLA's min_k ranks every NaN last, as +NaN
        ranked = jnp.where(jnp.isnan(r), jnp.asarray(np.nan, r.dtype), r)
    ordered, _, _ = _unsigned_order_key(ranked, sort_order=False)
    _, index = lax.top_k(~(ordered ^ _INT32_MIN), k)  # the signed order, reversed
    return [back(jnp.take_along_axis(r, index, axis=-1)), back(index)]


def approx_top_k_jaxpr(x, params) -> ClosedJaxpr:
    k, axis, largest = int(params["k"]), int(params["reduction_dimension"]), params["is_max_k"]
    return jaxpr_over(lambda v: exact_top_k(v, k, axis % len(x.shape), bool(largest)), [x])


def sort_jaxpr(operands, dimension: int, num_keys: int) -> ClosedJaxpr:
    """The radix sort's jaxpr over the operands' shapes and dtypes."""
    return jaxpr_over(lambda *xs: sort(xs, dimension, num_keys), operands)


def top_k_jaxpr(x, k: int, axis: int) -> ClosedJaxpr:
    """The radix select's jaxpr for an operand of x's shape and dtype."""
    return jaxpr_over(lambda v: top_k(v, k, axis), [x])
