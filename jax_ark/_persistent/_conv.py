"""Convolutions and pooling inside ark.persistent: windowed reads planned as the tile ops the
executors already run.

- `conv_general_dilated` (flax / equinox Conv, and the transposed convolutions of its gradients)
  is an im2col gather followed by ONE matmul: the gather reads, for every output position and
  kernel tap, the input element under the tap (zero outside the padded input, holes of an
  `lhs_dilation`), into a (groups, positions, taps x channels) tensor; the matmul contracts it with
  the kernel. Any dimension numbers, strides, padding, dilations, feature or batch groups.
- `reduce_window_sum / _max / _min` (avg_pool / max_pool / min_pool) is a REDUCE over the window's
  taps whose prologue reads each tap where it lies (the fold's identity outside the input, as the
  padding XLA applies), so no window tensor is written.

Floats sum in their own order (taps, then channels, ascending), not XLA's: results match jax.jit
to float tolerance, integers (pooling) exactly.
"""

from __future__ import annotations

import dataclasses
import math

from jax_ark._persistent._format import MAX_PROGRAM_LEN, MAX_RANK
from jax_ark._persistent._trace import (
    UnsupportedError,
    _and,
    _as_load,
    _Builder,
    _Ew,
    _Imm,
    _iop,
    _kind,
    _Load,
    _load_at,
    _Node,
    _position,
    _reduce,
    _reduce_identity,
    _reduce_kind,
    _sum_offsets,
    matmul,
)

# Instructions left free below MAX_PROGRAM_LEN for what a consumer fuses after a gather (a REDUCE's
# negation, a store's conversion).
_PROGRAM_HEADROOM = 8

REDUCE_WINDOW = {
    "reduce_window_sum": "reduce_sum",
    "reduce_window_max": "reduce_max",
    "reduce_window_min": "reduce_min",
}


class _Space:
    """An iteration space of named logical dims laid out row-major, folded into at most MAX_RANK
    plan dims: leading logical dims share one plan dim when there are too many (an im2col of a 2-D
    grouped or a 3-D convolution has 7-8), each coordinate then recovered with an integer divide
    and remainder."""

    def __init__(self, b: _Builder, dims: list[int]):
        self.b, self.logical = b, list(dims)
        merged = max(0, len(dims) - MAX_RANK)  # the first merged + 1 logical dims fold into one
        self.shape = (math.prod(dims[: merged + 1]), *dims[merged + 1 :])
        self._merged = merged
        self._coords: dict[int, _Node] = {}

    def coord(self, d: int) -> _Node:
        """Logical dim d's coordinate, an int32 node over `shape` (one node per dim, so a program
        computes it once)."""
        if d not in self._coords:
            self._coords[d] = self._coord(d)
        return self._coords[d]

    def _coord(self, d: int) -> _Node:
        b, merged = self.b, self._merged
        if d > merged:
            return _position(b, self.shape, d - merged)
        t = _position(b, self.shape, 0)
        inner = math.prod(self.logical[d + 1 : merged + 1])
        if inner > 1:
            t = _iop(b, "idiv", t, inner)
        if d > 0:
            t = _iop(b, "irem", t, self.logical[d])
        return t


def _window_index(
    b: _Builder,
    out: _Node,
    out_size: int,
    tap: _Node | None,
    taps: int,
    stride: int,
    tap_dilation: int,
    low: int,
    base_dilation: int,
    size: int,
) -> tuple[_Node, _Node | None]:
    """(index into an input dim, in-range predicate or None) of the element under tap `tap` of
    output position `out`: t = out * stride + tap * tap_dilation - low in the base-dilated, padded
    input; a real element where t is a multiple of base_dilation and t / base_dilation lies in
    [0, size). Checks that cannot fail are left out (the bounds of t are known from the sizes), so
    an unpadded window costs no compare."""
    t = out
    if stride != 1:
        t = _iop(b, "imul", t, stride)
    if tap is not None and taps > 1:
        t = _iop(b, "iadd", t, _iop(b, "imul", tap, tap_dilation))
    if low:
        t = _iop(b, "isub", t, low)
    t_min = -low
    t_max = (out_size - 1) * stride + (taps - 1) * tap_dilation - low
    inside = None
    if base_dilation > 1:
        inside = _iop(b, "ieq", _iop(b, "irem", t, base_dilation), 0)
        t = _iop(b, "idiv", t, base_dilation)
    # The same bounds checked on t // base_dilation (exact where t is a multiple). An index
    # outside is not clamped: LOAD_AT clamps the element offset into the tensor (plan format) and
    # the select drops what it read.
    below = t_min < 0
    above = t_max > (size - 1) * base_dilation
    if below and above:  # 0 <= t < size as one unsigned compare
        inside = _and(b, inside, _iop(b, "ult", t, size))
    elif below:
        inside = _and(b, inside, _iop(b, "ige", t, 0))
    elif above:
        inside = _and(b, inside, _iop(b, "ilt", t, size))
    return t, inside


