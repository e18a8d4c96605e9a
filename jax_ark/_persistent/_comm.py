"""Collectives inside a persistent plan (plan v3): jax.lax collectives become put ops + local ops.

Every collective is planned as one *put* op, then ordinary ops on its inbox:
- the put op's output is an inbox `[n, M, N]` in the (symmetric) workspace; on rank r, the task
  for source b = r copies its (m, n) tile of the source view `[peer, m, n]` into row r of every
  rank's inbox, and the task for source b != r waits until rank b's tile has arrived. Tasks are
  tiled per source rank and per (m, n) tile, so a consumer waits only for the rows it reads;
- psum / pmax / pmin: a REDUCE over the inbox's rank axis (ranks folded 0..n-1 in order);
- all_gather: the inbox is the result (a view of it, tiled or stacked at the gather dimension);
- psum_scatter: the source view picks block p for peer p, then a REDUCE over ranks;
- all_to_all: the source view picks block p for peer p; the inbox is the result.

- ppermute: a put with one slot whose routing table names, per rank, the rank it receives from
  (none: the slot is zeroed, as jax.lax gives zeros to a rank no pair sends to);
- axis_index: a program on LOAD_RANK (this call's rank in the plan's group), no communication.

A plan has one communication group: every mesh axis that any collective or axis_index of the
function names (in mesh order), with one set of symmetric regions for all its ranks. A collective
over some of those axes (a "tp" psum in a plan that also averages over "dp") is a put with a
routing table: per rank, the ranks of its own subgroup. Every rank of the group runs the same
plan, which is what makes the put tasks deadlock-free for any worker count (docs/plan_format.md,
"Communication").
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jax_ark._persistent._format import DTYPE_SIZES, CommGroup, Op

# jaxpr primitives planned here (jax 0.10 / 0.11 names); each names mesh axes of the plan's group.
COMM_PRIMITIVES = frozenset(
    {
        "ppermute",
        "axis_index",
        "psum",
        "psum_invariant",
        "pmax",
        "pmin",
        "all_gather",
        "all_gather_invariant",
        "reduce_scatter",
        "all_to_all",
    }
)
# A collective in a loop body gets one inbox slice per iteration (see _put): its bytes are capped
# so that a while_loop's guard (65536 by default) cannot silently claim gigabytes.
_MAX_LOOP_INBOX_BYTES = 64 << 20

_REDUCE_OF = {
    "psum": "reduce_sum",
    "psum_invariant": "reduce_sum",
    "pmax": "reduce_max",
    "pmin": "reduce_min",
}


def _axes(eqn) -> tuple:
    params = eqn.params
    raw = params.get("axes", params.get("axis_name"))
    return tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            inner = getattr(x, "jaxpr", x)
            if hasattr(inner, "eqns"):
                yield inner


def _named_axes(jaxpr, found: list) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in COMM_PRIMITIVES:
            found.extend(a for a in _axes(eqn) if a not in found)
        for inner in _sub_jaxprs(eqn):
            _named_axes(inner, found)


def plan_group(jaxpr, unsupported) -> CommGroup | None:
    """The plan's one communication group: every mesh axis some collective, ppermute or
    axis_index of the function (sub-jaxprs included) names, in mesh order; None when none does.
    One group over these axes serves every collective: one over fewer axes gets a routing table
    (its subgroup of the plan's ranks), so several groups (dp x tp) need no second communicator."""
    from jax_ark import collectives

    named: list = []
    _named_axes(jaxpr, named)
    if not named:
        return None
    if any(not isinstance(a, str) for a in named):
        raise unsupported(
            f"ark.persistent: collectives over axes {tuple(named)}: only named jax.shard_map "
            "mesh axes"
        )
    mesh = jax.sharding.get_abstract_mesh()
    order = tuple(getattr(mesh, "axis_names", ()) or ())
    axes = tuple(sorted(named, key=lambda a: order.index(a) if a in order else len(order)))
    try:
        group = collectives._group("persistent collectives", axes)
    except collectives._NoFastPath as why:
        raise unsupported(f"ark.persistent: collectives over {axes}: {why.error}") from None
    if not isinstance(group, collectives._Group):
        raise unsupported(
            f"ark.persistent: collectives over axes {axes} span processes; the CPU executor's "
            "puts reach the devices of one process"
        )
    shape = dict(mesh.shape)
    return CommGroup(tuple(group.axes), int(group.size), tuple(int(shape[a]) for a in axes))


def _group_axes(b, eqn, unsupported) -> tuple:
    """The axes of a collective eqn (checked like jax_ark's own collectives' groups)."""
    from jax_ark import collectives

    axes = _axes(eqn)
    prim = eqn.primitive.name
    if eqn.params.get("axis_index_groups") is not None:
        raise unsupported(
            f"ark.persistent: {prim} with axis_index_groups is not supported (at {b.source})"
        )
    if any(not isinstance(a, str) for a in axes):
        raise unsupported(
            f"ark.persistent: {prim} over axes {axes}: only named jax.shard_map mesh axes "
            f"(at {b.source})"
        )
    try:
        collectives._group(f"persistent {prim}", axes)
    except collectives._NoFastPath as why:
        raise unsupported(f"ark.persistent: {prim} at {b.source}: {why.error}") from None
    if b.comm is None or any(a not in b.comm.axes for a in axes):  # pragma: no cover - plan_group
        raise AssertionError(f"internal error: {prim} over {axes} outside the plan's group")
    return axes


def _strides(sizes) -> list[int]:
    out, acc = [], 1
    for n in reversed(sizes):
        out.append(acc)
        acc *= n
    return out[::-1]


class _Ranks:
    """Rank arithmetic of the plan's group: a rank is jax.lax.axis_index(comm.axes), row-major
    over the axes; a subgroup over `axes` (in the collective's order) indexes its members
    row-major over those axes, the other coordinates those of the rank itself."""

    def __init__(self, comm: CommGroup):
        self.axes = tuple(comm.axes)
        self.size = dict(zip(comm.axes, comm.axis_sizes, strict=True))
        self.stride = dict(zip(comm.axes, _strides(comm.axis_sizes), strict=True))
        self.n = comm.group_size

    def coord(self, rank: int, axis) -> int:
        return (rank // self.stride[axis]) % self.size[axis]

    def index_in(self, rank: int, axes: tuple) -> int:
        """The rank's index in its subgroup over axes (= jax.lax.axis_index(axes))."""
        return sum(
            self.coord(rank, a) * s
            for a, s in zip(axes, _strides([self.size[a] for a in axes]), strict=True)
        )

    def member(self, rank: int, axes: tuple, index: int) -> int:
        """The rank of member `index` of rank's subgroup over axes."""
        sub = dict(zip(axes, _strides([self.size[a] for a in axes]), strict=True))
        return sum(
            ((index // sub[a]) % self.size[a] if a in sub else self.coord(rank, a)) * self.stride[a]
            for a in self.axes
        )

    def subgroup_route(self, axes: tuple) -> tuple[list[list[int]], list[list[int]]] | None:
        """Routing of a collective over axes: slot p of rank r from member p of r's subgroup,
        which sends its row for r (r's index in the subgroup). None: the default routing (the
        subgroup is the whole group in the group's order)."""
        if tuple(axes) == self.axes:
            return None
        k = math.prod(self.size[a] for a in axes)
        recv = [[self.member(r, axes, p) for p in range(k)] for r in range(self.n)]
        row = [[self.index_in(r, axes)] * k for r in range(self.n)]
        return recv, row


# Whether a put asks to be read in place (see _put): the CPU executor only (its ranks share one
# address space; the CUDA executor copies).
_READS_IN_PLACE = {"cpu": True, "gpu": False}


def _put(b, source, n: int, per_peer: bool, route=None):
    """Emits a put op. source: a node of shape (M, N) (the same tile to every peer) or, with
    per_peer, (n, M, N) (block p to peer p); route: its (recv_from, send_row) tables, None for the
    default routing. Returns the inbox as a (n, M, N) load node.

    On the CPU the put asks to be read in place (the ranks share memory: a reader reads each slot
    in its source rank's source, where a copy into every inbox cost more than the reads; measured
    in docs/benchmarks.md, "Puts read in place"); build_plan keeps that where the finished plan
    allows it (docs/plan_format.md, "Puts read in place") and copies otherwise."""
    from jax_ark._persistent._trace import UnsupportedError, _Load

    shape = tuple(source.shape)
    M, N = shape[-2], shape[-1]
    if not isinstance(source, _Load):
        source = b.materialize(source)
    if per_peer:
        strides = tuple(source.strides)
    else:
        strides = (0, *source.strides)
    src = _Load(
        (n, M, N), source.dtype, source.tensor, source.offset, strides, source.iter_stride,
        source.outer_iter_stride,
    )  # fmt: skip
    # In a loop body the inbox is stacked: one (n, M, N) slice per run of the enclosing loops
    # (in a nested loop, outer iteration x inner trip count + inner iteration), written at run k
    # and read through a view moving by one slice per inner iteration and by the inner trip count
    # of slices per outer one. A peer may run iterations ahead of this rank; its later puts land
    # in later slices, never in one this rank still reads (docs/plan_format.md, "Loops and
    # communication").
    loop_trips = [b.loops[loop].trip_count for loop in b.loop_stack]
    trips = math.prod(loop_trips) if loop_trips else 0
    stack = (trips,) if trips else ()
    inbox_bytes = max(trips, 1) * n * M * N * np.dtype(source.dtype).itemsize
    if trips and inbox_bytes > _MAX_LOOP_INBOX_BYTES:
        raise UnsupportedError(
            f"ark.persistent: a collective inside a loop body (at {b.source}) needs an inbox of "
            f"one slice per run of its loops: {trips} x {n * M * N} {source.dtype} = {inbox_bytes} "
            f"bytes, over the {_MAX_LOOP_INBOX_BYTES >> 20} MiB this executor allows; lower the "
            "trip count (for a while_loop: ark.persistent(..., max_while_iterations=...))"
        )
    inbox = b.new_tensor((*stack, n, M, N), source.dtype, "workspace", name=f"inbox{len(b.ops)}")
    b.ops.append(
        Op(
            name=f"put{len(b.ops)}",
            kind="put",
            out=inbox,
            B=n,
            M=M,
            N=N,
            acc_dtype=source.dtype,
            a_view=b.view_id(src),
            source=b.source,
            recv_from=None if route is None else route[0],
            send_row=None if route is None else route[1],
            stacked=bool(trips),
            read_in_place=_READS_IN_PLACE[b.platform] and not trips,
        )
    )
    if trips:
        slice_elems = n * M * N
        outer = slice_elems * loop_trips[-1] if len(loop_trips) > 1 else 0
        return _Load((n, M, N), source.dtype, inbox, 0, (M * N, N, 1), slice_elems, outer)
    return b.load(inbox)


def _blocks(b, node, dim: int, n: int):
    """node with dimension `dim` split into n blocks, moved to the front: (n, M, N)."""
    shape = tuple(node.shape)
    k = shape[dim] // n
    split = (*shape[:dim], n, k, *shape[dim + 1 :])
    x = b.reshape(node, split)
    perm = (dim, *[d for d in range(len(split)) if d != dim])
    x = b.transpose(x, perm)
    rest = x.shape[1:]
    n_cols = rest[-1]
    return b.reshape(x, (n, math.prod(rest) // n_cols, n_cols)), rest


def translate_collective(b, eqn, args, unsupported) -> list:
    """The nodes of a collective eqn's results (one per operand)."""
    from jax_ark._persistent._trace import _dtype_name, _reduce

    prim = eqn.primitive.name
    if prim == "axis_index":
        return [_axis_index(b, eqn, unsupported)]
    axes = _group_axes(b, eqn, unsupported)
    ranks = _Ranks(b.comm)
    n = math.prod(ranks.size[a] for a in axes)
    route = ranks.subgroup_route(axes)
    if prim == "ppermute":
        return [_ppermute(b, eqn, x, ranks, axes, unsupported) for x in args]
    outs = []
    for x, var_in, var in zip(args, eqn.invars, eqn.outvars, strict=True):
        out_shape = tuple(var.aval.shape)
        out_dtype = _dtype_name(var.aval)
        if math.prod(x.shape) == 0 or math.prod(out_shape) == 0:
            raise unsupported(f"ark.persistent: {prim} of a zero-size array (at {b.source})")
        if prim in _REDUCE_OF and set(axes) <= b.uniform_over.get(var_in, frozenset()):
            # Every rank of the subgroup holds these same bits (a pvary of an invariant value:
            # autodiff's psum of a replicated weight's gradient, a pmean of an already summed
            # value): the fold of n copies in rank order, computed here, is the fold of the
            # inbox's n slots, with no communication.
            shape = tuple(x.shape)
            copies = b.broadcast(x, (n, *shape), tuple(range(1, len(shape) + 1)))
            outs.append(_reduce(b, _REDUCE_OF[prim], copies, (0,), shape, out_dtype))
        elif prim in _REDUCE_OF:
            outs.append(_all_reduce(b, x, _REDUCE_OF[prim], n, route, out_dtype))
        elif prim in ("all_gather", "all_gather_invariant"):
            dim = int(eqn.params["all_gather_dimension"])
            shape = tuple(x.shape)
            inbox = _put(b, _matrix(b, x), n, per_peer=False, route=route)
            stacked = b.reshape(inbox, (n, *shape))
            perm = (*range(1, dim + 1), 0, *range(dim + 1, len(shape) + 1))
            moved = b.transpose(stacked, perm)
            outs.append(b.reshape(moved, out_shape))
        elif prim == "reduce_scatter":
            dim = int(eqn.params["scatter_dimension"])
            blocks, _ = _blocks(b, x, dim, n)
            red = _put_and_fold(b, blocks, n, True, route, "reduce_sum", out_dtype)
            outs.append(b.reshape(red, out_shape))
        elif prim == "all_to_all":
            split, concat = int(eqn.params["split_axis"]), int(eqn.params["concat_axis"])
            blocks, rest = _blocks(b, x, split, n)
            inbox = _put(b, blocks, n, per_peer=True, route=route)
            # inbox[j] = block `me` of rank j's x (shape `rest`: x without the n blocks of
            # split_axis); put j next to concat_axis and merge the two.
            y = b.reshape(inbox, (n, *rest))
            r = len(rest)
            perm = (*range(1, concat + 1), 0, *range(concat + 1, r + 1))
            y = b.transpose(y, perm)
            outs.append(b.reshape(y, out_shape))
        else:  # pragma: no cover - COMM_PRIMITIVES and the branches above agree
            raise unsupported(f"ark.persistent: {prim} is not supported")
        if outs[-1].dtype != out_dtype:
            raise unsupported(f"ark.persistent: {prim} changes the dtype (at {b.source})")
    return outs


def _ppermute(b, eqn, x, ranks: _Ranks, axes: tuple, unsupported):
    """ppermute: one slot; rank r receives from the member of its subgroup that the perm sends to
    r's index (from no one: zeros), and every sender reads its whole tile (send_row 0)."""
    shape = tuple(x.shape)
    if math.prod(shape) == 0:
        raise unsupported(f"ark.persistent: ppermute of a zero-size array (at {b.source})")
    # jax.lax.ppermute numbers the ranks over several axes in MESH order, whatever the tuple's
    # order (unlike axis_index; docs/lax_compat.md): the plan's axes are in mesh order.
    axes = tuple(a for a in ranks.axes if a in axes)
    source_of = {int(dst): int(src) for src, dst in eqn.params["perm"]}
    recv = [
        [
            ranks.member(r, axes, source_of[ranks.index_in(r, axes)])
            if ranks.index_in(r, axes) in source_of
            else -1
        ]
        for r in range(ranks.n)
    ]
    rows = [[0] for _ in range(ranks.n)]
    inbox = _put(b, _matrix(b, x), 1, per_peer=False, route=(recv, rows))
    return b.reshape(inbox, shape)


def _axis_index(b, eqn, unsupported):
    """axis_index over axes: this rank's index in its subgroup, computed from LOAD_RANK (the
    rank in the plan's group, known at run time from the comm operand): per axis
    (rank / stride) % size, combined row-major over the axes in the order given."""
    from jax_ark._persistent._trace import _Ew, _iop

    axes = _axes(eqn)
    if any(not isinstance(a, str) for a in axes):
        raise unsupported(f"ark.persistent: axis_index over {axes} (at {b.source})")
    ranks = _Ranks(b.comm)
    rank = _Ew((), "int32", op="load_rank", _size=1)
    out = None
    for a, sub in zip(axes, _strides([ranks.size[a] for a in axes]), strict=True):
        c = _iop(b, "irem", _iop(b, "idiv", rank, ranks.stride[a]), ranks.size[a])
        if sub != 1:
            c = _iop(b, "imul", c, sub)
        out = c if out is None else _iop(b, "iadd", out, c)
    return out


# All-reduces of this many bytes per rank or more run two-shot. CPU: measured on the 2-core VM
# with 8 ranks (16 psums in a fori_loop, ms per psum one-shot / two-shot): 1 KiB 0.073 / 0.097,
# 4 KiB 0.104 / 0.137, 8 KiB 0.177 / 0.115, 32 KiB 0.44 / 0.27, 64 KiB 0.91 / 0.46, 256 KiB
# 9.8 / 1.7 (docs/benchmarks.md). Two-shot wins alone from 8 KiB, but its reduce-scatter sends
# all of a rank's row blocks in its one slot's tasks, so they wait for every row of the producer,
# where one-shot put tiles leave as soon as their matmul row tiles are done: below 32 KiB (a
# latency-bound layer, where that overlap is the point) one-shot is kept. GPU: not measured, a
# placeholder to re-measure on a lent GPU: there the bytes are cheap (NVLink / HBM) and the
# second round's signal latency is what costs.
_TWO_SHOT_BYTES = {"cpu": 32 << 10, "gpu": 256 << 10}


def _all_reduce(b, x, kind: str, n: int, route, out_dtype: str):
    """psum / pmax / pmin of x over the n ranks of the group. Small values: one-shot (every rank
    puts its whole x into every peer's inbox and folds the n slots). From _TWO_SHOT_BYTES on,
    when x's rows (or its elements, for a vector) split into n blocks: two-shot, a reduce-
    scatter (rank j folds block j of every rank's x) then an all-gather of the folded blocks:
    each rank writes 2 blocks' worth of n blocks per peer instead of n, at the price of a second
    round of puts. Each element is folded over the ranks in the same order either way, so the
    bits are the same."""
    shape = tuple(x.shape)
    matrix = _matrix(b, x)
    rows, cols = matrix.shape
    if rows % n and (rows * cols) % n == 0:  # a long vector: n rows of its elements in order
        matrix = b.reshape(x, (n, rows * cols // n))
        rows, cols = matrix.shape
    nbytes = rows * cols * DTYPE_SIZES[x.dtype]
    if nbytes < _TWO_SHOT_BYTES[b.platform] or rows % n:
        return b.reshape(_put_and_fold(b, matrix, n, False, route, kind, out_dtype), shape)
    blocks, _ = _blocks(b, matrix, 0, n)
    mine = _put_and_fold(b, blocks, n, True, route, kind, out_dtype)
    gathered = _put(b, _matrix(b, mine), n, per_peer=False, route=route)
    return b.reshape(gathered, shape)


def _put_and_fold(b, source, n: int, per_peer: bool, route, kind: str, out_dtype: str):
    """The inbox of a put of `source` (see _put), folded over its n slots in rank order."""
    from jax_ark._persistent._trace import _reduce

    inbox = _put(b, source, n, per_peer=per_peer, route=route)
    return _reduce(b, kind, inbox, (0,), inbox.shape[1:], out_dtype)


def _matrix(b, node):
    shape = tuple(node.shape)
    n_cols = shape[-1] if shape else 1
    return b.reshape(node, (math.prod(shape) // n_cols, n_cols))
