"""GPU-driven collectives with the signatures and results of their jax.lax namesakes.

Use them inside `jax.shard_map` (check_vma on or off) under `jax.jit`::

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P())
    def f(x):
        return jax_ark.psum(x, "x")

`axis_name` is one manual mesh axis or a tuple of them; the group of a device is the set of
devices that differ from it only along those axes, ranked as `jax.lax.axis_index(axis_name)`.
Pytrees are accepted wherever jax.lax accepts them (every function here maps over the leaves).
Fast-path dtypes: float32, bfloat16, float16, int32. Sums of 16-bit floats accumulate in float32.

Drop-in for jax.lax: every function takes the arguments of its jax.lax namesake. Where ark has no
fast path (vmap/pmap axis names, a shard_map that leaves mesh axes automatic, other dtypes,
unreduced/reduced inputs, `all_gather(to="invarying"|"reduced")`, a CPU group spanning several
processes), the jax.lax collective runs instead and a `FallbackWarning` is issued once per function
and reason, as do calls with `axis_index_groups`. With `JAX_ARK_STRICT=1` those cases raise.

On a CPU mesh spanning several jax.distributed processes, set with `jax.set_mesh`: collectives over
process-local mesh axes run on ark, and psum/pmax/pmin/pmean over axes that partly span processes
run hierarchically (ark over the process-local axes, then jax.lax across processes).

Every wait inside a collective is bounded: the environment variable `JAX_ARK_TIMEOUT_S`
(seconds, default 60) is read when a function is traced, so it is baked into the compiled program;
a collective that waits longer for a peer fails with an error naming the op, the rank and the peer.

Each function validates its arguments, then reshapes / moves axes so that the runtime only sees the
five block layouts of the `ark_collective` primitive (docs/internals.md, "Collectives").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import operator
import os
import sys
import threading
import types
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark import _collective_primitive as _prim
from jax_ark._collective_primitive import Op, Reduce

__all__ = [
    "FallbackWarning",
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
STRICT_ENV = "JAX_ARK_STRICT"


# jax.lax's collectives as they were when jax_ark was imported: the fallbacks call these, so a
# program (or a test harness) that replaces jax.lax.psum etc. by ark's does not loop back here.
_lax = types.SimpleNamespace(
    **{name: getattr(jax.lax, name) for name in __all__ if name != "FallbackWarning"}
)


class FallbackWarning(UserWarning):
    """A jax_ark collective ran jax.lax's collective instead (no fast path for the case)."""


class _NoFastPath(Exception):
    """Internal: this call has no ark fast path; `error` is what strict mode raises."""

    def __init__(self, reason: str, error: Exception):
        super().__init__(reason)
        self.reason = reason
        self.error = error


_warned: set[tuple[str, str]] = set()


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (jax, _prim) if m.__file__
)