def _gather_windows(b: _Builder, x: _Load, shape: tuple[int, ...], index_of: list, fill) -> _Node:
    """x[index_of[0], index_of[1], ...] over the iteration space `shape`, `fill` where a window
    index is outside the input: index_of[d] is (x's dim d index, in-range predicate or None)."""
    terms, inside = [], None
    for d, (index, ok) in enumerate(index_of):
        if ok is not None:
            inside = _and(b, inside, ok)
        if x.shape[d] > 1:
            terms.append(_iop(b, "imul", index, x.strides[d]))
    base = _Load(
        shape, x.dtype, x.tensor, x.offset, (0,) * len(shape), x.iter_stride, x.outer_iter_stride
    )
    value = _load_at(base, _sum_offsets(b, terms))
    if inside is None:
        return value
    fill_node = _Imm(shape, x.dtype, value=fill)
    # One program when its distinct instructions fit: the builder's size bound counts a shared
    # index (a tap's position feeds its offset and its bound check) once per use and would split
    # the gather into a value pass and a select pass.
    node = _Ew(shape, x.dtype, op="select", args=(inside, fill_node, value))
    size = _distinct_instructions(node)
    if size <= MAX_PROGRAM_LEN - _PROGRAM_HEADROOM:
        return dataclasses.replace(node, _size=size)
    return b.elementwise("select", [inside, fill_node, value], shape, x.dtype)


def _distinct_instructions(node: _Node) -> int:
    """The instructions of node's program: its distinct nodes, keyed as the program compiler
    shares them (views and constants by value, computed nodes by identity)."""
    seen: set = set()

    def walk(n: _Node) -> None:
        if isinstance(n, _Load):
            key = ("load", n.tensor, n.offset, n.strides, n.shape, n.dtype, n.iter_stride)
        elif isinstance(n, _Imm):
            key = ("const", n.value, n.dtype)
        else:
            key = ("node", id(n))
        if key in seen:
            return
        seen.add(key)
        for a in getattr(n, "args", ()):
            walk(a)

    walk(node)
    return len(seen)


