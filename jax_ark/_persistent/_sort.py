"""lax.sort inside ark.persistent (jnp.sort, jnp.argsort, lax.sort_key_val): a sort by ranks,
planned as two folds the executors already run, exact for every dtype.

Each element's rank along the sorted axis is how many elements sort before it: smaller keys, and
equal keys at lower positions (a stable sort). Element i then lands at position rank[i]: output
k is the one element whose rank is k, found by a max over the axis of its bits where the rank
matches. Both folds are O(L^2) per row: longer axes, and sorts by several keys, are radix sorts
(_radix.py).

Keys follow jax's comparator (lax._sort_lt_comparator): floats in total order with -0.0 equal to
+0.0 and every NaN equal and last; integers by value; bools False first. jnp.sort, argsort and
sort_key_val sort by one key and carry the other operands along.
"""

from __future__ import annotations

import math

import numpy as np

from jax_ark._persistent import _radix
from jax_ark._persistent._format import MAX_RANK
from jax_ark._persistent._trace import (
    _Builder,
    _convert,
    _Imm,
    _kind,
    _Node,
    _position,
    _reduce,
    _total_order_key,
    _translate,
)

# Longest axis sorted by ranks (two folds of L x L terms per row; longer ones: a radix sort,
# _radix.py). CPU executor, 2-core VM, argsort of 2 rows: ranks 4.8 ms vs radix 8.6 ms at 1024,
# 19 vs 14 ms at 2048. On a GPU the L x L terms are one parallel pass, the radix sort hundreds
# of dependent ones.
_RANK_SORT_MAX = {"cpu": 1536, "gpu": 4096}
_INT32_MIN = -(2**31)


def _key(b: _Builder, x: _Node) -> _Node:
    """int32 keys whose signed order is jax's sort order for x."""
    shape = x.shape
    if x.dtype == "bool":
        return _convert(b, x, "int32")
    if _kind(x.dtype) != "float":
        return _total_order_key(b, x)  # int32 itself, uint32 with the top bit flipped
    xf = _convert(b, x, "float32")
    zero = _Imm(shape, "float32", value=0.0)
    # -0.0 and +0.0 compare equal, and every NaN is one value past +inf (jax's comparator).
    xf = b.elementwise("select", [b.elementwise("eq", [xf, zero], shape, "bool"), xf, zero],
                       shape, "float32")  # fmt: skip
    nan = _Imm(shape, "float32", value=float("nan"))
    is_nan = b.elementwise("ne", [xf, xf], shape, "bool")
    xf = b.elementwise("select", [is_nan, xf, nan], shape, "float32")
    return _total_order_key(b, xf)


def _bits(b: _Builder, x: _Node) -> _Node:
    """x's value as int32 bits that _from_bits restores exactly."""
    if x.dtype == "int32":
        return x
    if x.dtype == "bool":
        return _convert(b, x, "int32")
    if x.dtype == "uint32":
        return b.elementwise("imov", [x], x.shape, "int32")
    return b.elementwise("bitcast", [_convert(b, x, "float32")], x.shape, "int32")


def _from_bits(b: _Builder, bits: _Node, dtype: str) -> _Node:
    if dtype == "int32":
        return bits
    if dtype == "uint32":
        return b.elementwise("imov", [bits], bits.shape, "uint32")
    if dtype == "bool":
        return _convert(b, bits, "bool")
    return _convert(b, b.elementwise("bitcast", [bits], bits.shape, "float32"), dtype)


def translate_sort(b: _Builder, params, args: list[_Node]) -> list[_Node]:
    dim = int(params["dimension"])
    num_keys = int(params["num_keys"])
    shape = tuple(args[0].shape)
    rank = len(shape)
    length = shape[dim] if shape else 1
    if length <= 1 or math.prod(shape) == 0:
        return list(args)
    # Ranks: one key, short axes, and a pair space of rank + 1 dims the format holds.
    if num_keys != 1 or length > _RANK_SORT_MAX[b.platform] or rank + 1 > MAX_RANK:
        closed = _radix.sort_jaxpr(args, dim, num_keys)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    # The sorted axis last; pairs (..., i, j) of its positions.
    perm = [d for d in range(rank) if d != dim] + [dim]
    back = tuple(int(p) for p in np.argsort(perm))
    lead = tuple(shape[d] for d in perm[:-1])
    line = (*lead, length)
    pair = (*lead, length, length)
    lead_dims = tuple(range(rank - 1))
    first, second = lead_dims + (rank - 1,), lead_dims + (rank,)  # a line's axis as i or as j

    key = b.materialize(_key(b, b.transpose(args[0], perm)))
    key_i, key_j = b.broadcast(key, pair, first), b.broadcast(key, pair, second)
    i, j = _position(b, pair, rank - 1), _position(b, pair, rank)
    earlier = b.elementwise(
        "mul",
        [b.elementwise("ieq", [key_j, key_i], pair, "bool"),
         b.elementwise("ilt", [j, i], pair, "bool")],
        pair, "bool",
    )  # fmt: skip
    before = b.elementwise(
        "max", [b.elementwise("ilt", [key_j, key_i], pair, "bool"), earlier], pair, "bool"
    )
    count = _convert(b, before, "int32")
    ranks = b.materialize(_reduce(b, "reduce_sum", count, (rank,), line, "int32"))

    # out[..., k] = the element whose rank is k: over pairs (..., k, i), its bits where rank[i]
    # is k, INT32_MIN elsewhere, folded by max (exactly one i matches).
    rank_i = b.broadcast(ranks, pair, second)
    hit = b.elementwise("ieq", [rank_i, _position(b, pair, rank - 1)], pair, "bool")
    floor = _Imm(pair, "int32", value=_INT32_MIN)
    outs = []
    for x in args:
        bits = b.materialize(_bits(b, b.transpose(x, perm)))
        picked = b.elementwise("select", [hit, floor, b.broadcast(bits, pair, second)], pair,
                               "int32")  # fmt: skip
        out = _reduce(b, "reduce_max", picked, (rank,), line, "int32")
        out = _from_bits(b, out, x.dtype)
        outs.append(b.transpose(out, back) if back != tuple(range(rank)) else out)
    return outs
