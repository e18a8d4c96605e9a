"""GPU-driven collectives with the signatures and results of their jax.lax namesakes.

Use them inside `jax.shard_map` (check_vma on or off) under `jax.jit`::

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P())
    def f(x):
        return jax_ark.psum(x, "x")

`axis_name` is one manual mesh axis or a tuple of them; the group of a device is the set of
devices that differ from it only along those axes, ranked as `jax.lax.axis_index(axis_name)`.
Pytrees are accepted wherever jax.lax accepts them (every function here maps over the leaves).
Supported dtypes: float32, bfloat16, float16, int32. Sums of 16-bit floats accumulate in float32.

Every wait inside a collective is bounded: the environment variable `JAX_ARK_TIMEOUT_S`
(seconds, default 60) is read when a function is traced, so it is baked into the compiled program;
a collective that waits longer for a peer fails with an error naming the op, the rank and the peer.

Each function validates its arguments, then reshapes / moves axes so that the runtime only sees the
five block layouts of the `ark_collective` primitive (docs/internals.md, "Collectives").
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark import _collective_primitive as _prim
from jax_ark._collective_primitive import Op, Reduce

__all__ = [
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
]

AxisName = Any  # a hashable mesh axis name, or a tuple / list of them

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32)
_SUPPORTED_DTYPES = frozenset(np.dtype(d) for d in SUPPORTED_DTYPES)
_SUPPORTED_NAMES = ", ".join(np.dtype(d).name for d in SUPPORTED_DTYPES)

TIMEOUT_ENV = "JAX_ARK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


# ---- validation helpers -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Group:
    """The communication group of a collective over `axes`, as seen from the current device."""

    axes: tuple
    size: int
    comm_key: int
    other_axes: tuple  # the remaining manual mesh axes; their index is the group's color

    def operands(self):
        rank = jax.lax.axis_index(self.axes)
        color = jax.lax.axis_index(self.other_axes) if self.other_axes else jnp.int32(0)
        return rank, color


def _comm_key(mesh_axes: tuple[tuple[Any, int], ...], group_axes: tuple) -> int:
    # A deterministic digest (never Python's per-process randomized hash()): every device, and
    # every process of a multi-process run, must derive the same key for the same group.
    text = repr((mesh_axes, group_axes)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _group(api: str, axis_name: AxisName) -> _Group:
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not axes:
        raise ValueError(f"jax_ark.{api}: axis_name is empty; name at least one mesh axis")
    if len(set(axes)) != len(axes):
        raise ValueError(f"jax_ark.{api}: axis_name {axis_name!r} names an axis more than once")
    mesh = jax.sharding.get_abstract_mesh()
    mesh_names = tuple(getattr(mesh, "axis_names", ()) or ())
    manual = set(getattr(mesh, "manual_axes", mesh_names) or ())
    for axis in axes:
        if axis not in mesh_names or axis not in manual:
            bound = tuple(a for a in mesh_names if a in manual)
            where = (
                f"the manual axes of the enclosing jax.shard_map are {bound}"
                if bound
                else "it is not called inside jax.shard_map"
            )
            raise NameError(
                f"jax_ark.{api}: axis name {axis!r} is not bound to a manual mesh axis ({where}). "
                "jax_ark collectives run over jax.shard_map mesh axes only, not over vmap/pmap "
                "axis names."
            )
    shape = dict(mesh.shape)
    auto = [a for a in mesh_names if a not in manual and shape[a] > 1]
    if auto:
        raise NotImplementedError(
            f"jax_ark.{api}: mesh axes {tuple(auto)} are not manual in this jax.shard_map; jax_ark "
            "collectives need every mesh axis of size > 1 to be manual (a shard_map over the whole "
            "mesh)"
        )
    mesh_axes = tuple((a, int(shape[a])) for a in mesh_names)
    return _Group(
        axes=axes,
        size=math.prod(int(shape[a]) for a in axes),
        comm_key=_comm_key(mesh_axes, axes),
        other_axes=tuple(a for a in mesh_names if a not in axes and a in manual),
    )


def _timeout_ms() -> int:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return int(DEFAULT_TIMEOUT_S * 1000)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive, finite number of seconds")
    return max(1, round(seconds * 1000))


def _as_operand(api: str, leaf, group: _Group):
    leaf = jnp.asarray(leaf)
    if leaf.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"jax_ark.{api}: unsupported dtype {leaf.dtype.name}; supported dtypes are "
            f"{_SUPPORTED_NAMES}"
        )
    # As jax.lax does implicitly: a value invariant over the group is first made varying.
    return _prim.ensure_varying(leaf, group.axes)


def _bind(x, group: _Group, op: Op, reduce: Reduce = Reduce.sum, send_to=(), recv_from=()):
    rank, color = group.operands()
    out = _prim.bind(
        x,
        rank,
        _prim.sequenced(color),
        op=op,
        reduce=reduce,
        axes=group.axes,
        group_size=group.size,
        comm_key=group.comm_key,
        send_to=send_to,
        recv_from=recv_from,
        timeout_ms=_timeout_ms(),
    )
    _prim.remember(out)
    return out


def _axis_index_arg(api: str, what: str, value, ndim: int) -> int:
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"jax_ark.{api}: {what} must be an int, got {value!r}") from None
    if not -ndim <= index < ndim:
        raise ValueError(
            f"jax_ark.{api}: {what}={index} is out of range for an operand of rank {ndim}"
            if ndim
            else f"jax_ark.{api}: {what} needs an operand of rank >= 1, got a scalar"
        )
    return index % ndim


def _merge_dims(y, first: int):
    """Merges dimensions `first` and `first + 1` of y into one."""
    shape = y.shape
    return y.reshape(*shape[:first], shape[first] * shape[first + 1], *shape[first + 2 :])


def _split_to_front(x, dim: int, n: int):
    """Splits dimension `dim` into (n, size // n) and moves the n blocks to the front."""
    shape = x.shape
    x = x.reshape(*shape[:dim], n, shape[dim] // n, *shape[dim + 1 :])
    return jnp.moveaxis(x, dim, 0)


# ---- reductions ---------------------------------------------------------------------------------


def _all_reduce(api: str, x, axis_name: AxisName, reduce: Reduce):
    group = _group(api, axis_name)

    def one(leaf):
        return _bind(_as_operand(api, leaf, group), group, Op.all_reduce, reduce)

    return jax.tree.map(one, x)


def psum(x, axis_name: AxisName):
    """Sum of `x` over the devices of the group, on every device (as `jax.lax.psum`)."""
    return _all_reduce("psum", x, axis_name, Reduce.sum)


def pmax(x, axis_name: AxisName):
    """Element-wise maximum over the group (as `jax.lax.pmax`; not differentiable, like it)."""
    return _all_reduce("pmax", x, axis_name, Reduce.max)


def pmin(x, axis_name: AxisName):
    """Element-wise minimum over the group (as `jax.lax.pmin`; not differentiable, like it)."""
    return _all_reduce("pmin", x, axis_name, Reduce.min)


def pmean(x, axis_name: AxisName):
    """Mean over the group: psum / group size (integers give floats, as `jax.lax.pmean`)."""
    n = _group("pmean", axis_name).size
    return jax.tree.map(lambda v: v / n, _all_reduce("pmean", x, axis_name, Reduce.sum))


# ---- data movement ------------------------------------------------------------------------------


def all_gather(x, axis_name: AxisName, *, axis: int = 0, tiled: bool = False):
    """The `x` of every device of the group, stacked (or, if `tiled`, concatenated) along `axis`."""
    group = _group("all_gather", axis_name)

    def one(leaf):
        leaf = _as_operand("all_gather", leaf, group)
        ndim = leaf.ndim if tiled else leaf.ndim + 1
        dim = _axis_index_arg("all_gather", "axis", axis, ndim)
        y = jnp.moveaxis(_bind(leaf, group, Op.all_gather), 0, dim)
        return _merge_dims(y, dim) if tiled else y

    return jax.tree.map(one, x)


def _blocks_to_front(api: str, what: str, leaf, dim: int, n: int, axis_name, tiled: bool):
    """`leaf` as n blocks stacked on a new leading axis: dimension `dim` split into n equal parts
    (tiled), or `dim` itself moved to the front (untiled: it must have exactly n entries)."""
    size = leaf.shape[dim]
    if tiled:
        if size % n:
            raise ValueError(
                f"jax_ark.{api}: {what} {dim} has size {size}, which is not divisible by the size "
                f"{n} of axis {axis_name!r}"
            )
        return _split_to_front(leaf, dim, n)
    if size != n:
        raise ValueError(
            f"jax_ark.{api}: {what} {dim} has size {size}, which must equal the size {n} of axis "
            f"{axis_name!r} (or pass tiled=True)"
        )
    return jnp.moveaxis(leaf, dim, 0)


def psum_scatter(x, axis_name: AxisName, *, scatter_dimension: int = 0, tiled: bool = False):
    """Sum over the group, of which each device keeps its block along `scatter_dimension`."""
    group = _group("psum_scatter", axis_name)
    n = group.size

    def one(leaf):
        leaf = _as_operand("psum_scatter", leaf, group)
        dim = _axis_index_arg("psum_scatter", "scatter_dimension", scatter_dimension, leaf.ndim)
        blocks = _blocks_to_front(
            "psum_scatter", "scatter dimension", leaf, dim, n, axis_name, tiled
        )
        return _bind(blocks, group, Op.reduce_scatter, Reduce.sum)

    return jax.tree.map(one, x)


def _permutation_tables(
    perm: Sequence[tuple[int, int]], n: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    send_to, recv_from = [-1] * n, [-1] * n
    try:
        pairs = [tuple(pair) for pair in perm]
    except TypeError:
        raise TypeError(
            "jax_ark.ppermute: perm must be a sequence of (source, destination) pairs, "
            f"got {perm!r}"
        ) from None
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(
                f"jax_ark.ppermute: perm entry {pair!r} is not a (source, destination) pair"
            )
        try:
            src, dst = operator.index(pair[0]), operator.index(pair[1])
        except TypeError:
            raise TypeError(f"jax_ark.ppermute: perm entry {pair!r} must hold ints") from None
        for index in (src, dst):
            if not 0 <= index < n:
                raise ValueError(
                    f"jax_ark.ppermute: perm entry {pair!r} is out of range: indices must lie in "
                    f"0..{n - 1} for a group of size {n}"
                )
        if send_to[src] != -1:
            raise ValueError(
                f"jax_ark.ppermute: perm is not a permutation: source {src} appears more than once"
            )
        if recv_from[dst] != -1:
            raise ValueError(
                f"jax_ark.ppermute: perm is not a permutation: destination {dst} appears more "
                "than once"
            )
        send_to[src], recv_from[dst] = dst, src
    return tuple(send_to), tuple(recv_from)


def ppermute(x, axis_name: AxisName, perm: Sequence[tuple[int, int]]):
    """Sends `x` from rank `src` to rank `dst` for each pair of `perm`; ranks that receive
    nothing get zeros (as `jax.lax.ppermute`)."""
    group = _group("ppermute", axis_name)
    send_to, recv_from = _permutation_tables(perm, group.size)

    def one(leaf):
        leaf = _as_operand("ppermute", leaf, group)
        return _bind(leaf, group, Op.permute, send_to=send_to, recv_from=recv_from)

    return jax.tree.map(one, x)


def all_to_all(x, axis_name: AxisName, split_axis: int, concat_axis: int, *, tiled: bool = False):
    """Splits `split_axis` into one block per rank, sends block j to rank j, and concatenates the
    blocks received along `concat_axis` (stacked as a new axis unless `tiled`), as `jax.lax`."""
    group = _group("all_to_all", axis_name)
    n = group.size

    def one(leaf):
        leaf = _as_operand("all_to_all", leaf, group)
        split = _axis_index_arg("all_to_all", "split_axis", split_axis, leaf.ndim)
        concat = _axis_index_arg("all_to_all", "concat_axis", concat_axis, leaf.ndim)
        blocks = _blocks_to_front("all_to_all", "split_axis", leaf, split, n, axis_name, tiled)
        y = jnp.moveaxis(_bind(blocks, group, Op.all_to_all), 0, concat)
        return _merge_dims(y, concat) if tiled else y

    return jax.tree.map(one, x)