def _user_stacklevel() -> int:
    """warnings.warn stacklevel of the first caller outside jax_ark and jax (the user's line)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL_DIRS
    ):
        level, frame = level + 1, frame.f_back
    return level


def _fallback(api: str, why: _NoFastPath, run_lax):
    """Runs jax.lax's collective (`run_lax()`) in place of ark's, or raises in strict mode."""
    if _strict():
        raise why.error
    key = (api, why.reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"jax_ark.{api}: {why.reason}; running jax.lax.{api} instead (this warning is shown "
            f"once; set {STRICT_ENV}=1 to make it an error)",
            FallbackWarning,
            stacklevel=_user_stacklevel(),
        )
    return run_lax()


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


def _group(api: str, axis_name: AxisName, hierarchical: bool = False) -> _Group | _Hierarchical:
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
            unbound = NameError(
                f"jax_ark.{api}: axis name {axis!r} is not bound to a manual mesh axis "
                f"({where}). jax_ark collectives run over jax.shard_map mesh axes only, not "
                "over vmap/pmap axis names."
            )
            if axis in mesh_names or axis not in _prim.bound_axis_names():
                # Not bound at all (jax.lax would fail too, some jax versions with a bare
                # AssertionError), or an automatic mesh axis: a clear error, no fallback. Its
                # first sentence is jax.lax's, for code that matches on it.
                raise NameError(
                    f"Found an unbound axis name: {axis}. To fix this, please call {api} under "
                    f"`jax.shard_map`. {unbound}"
                )
            raise _NoFastPath("axis names of vmap/pmap (not manual shard_map mesh axes)", unbound)
    shape = dict(mesh.shape)
    auto = [a for a in mesh_names if a not in manual and shape[a] > 1]
    if auto:
        raise _NoFastPath(
            "a partially manual jax.shard_map (some mesh axes left automatic)",
            NotImplementedError(
                f"jax_ark.{api}: mesh axes {tuple(auto)} are not manual in this jax.shard_map; "
                "jax_ark collectives need every mesh axis of size > 1 to be manual (a shard_map "
                "over the whole mesh)"
            ),
        )
    mesh_axes = tuple((a, int(shape[a])) for a in mesh_names)

    def make(group_axes: tuple) -> _Group:
        return _Group(
            axes=group_axes,
            size=math.prod(int(shape[a]) for a in group_axes),
            comm_key=_comm_key(mesh_axes, group_axes),
            other_axes=tuple(a for a in mesh_names if a not in group_axes and a in manual),
        )

    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # The CPU backend meets ranks inside one process only: a group must not leave it.
        spanning = _process_spanning_axes(mesh_names, shape, axes)
        if spanning:
            if spanning == _UNKNOWN:
                raise _NoFastPath(
                    "a CPU mesh spanning several processes, not set with jax.set_mesh",
                    NotImplementedError(
                        f"jax_ark.{api}: the CPU backend runs collectives between the devices of "
                        f"one process, and this job has {jax.process_count()} processes: set the "
                        "mesh with jax.set_mesh so that ark can see which process holds which "
                        "device"
                    ),
                )
            local = tuple(a for a in axes if a not in spanning)
            if hierarchical and local:
                return _Hierarchical(local=make(local), across=spanning)
            raise _NoFastPath(
                "a CPU group spanning several processes",
                NotImplementedError(
                    f"jax_ark.{api}: the CPU backend runs collectives between the devices of one "
                    f"process; mesh axes {spanning} of this call span processes"
                    + (
                        " (psum/pmax/pmin/pmean also over a process-local axis run ark within "
                        "each process, then jax.lax across)"
                        if not local
                        else ""
                    )
                ),
            )
    return make(axes)


@dataclasses.dataclass(frozen=True)
class _Hierarchical:
    """A reduction over axes some of which span processes: ark over the process-local axes
    (`local`), then jax.lax over the rest (`across`, XLA's cross-process collective)."""

    local: _Group
    across: tuple


_UNKNOWN = ("?",)


def _concrete_mesh():
    """The mesh set with jax.set_mesh, while tracing under jax.jit too (jax.sharding.get_mesh
    refuses there; jax has no public accessor for it inside jit), or None."""
    try:
        from jax._src import mesh as mesh_lib

        return mesh_lib.get_concrete_mesh()
    except (ImportError, AttributeError):  # another jax: the devices stay unknown
        return None


def _process_spanning_axes(mesh_names: tuple, shape: dict, axes: tuple) -> tuple:
    """Those of `axes` along which the mesh's devices change process, or ("?",) when the devices
    are unknown (_UNKNOWN). An axis is process-local when every line of devices along it lies in one
    process; a group over process-local axes only then stays inside one process."""
    concrete = _concrete_mesh()
    if concrete is None or getattr(concrete, "empty", True):
        return _UNKNOWN
    # Only the mesh set with jax.set_mesh is visible while tracing; it must be the one the
    # enclosing shard_map runs over (same axes, same sizes), else nothing is known.
    if tuple(concrete.axis_names) != mesh_names or dict(concrete.shape) != shape:
        return _UNKNOWN
    procs = np.vectorize(lambda d: d.process_index, otypes=[np.int64])(concrete.devices)
    spanning = []
    for a in axes:
        dim = mesh_names.index(a)
        first = np.take(procs, [0], axis=dim)
        if not np.all(procs == first):
            spanning.append(a)
    return tuple(spanning)


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
    """`leaf` ready for ark's collective over `group`; raises _NoFastPath where ark has none."""
    leaf = jnp.asarray(leaf)
    if leaf.dtype not in _SUPPORTED_DTYPES:
        raise _NoFastPath(
            f"dtype {leaf.dtype.name}",
            TypeError(
                f"jax_ark.{api}: unsupported dtype {leaf.dtype.name}; supported dtypes are "
                f"{_SUPPORTED_NAMES}"
            ),
        )
    pending = _prim.pending_reduction_axes(jax.typeof(leaf)) & set(group.axes)
    if pending:
        raise _NoFastPath(
            "unreduced or reduced inputs",
            ValueError(
                f"jax_ark.{api}: the input is unreduced/reduced over mesh axes "
                f"{tuple(sorted(pending, key=str))}; ark collectives take varying or invariant "
                "values only"
            ),
        )
    # As jax.lax does implicitly: a value invariant over the group is first made varying.
    return _prim.ensure_varying(leaf, group.axes)


def _group_or_none(
    api: str, axis_name: AxisName, hierarchical: bool = False
) -> _Group | _Hierarchical | _NoFastPath:
    """`_group(...)`, or the reason it has no fast path (returned, not raised, so that jax.lax's
    errors in the fallback are not chained to it)."""
    try:
        return _group(api, axis_name, hierarchical)
    except _NoFastPath as why:
        return why


_persistent_tracing = threading.local()


@contextlib.contextmanager
def as_lax_collectives():
    """While `ark.persistent` traces a function, jax_ark collectives bind jax.lax's primitives:
    the planner turns those into its own put tasks (jax_ark/_persistent/_trace.py), so both
    spellings mean the same plan."""
    depth = getattr(_persistent_tracing, "depth", 0)
    _persistent_tracing.depth = depth + 1
    try:
        yield
    finally:
        _persistent_tracing.depth = depth


def _collective(
    api: str,
    x,
    axis_name: AxisName,
    axis_index_groups,
    per_leaf,
    run_lax,
    group=None,
    hierarchical: bool = False,
):
    """Maps `per_leaf(group, operand)` over the leaves of `x`; where ark has no fast path for the
    call (or a leaf), `run_lax(x or leaf)` (the jax.lax collective) runs instead. With
    `hierarchical`, `group` may be a `_Hierarchical` (reductions only)."""
    if getattr(_persistent_tracing, "depth", 0):
        return run_lax(x)
    if group is None:
        group = _group_or_none(api, axis_name, hierarchical)
        if isinstance(group, _NoFastPath):
            # vmap/pmap axes and the like: jax.lax handles them (with axis_index_groups too).
            return _fallback(api, group, lambda: run_lax(x))
        if axis_index_groups is not None:
            # jax.lax supports some of these inside shard_map (all_gather, all_to_all in jax 0.10)
            # and rejects the rest; either way its answer is the drop-in one.
            why = _NoFastPath(
                "axis_index_groups",
                NotImplementedError(
                    f"jax_ark.{api}: axis_index_groups is not supported; split the mesh axis into "
                    "two axes and name the one that spans each group"
                ),
            )
            return _fallback(api, why, lambda: run_lax(x))

    def one(leaf):
        why = None
        try:
            operand = _as_operand(
                api, leaf, group.local if isinstance(group, _Hierarchical) else group
            )
        except _NoFastPath as no_fast_path:
            why = no_fast_path
        if why is not None:  # outside the except block: jax.lax's errors carry no ark context
            return _fallback(api, why, lambda: run_lax(leaf))
        return per_leaf(group, operand)

    return jax.tree.map(one, x)


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


_ACROSS_PROCESSES = {Reduce.sum: "psum", Reduce.max: "pmax", Reduce.min: "pmin"}


def _reduce(operand, group: _Group | _Hierarchical, reduce: Reduce):
    if isinstance(group, _Group):
        return _bind(operand, group, Op.all_reduce, reduce)
    # Sum, max and min over a product of axes reduce in any split: first among this process's
    # devices (ark), then the per-process results across processes (jax.lax).
    local = _bind(operand, group.local, Op.all_reduce, reduce)
    return getattr(_lax, _ACROSS_PROCESSES[reduce])(local, group.across)


def _all_reduce(api: str, x, axis_name: AxisName, reduce: Reduce, axis_index_groups, run_lax):
    def one(group, operand):
        return _reduce(operand, group, reduce)

    return _collective(api, x, axis_name, axis_index_groups, one, run_lax, hierarchical=True)


def psum(x, axis_name: AxisName, *, axis_index_groups=None):
    """Sum of `x` over the devices of the group, on every device (as `jax.lax.psum`)."""
    return _all_reduce(
        "psum",
        x,
        axis_name,
        Reduce.sum,
        axis_index_groups,
        lambda v: _lax.psum(v, axis_name, axis_index_groups=axis_index_groups),
    )


def pmax(x, axis_name: AxisName, *, axis_index_groups=None):
    """Element-wise maximum over the group (as `jax.lax.pmax`; not differentiable, like it)."""
    return _all_reduce(
        "pmax",
        x,
        axis_name,
        Reduce.max,
        axis_index_groups,
        lambda v: _lax.pmax(v, axis_name, axis_index_groups=axis_index_groups),
    )


def pmin(x, axis_name: AxisName, *, axis_index_groups=None):
    """Element-wise minimum over the group (as `jax.lax.pmin`; not differentiable, like it)."""
    return _all_reduce(
        "pmin",
        x,
        axis_name,
        Reduce.min,
        axis_index_groups,
        lambda v: _lax.pmin(v, axis_name, axis_index_groups=axis_index_groups),
    )


def pmean(x, axis_name: AxisName, *, axis_index_groups=None):
    """Mean over the group: psum / group size (integers give floats, as `jax.lax.pmean`)."""

    def one(group, operand):
        size = group.size if isinstance(group, _Group) else group.local.size * _axes_size(group)
        return _reduce(operand, group, Reduce.sum) / size

    return _collective(
        "pmean",
        x,
        axis_name,
        axis_index_groups,
        one,
        lambda v: _lax.pmean(v, axis_name, axis_index_groups=axis_index_groups),
        hierarchical=True,
    )


def _axes_size(group: _Hierarchical) -> int:
    shape = dict(jax.sharding.get_abstract_mesh().shape)
    return math.prod(int(shape[a]) for a in group.across)


# ---- data movement ------------------------------------------------------------------------------

_ALL_GATHER_TO = ("varying", "invarying", "reduced")


def all_gather(
    x,
    axis_name: AxisName,
    *,
    axis_index_groups=None,
    axis: int = 0,
    tiled: bool = False,
    to: str = "varying",
):
    """The `x` of every device of the group, stacked (or, if `tiled`, concatenated) along `axis`.

    `to` is the manual-axis type of the result, as in `jax.lax.all_gather`: ark's fast path makes
    it "varying"; "invarying" and "reduced" run jax.lax's all_gather.
    """
    if to not in _ALL_GATHER_TO:
        raise ValueError(
            f"jax_ark.all_gather: to={to!r} is not one of {_ALL_GATHER_TO} (as jax.lax.all_gather)"
        )

    def run_lax(v):
        return _lax.all_gather(
            v, axis_name, axis_index_groups=axis_index_groups, axis=axis, tiled=tiled, to=to
        )

    if to != "varying":
        why = _NoFastPath(
            f"to={to!r}",
            NotImplementedError(f'jax_ark.all_gather: to={to!r} (ark gathers to="varying")'),
        )
        return _fallback("all_gather", why, lambda: run_lax(x))

    def one(group, leaf):
        ndim = leaf.ndim if tiled else leaf.ndim + 1
        dim = _axis_index_arg("all_gather", "axis", axis, ndim)
        y = jnp.moveaxis(_bind(leaf, group, Op.all_gather), 0, dim)
        return _merge_dims(y, dim) if tiled else y

    return _collective("all_gather", x, axis_name, axis_index_groups, one, run_lax)


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


def psum_scatter(
    x,
    axis_name: AxisName,
    *,
    scatter_dimension: int = 0,
    axis_index_groups=None,
    tiled: bool = False,
):
    """Sum over the group, of which each device keeps its block along `scatter_dimension`."""

    def one(group, leaf):
        dim = _axis_index_arg("psum_scatter", "scatter_dimension", scatter_dimension, leaf.ndim)
        blocks = _blocks_to_front(
            "psum_scatter", "scatter dimension", leaf, dim, group.size, axis_name, tiled
        )
        return _bind(blocks, group, Op.reduce_scatter, Reduce.sum)

    def run_lax(v):
        return _lax.psum_scatter(
            v,
            axis_name,
            scatter_dimension=scatter_dimension,
            axis_index_groups=axis_index_groups,
            tiled=tiled,
        )

    return _collective("psum_scatter", x, axis_name, axis_index_groups, one, run_lax)


class _PermIndexError(ValueError, IndexError):
    """A ppermute index out of range: a ValueError, and an IndexError as jax.lax raises there."""


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
                raise _PermIndexError(
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


def _mesh_ordered(axis_name: AxisName) -> AxisName:
    """The axes of `axis_name` in mesh order (names that are not mesh axes keep their place)."""
    if not isinstance(axis_name, (tuple, list)) or len(axis_name) < 2:
        return axis_name
    names = tuple(getattr(jax.sharding.get_abstract_mesh(), "axis_names", ()) or ())
    if not all(a in names for a in axis_name):
        return axis_name
    return tuple(sorted(axis_name, key=names.index))


def ppermute(x, axis_name: AxisName, perm: Sequence[tuple[int, int]]):
    """Sends `x` from rank `src` to rank `dst` for each pair of `perm`; ranks that receive
    nothing get zeros (as `jax.lax.ppermute`).

    Over several mesh axes, ranks are numbered in MESH order whatever the order of the tuple, as
    jax.lax.ppermute does in jax 0.10 (unlike jax.lax.axis_index, which follows the tuple's
    order; see docs/lax_compat.md).
    """
    group = _group_or_none("ppermute", _mesh_ordered(axis_name))
    if isinstance(group, _NoFastPath):
        return _fallback("ppermute", group, lambda: _lax.ppermute(x, axis_name, perm))
    send_to, recv_from = _permutation_tables(perm, group.size)

    def one(group, leaf):
        return _bind(leaf, group, Op.permute, send_to=send_to, recv_from=recv_from)

    return _collective(
        "ppermute", x, axis_name, None, one, lambda v: _lax.ppermute(v, axis_name, perm), group
    )


def all_to_all(
    x,
    axis_name: AxisName,
    split_axis: int,
    concat_axis: int,
    *,
    axis_index_groups=None,
    tiled: bool = False,
):
    """Splits `split_axis` into one block per rank, sends block j to rank j, and concatenates the
    blocks received along `concat_axis` (stacked as a new axis unless `tiled`), as `jax.lax`."""

    def one(group, leaf):
        split = _axis_index_arg("all_to_all", "split_axis", split_axis, leaf.ndim)
        concat = _axis_index_arg("all_to_all", "concat_axis", concat_axis, leaf.ndim)
        blocks = _blocks_to_front(
            "all_to_all", "split_axis", leaf, split, group.size, axis_name, tiled
        )
        y = jnp.moveaxis(_bind(blocks, group, Op.all_to_all), 0, concat)
        return _merge_dims(y, concat) if tiled else y

    def run_lax(v):
        return _lax.all_to_all(
            v, axis_name, split_axis, concat_axis, axis_index_groups=axis_index_groups, tiled=tiled
        )

    return _collective("all_to_all", x, axis_name, axis_index_groups, one, run_lax)
