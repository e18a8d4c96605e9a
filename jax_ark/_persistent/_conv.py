"""Convolutions, pooling and padding inside ark.persistent: windowed reads planned as the tile
ops the executors already run.

A window's taps sit at affine positions of the padded input (tap k of output o at o * stride +
k * dilation), so after one pad pass (lax.pad: `pad_node`, bound checks only on the dims that
pad) every window read is a strided VIEW, with no index arithmetic per element:

- `conv_general_dilated` (flax / equinox Conv, depthwise, 1-D to 3-D, and the transposed
  convolutions of its gradients: any dimension numbers, strides, padding, dilations, feature or
  batch groups) is one copy of the im2col view, (groups, positions, taps x channels), and ONE
  matmul with the kernel. Past MAX_RANK view dims (a 3-D or a grouped 2-D convolution) the
  im2col is gathered through computed indices instead (LOAD_AT, leading dims folded: _Space).
- `reduce_window_sum / _max / _min` (avg_pool / max_pool / min_pool) is a REDUCE over the taps of
  the view of the input padded with the fold's identity (XLA's padding value).
- `select_and_scatter_add` (the gradient of max / min pooling): a window argmax, then either one
  pass over stride-0 views where the windows tile the input, or a REDUCE over the taps.

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
    reach = (taps - 1) * tap_dilation  # negative when the taps walk backwards (a transpose)
    t_min = min(0, reach) - low
    t_max = (out_size - 1) * stride + max(0, reach) - low
    inside = None
    if base_dilation > 1 and base_dilation & (base_dilation - 1) == 0:
        # A power of two (a stride-2 gradient's holes): a mask and a shift, not a division (no
        # SIMD integer divide on the CPU). t & (d - 1) == 0 exactly when d divides t, negative t
        # too; the shift floors where the division truncates, which differs only off the grid.
        inside = _iop(b, "ieq", _iop(b, "and", t, base_dilation - 1), 0)
        t = _iop(b, "shra", t, base_dilation.bit_length() - 1)
    elif base_dilation > 1:
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
    """x[index_of[0], index_of[1], ...] over the iteration space `shape`, `fill` (a scalar or a
    scalar node) where a window index is outside the input: index_of[d] is (x's dim d index,
    in-range predicate or None)."""
    terms, inside = [], None
    for d, (index, ok) in enumerate(index_of):
        if ok is not None:
            inside = _and(b, inside, ok)
        if x.shape[d] > 1:
            terms.append(index if x.strides[d] == 1 else _iop(b, "imul", index, x.strides[d]))
    base = _Load(
        shape, x.dtype, x.tensor, x.offset, (0,) * len(shape), x.iter_stride, x.outer_iter_stride
    )
    value = _load_at(base, _sum_offsets(b, terms))
    if inside is None:
        return value
    if isinstance(fill, _Node):
        fill_node = b.broadcast(fill, shape, ()) if fill.shape != shape else fill
    else:
        fill_node = _Imm(shape, x.dtype, value=fill)
    return _fused(b, "select", [inside, fill_node, value], shape, x.dtype)


def _fused(b: _Builder, op: str, args: list[_Node], shape, dtype: str) -> _Node:
    """b.elementwise(op, args), kept one program when its distinct instructions fit: the
    builder's size bound counts a shared index (a tap's position feeds its offset and its bound
    check) once per use and would split a gather into a value pass and a select pass."""
    node = _Ew(tuple(shape), dtype, op=op, args=tuple(args))
    size = _distinct_instructions(node)
    if size <= MAX_PROGRAM_LEN - _PROGRAM_HEADROOM:
        return dataclasses.replace(node, _size=size)
    return b.elementwise(op, args, shape, dtype)


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


def pad_node(b: _Builder, x: _Node, pads, fill) -> _Node:
    """lax.pad: x padded by (low, high, interior) per dim with `fill` (a scalar or a scalar
    node; negative low / high crop), as one elementwise node whose bound checks cover only the
    dims that pad. A pure crop is a slice (a view)."""
    pads = [(int(lo), int(hi), int(interior)) for lo, hi, interior in pads]
    if all(interior == 0 and lo <= 0 and hi <= 0 for lo, hi, interior in pads):
        start = [-lo for lo, _, _ in pads]
        limit = [n + hi for n, (_, hi, _) in zip(x.shape, pads, strict=True)]
        return b.slice(x, start, limit, None)
    shape = tuple(
        n + lo + hi + max(0, n - 1) * interior
        for n, (lo, hi, interior) in zip(x.shape, pads, strict=True)
    )
    index_of = [
        _window_index(b, _position(b, shape, d), shape[d], None, 1, 1, 1, lo, interior + 1, n)
        for d, (n, (lo, _hi, interior)) in enumerate(zip(x.shape, pads, strict=True))
    ]
    return _gather_windows(b, _as_load(b, x), shape, index_of, fill)


def _padded(b: _Builder, x: _Node, pads: list[tuple[int, int, int]], fill) -> _Load:
    """pad_node in memory (x itself when nothing pads), emitted once per input, pads and fill (a
    pooling and its gradient pad the same input)."""
    if all(p == (0, 0, 0) for p in pads):
        return _as_load(b, x)
    src = _as_load(b, x)
    key = (src.tensor, src.offset, src.strides, src.shape, src.iter_stride, tuple(pads), fill)
    cached = b.padded.get(key)
    # Reused only while no op has written the source since (an in-place update may rewrite a
    # tensor under the same id).
    if cached is None or any(op.out == src.tensor for op in b.ops[cached[1] :]):
        b.padded[key] = (_as_load(b, pad_node(b, src, pads, fill)), len(b.ops))
    return b.padded[key][0]


def _window_view(xp: _Load, dims: list[tuple[int, int]]) -> _Load | None:
    """The view of xp with (size, element stride) dims, its unit dims dropped; None when more
    than MAX_RANK dims remain (the caller then gathers with computed indices)."""
    kept = [(n, st) for n, st in dims if n != 1]
    if len(kept) > MAX_RANK:
        return None
    return _Load(
        tuple(n for n, _ in kept),
        xp.dtype,
        xp.tensor,
        xp.offset,
        tuple(st for _, st in kept),
        xp.iter_stride,
        xp.outer_iter_stride,
    )


def _im2col_view(
    b, lhs, params, lhs_spec, groups, n_batch, in_group, out_sp, taps
) -> tuple[_Load | None, bool]:
    """The im2col as a strided view of the padded (and lhs-dilated) input: the element under tap
    k of output o sits at o * stride + k * rhs_dilation there, an affine index, so the im2col is
    one copy of a view (no index arithmetic per element). (None, False) past MAX_RANK dims.

    The view is (group, n, *out, *taps, c), positions by depth, unless c is strided and n is
    the input's contiguous dim (a kernel gradient: n is the input's channels, c its batch); then
    (group, *taps, c, *out, n), depth by positions, so the copy reads and writes contiguous runs
    (the matmul reads it as a transposed operand). The flag says which."""
    spatial = len(out_sp)
    if sum(n != 1 for n in (groups, n_batch, *out_sp, *taps, in_group)) > MAX_RANK:
        return None, False
    pads = [(0, 0, 0)] * len(lhs.shape)
    for i in range(spatial):
        lo, hi = (int(p) for p in params["padding"][i])
        pads[lhs_spec[2 + i]] = (lo, hi, int(params["lhs_dilation"][i]) - 1)
    xp = _padded(b, lhs, pads, 0.0)
    st = xp.strides
    batch_stride, feature_stride = st[lhs_spec[0]], st[lhs_spec[1]]
    # group g reads batch rows g * n_batch + n (batch groups) or channels g * in_group + c
    group_stride = (
        n_batch * batch_stride
        if int(params["batch_group_count"]) > 1
        else (in_group * feature_stride)
    )
    outs = [
        (out_sp[i], int(params["window_strides"][i]) * st[lhs_spec[2 + i]]) for i in range(spatial)
    ]
    tap_dims = [
        (taps[i], int(params["rhs_dilation"][i]) * st[lhs_spec[2 + i]]) for i in range(spatial)
    ]
    transposed = in_group > 1 and feature_stride != 1 and n_batch > 1 and batch_stride == 1
    if transposed:
        dims = [(groups, group_stride), *tap_dims, (in_group, feature_stride), *outs]
        dims.append((n_batch, batch_stride))
    else:
        dims = [(groups, group_stride), (n_batch, batch_stride), *outs, *tap_dims]
        dims.append((in_group, feature_stride))
    return _window_view(xp, dims), transposed


def _im2col_gather(b, lhs, params, lhs_spec, groups, n_batch, in_group, out_sp, taps) -> _Node:
    """The im2col read element by element through computed indices (LOAD_AT), for iteration
    spaces of more than MAX_RANK dims (folded by _Space): a 3-D or a grouped 2-D convolution."""
    spatial = len(out_sp)
    batch_groups = int(params["batch_group_count"])
    feature_groups = int(params["feature_group_count"])
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
    return _gather_windows(b, _as_load(b, lhs), shape, index_of, 0.0)


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
    if math.prod(out_shape) == 0 or math.prod(lhs.shape) == 0 or math.prod(taps) * in_group == 0:
        return _Imm(tuple(out_shape), out_dtype, value=0.0)  # nothing, or an empty sum each

    # im2col: cols[g, n, *out, *taps, c] = the input element under tap `taps` of output `out`.
    positions, depth = n_batch * math.prod(out_sp), math.prod(taps) * in_group
    cols, transposed = _im2col_view(
        b, lhs, params, lhs_spec, groups, n_batch, in_group, out_sp, taps
    )
    if cols is None:
        cols = _im2col_gather(b, lhs, params, lhs_spec, groups, n_batch, in_group, out_sp, taps)
    if transposed:  # (groups, depth, positions), positions ordered (*out, n)
        cols = b.reshape(b.materialize(cols), (groups, depth, positions))
        contract = (((1,), (0,)), ((0,), (1,)))
    else:
        cols = b.reshape(b.materialize(cols), (groups, positions, depth))
        contract = (((2,), (0,)), ((0,), (1,)))

    # The kernel as (taps x channels, groups, features per group): output feature f of group g
    # is g * (out_features / groups) + f, as XLA splits the kernel's output features.
    w = b.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    per_group = out_features // groups
    w = b.reshape(w, (depth, groups, per_group))
    y = matmul(
        b, [cols, w], contract, (groups, positions, per_group), out_dtype, "conv_general_dilated"
    )
    # -> (n, *out, features) or (*out, n, features), then the output's dimension order.
    if groups > 1:
        y = b.transpose(y, (1, 0, 2))
    n_at, out_at = (spatial, 0) if transposed else (0, 1)
    rows = (*out_sp, n_batch) if transposed else (n_batch, *out_sp)
    y = b.reshape(y, (*rows, out_features))
    order = [0] * len(out_shape)  # output dim -> y dim
    order[out_spec[0]] = n_at
    order[out_spec[1]] = spatial + 1
    for i in range(spatial):
        order[out_spec[2 + i]] = out_at + i
    if order != list(range(len(order))):
        y = b.transpose(y, order)
    return y


def _pool_view(b, x, params, out_shape, tap_dims, fill) -> _Load | None:
    """The pooling windows as a strided view (*out, *taps) of x padded with the fold's identity
    (base dilation as interior padding): tap k of output o sits at o * stride + k * dilation."""
    rank = len(x.shape)
    pads = [
        (int(lo), int(hi), int(params["base_dilation"][d]) - 1)
        for d, (lo, hi) in enumerate(params["padding"])
    ]
    xp = _padded(b, x, pads, fill)
    dims = [(out_shape[d], int(params["window_strides"][d]) * xp.strides[d]) for d in range(rank)]
    dims += [
        (int(params["window_dimensions"][d]), int(params["window_dilation"][d]) * xp.strides[d])
        for d in tap_dims
    ]
    return _window_view(xp, dims)


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
    if not tap_dims:  # a 1-element window: a strided (maybe padded) view of x
        return b.reshape(_pool_view(b, x, params, out_shape, tap_dims, fill), tuple(out_shape))
    if sum(n != 1 for n in out_shape) + len(tap_dims) <= MAX_RANK:
        taps = _pool_view(b, x, params, out_shape, tap_dims, fill)
    else:  # each tap read through computed indices (LOAD_AT), leading (output) dims folded
        taps = _gathered_pool_taps(b, x, params, out_shape, tap_dims, fill)
    return _fold_taps(b, reduce_prim, taps, len(tap_dims), out_shape, out_dtype, prim)


def _fold_taps(b, reduce_prim, taps: _Node, n_taps: int, out_shape, out_dtype, name) -> _Node:
    """The REDUCE over the trailing n_taps dims of `taps` (a window's taps: its leading dims, maybe
    folded or without their unit dims, are the outputs), reshaped to out_shape."""
    kept = len(taps.shape) - n_taps
    axes = tuple(range(kept, len(taps.shape)))
    out = b.reshape(_reduce(b, reduce_prim, taps, axes, taps.shape[:kept], out_dtype), out_shape)
    out.core.name = name
    return out


def _gathered_pool_taps(b, x, params, out_shape, tap_dims, fill) -> _Node:
    """The pooling windows as computed-index loads over (*out, *taps > 1), for iteration spaces
    past MAX_RANK dims (_Space folds the leading output dims)."""
    rank = len(x.shape)
    window = tuple(int(w) for w in params["window_dimensions"])
    space = _Space(b, [*out_shape, *(window[d] for d in tap_dims)])
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
    return _gather_windows(b, src, space.shape, index_of, fill)


def translate_select_and_scatter_add(
    b: _Builder, params, args: list[_Node], out_shape, out_dtype: str
) -> _Node:
    """The gradient of max / min pooling: each window's cotangent goes to the element the window
    selected (the first maximum, XLA's `ge` select; the first minimum for `le`). Planned as an
    argmax over each window (a REDUCE over a strided view of the padded operand), then, per
    operand element, a REDUCE over the taps: the windows covering the element whose choice was
    that tap add their cotangent. Padding is the fold's identity, so it loses to any real element
    (XLA never selects padding; an input window of only -inf may differ)."""
    source, operand = args
    select = getattr(params["select_prim"], "name", str(params["select_prim"]))
    if select not in ("ge", "le") or _kind(operand.dtype) != "float":
        raise UnsupportedError(
            f"ark.persistent: select_and_scatter_add selecting with {select} over "
            f"{operand.dtype} (the gradient of max / min pooling over floats is supported) at "
            f"{b.source}"
        )
    window = tuple(int(w) for w in params["window_dimensions"])
    strides = tuple(int(s) for s in params["window_strides"])
    padding = tuple((int(lo), int(hi)) for lo, hi in params["padding"])
    rank = len(operand.shape)
    grid = tuple(source.shape)  # one cotangent per window
    if math.prod(out_shape) == 0 or math.prod(grid) == 0:
        return _Imm(tuple(out_shape), out_dtype, value=0.0)
    tap_dims = [d for d in range(rank) if window[d] > 1]
    if sum(n != 1 for n in out_shape) + len(tap_dims) > MAX_RANK:
        raise UnsupportedError(
            f"ark.persistent: select_and_scatter_add over {len(tap_dims)} window dims of a "
            f"rank-{rank} operand (at most {MAX_RANK} dims together) at {b.source}"
        )
    arg_prim, fill = ("argmax", -math.inf) if select == "ge" else ("argmin", math.inf)
    ones = (1,) * rank
    pool = {
        "window_dimensions": window,
        "window_strides": strides,
        "padding": padding,
        "base_dilation": ones,
        "window_dilation": ones,
    }
    view = _pool_view(b, operand, pool, grid, tap_dims, fill)
    # the flat tap index per window
    chosen = _as_load(b, _fold_taps(b, arg_prim, view, len(tap_dims), grid, "int32", arg_prim))
    tiled = _tiled_scatter(b, source, chosen, window, strides, padding, out_shape, out_dtype)
    if tiled is not None:
        return tiled

    # out[i] = sum over taps k of source[o] where window o covers i with tap k (o * stride + k
    # - low == i) and chose it.
    space = _Space(b, [*out_shape, *(window[d] for d in tap_dims)])
    shape = space.shape
    index_of, tap_flat = [], None
    for d in range(rank):
        tap = space.coord(rank + tap_dims.index(d)) if d in tap_dims else None
        index_of.append(
            _window_index(
                b, space.coord(d), out_shape[d], tap, window[d], stride=1, tap_dilation=-1,
                low=-padding[d][0], base_dilation=strides[d], size=grid[d],
            )
        )  # fmt: skip
        if tap is not None:
            tap_flat = (
                tap
                if tap_flat is None
                else _iop(b, "iadd", _iop(b, "imul", tap_flat, window[d]), tap)
            )
    picked = _gather_windows(b, chosen, shape, index_of, -1)  # -1: no window there
    value = _gather_windows(b, _as_load(b, source), shape, index_of, 0.0)
    zero = _Imm(shape, out_dtype, value=0.0)
    tap_node = tap_flat if tap_flat is not None else _Imm(shape, "int32", value=0)
    hit = _fused(b, "ieq", [picked, tap_node], shape, "bool")
    terms = _fused(b, "select", [hit, zero, value], shape, out_dtype)
    return _fold_taps(
        b, "reduce_sum", terms, len(tap_dims), out_shape, out_dtype, "select_and_scatter_add"
    )


def _tiled_scatter(b, source, chosen: _Load, window, strides, padding, out_shape, out_dtype):
    """select_and_scatter_add when the windows tile the operand (stride == window, no padding,
    every element in exactly one window: max_pool(2, 2) and the like): the operand split as
    (grid, tap) per dim is the operand's own row-major order, so each element reads its window's
    cotangent and choice through stride-0 views and compares the choice with its tap index, one
    pass without index arithmetic per element. None when the windows do not tile."""
    rank = len(out_shape)
    grid = tuple(source.shape)
    if any(padding[d] != (0, 0) or strides[d] != window[d] for d in range(rank)):
        return None
    if any(out_shape[d] != grid[d] * window[d] for d in range(rank)):
        return None
    split, src_strides, sel_strides, taps = [], [], [], []
    src = _as_load(b, source)
    for d in range(rank):
        split.append(grid[d])
        src_strides.append(src.strides[d])
        sel_strides.append(chosen.strides[d])
        if window[d] > 1:
            taps.append(len(split))
            split.append(window[d])
            src_strides.append(0)
            sel_strides.append(0)
    split = tuple(split)
    if len(split) > MAX_RANK:
        return None

    def view(x: _Load, strides) -> _Load:
        return _Load(split, x.dtype, x.tensor, x.offset, tuple(strides), x.iter_stride,
                     x.outer_iter_stride)  # fmt: skip

    tap_flat = None
    for d in taps:
        pos = _position(b, split, d)
        tap_flat = (
            pos if tap_flat is None else _iop(b, "iadd", _iop(b, "imul", tap_flat, split[d]), pos)
        )
    if tap_flat is None:  # 1-element windows: each element is its window's only choice
        tap_flat = _Imm(split, "int32", value=0)
    hit = _iop(b, "ieq", view(chosen, sel_strides), tap_flat)
    zero = _Imm(split, out_dtype, value=0.0)
    out = b.elementwise("select", [hit, zero, view(src, src_strides)], split, out_dtype)
    return b.reshape(out, tuple(out_shape))