def translate_conv(b: _Builder, params, args: list[_Node], out_shape, out_dtype: str) -> _Node:
    lhs, rhs = args
    if _kind(lhs.dtype) != "float" or _kind(rhs.dtype) != "float":
        raise UnsupportedError(
            f"ark.persistent: conv_general_dilated of {lhs.dtype} x {rhs.dtype} (only float "
            f"operands) at {b.source}"
        )
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    spatial = len(lhs_spec) - 2
    feature_groups = int(params["feature_group_count"])
    batch_groups = int(params["batch_group_count"])
    groups = feature_groups * batch_groups  # XLA allows only one of them above 1
    n_batch = lhs.shape[lhs_spec[0]] // batch_groups
    in_group = rhs.shape[rhs_spec[1]]  # input channels per feature group
    out_features = rhs.shape[rhs_spec[0]]
    taps = tuple(rhs.shape[d] for d in rhs_spec[2:])
    out_sp = tuple(out_shape[d] for d in out_spec[2:])
    if math.prod(out_shape) == 0:
        return _Imm(tuple(out_shape), out_dtype, value=0.0)
    if math.prod(lhs.shape) == 0 or math.prod(taps) * in_group == 0:
        return _Imm(tuple(out_shape), out_dtype, value=0.0)  # an empty sum per element

    # im2col: cols[g, n, *out, *taps, c] = the input element under tap `taps` of output `out`.
    x = _as_load(b, lhs)
    space = _Space(b, [groups, n_batch, *out_sp, *taps, in_group])
    shape = space.shape
    index_of: list = [None] * len(lhs.shape)
    n = space.coord(1)
    if batch_groups > 1:  # group g reads batch rows g * n_batch + n
        n = _iop(b, "iadd", n, _iop(b, "imul", space.coord(0), n_batch))
    index_of[lhs_spec[0]] = (n, None)
    c = space.coord(2 + 2 * spatial)
    if feature_groups > 1:  # group g reads channels g * in_group + c
        c = _iop(b, "iadd", c, _iop(b, "imul", space.coord(0), in_group))
    index_of[lhs_spec[1]] = (c, None)
    for i in range(spatial):
        index_of[lhs_spec[2 + i]] = _window_index(
            b,
            space.coord(2 + i),
            out_sp[i],
            space.coord(2 + spatial + i),
            taps[i],
            stride=int(params["window_strides"][i]),
            tap_dilation=int(params["rhs_dilation"][i]),
            low=int(params["padding"][i][0]),
            base_dilation=int(params["lhs_dilation"][i]),
            size=lhs.shape[lhs_spec[2 + i]],
        )
    cols = _gather_windows(b, x, shape, index_of, 0.0)
    positions, depth = n_batch * math.prod(out_sp), math.prod(taps) * in_group
    cols = b.reshape(cols, (groups, positions, depth))

    # The kernel as (taps x channels, groups, features per group): output feature f of group g
    # is g * (out_features / groups) + f, as XLA splits the kernel's output features.
    w = b.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    per_group = out_features // groups
    w = b.reshape(w, (depth, groups, per_group))
    y = matmul(
        b,
        [cols, w],
        (((2,), (0,)), ((0,), (1,))),
        (groups, positions, per_group),
        out_dtype,
        "conv_general_dilated",
    )
    # -> (n, *out, features), then the output's dimension order.
    if groups > 1:
        y = b.transpose(y, (1, 0, 2))
    y = b.reshape(y, (n_batch, *out_sp, out_features))
    order = [0] * len(out_shape)  # output dim -> y dim
    order[out_spec[0]] = 0
    order[out_spec[1]] = spatial + 1
    for i in range(spatial):
        order[out_spec[2 + i]] = 1 + i
    if order != list(range(len(order))):
        y = b.transpose(y, order)
    return y


def translate_reduce_window(
    b: _Builder, prim: str, params, args: list[_Node], out_shape, out_dtype: str
) -> _Node:
    (x,) = args
    reduce_prim = REDUCE_WINDOW[prim]
    kind = _reduce_kind(reduce_prim, x.dtype)
    window = tuple(int(w) for w in params["window_dimensions"])
    rank = len(x.shape)
    if math.prod(out_shape) == 0:
        return _Imm(tuple(out_shape), out_dtype, value=0)
    fill = _reduce_identity(kind, out_dtype)
    if math.prod(x.shape) == 0 or math.prod(window) == 0:
        return _Imm(tuple(out_shape), out_dtype, value=fill)
    # The taps as trailing dims of the iteration space: (*out, *window taps > 1), reduced over.
    tap_dims = [d for d in range(rank) if window[d] > 1]
    if len(tap_dims) >= MAX_RANK:
        raise UnsupportedError(
            f"ark.persistent: {prim} over {len(tap_dims)} window dims (at most {MAX_RANK - 1}) "
            f"at {b.source}"
        )
    space = _Space(b, [*out_shape, *(window[d] for d in tap_dims)])
    shape = space.shape
    src = _as_load(b, x)
    index_of = [
        _window_index(
            b,
            space.coord(d),
            out_shape[d],
            space.coord(rank + tap_dims.index(d)) if d in tap_dims else None,
            window[d],
            stride=int(params["window_strides"][d]),
            tap_dilation=int(params["window_dilation"][d]),
            low=int(params["padding"][d][0]),
            base_dilation=int(params["base_dilation"][d]),
            size=x.shape[d],
        )
        for d in range(rank)
    ]
    taps = _gather_windows(b, src, shape, index_of, fill)
    if not tap_dims:  # a 1-element window: a strided (maybe padded) view of x
        return taps
    # The taps are the trailing plan dims: merging folds only leading (output) dims.
    reduced = len(shape) - len(tap_dims)
    out = _reduce(
        b, reduce_prim, taps, tuple(range(reduced, len(shape))), shape[:reduced], out_dtype
    )
    out = b.reshape(out, tuple(out_shape))
    out.core.name = prim
    return out
