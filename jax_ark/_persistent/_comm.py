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

A plan has one communication group (the mesh axes its collectives run over): every rank of the
group runs the same plan, which is what makes the put tasks deadlock-free for any worker count
(docs/plan_format.md, "Communication").
"""

from __future__ import annotations

import math

from jax_ark._persistent._format import CommGroup, Op

# jaxpr primitives planned here (jax 0.10 / 0.11 names).
COMM_PRIMITIVES = frozenset(
    {
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


def _group_size(b, eqn, unsupported) -> int:
    """The size of the collective's group; registers the plan's group (one per plan)."""
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
        group = collectives._group(f"persistent {prim}", axes)
    except collectives._NoFastPath as why:
        raise unsupported(f"ark.persistent: {prim} at {b.source}: {why.error}") from None
    if not isinstance(group, collectives._Group):
        raise unsupported(
            f"ark.persistent: {prim} over axes {axes} spans processes (at {b.source}); the CPU "
            "executor's puts reach the devices of one process"
        )
    if b.comm is None:
        b.comm = CommGroup(tuple(group.axes), int(group.size))
    elif tuple(b.comm.axes) != tuple(group.axes):
        raise unsupported(
            f"ark.persistent: {prim} over axes {axes} at {b.source}, but this function's earlier "
            f"collectives run over {b.comm.axes}: a plan has one communication group for now"
        )
    return int(group.size)


def _put(b, source, n: int, per_peer: bool):
    """Emits a put op. source: a node of shape (M, N) (the same tile to every peer) or, with
    per_peer, (n, M, N) (block p to peer p). Returns the inbox as a (n, M, N) load node."""
    from jax_ark._persistent._trace import _Load

    shape = tuple(source.shape)
    M, N = shape[-2], shape[-1]
    if not isinstance(source, _Load):
        source = b.materialize(source)
    if per_peer:
        strides = tuple(source.strides)
    else:
        strides = (0, *source.strides)
    src = _Load((n, M, N), source.dtype, source.tensor, source.offset, strides)
    inbox = b.new_tensor((n, M, N), source.dtype, "workspace", name=f"inbox{len(b.ops)}")
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
        )
    )
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
    n = _group_size(b, eqn, unsupported)
    outs = []
    for x, var in zip(args, eqn.outvars, strict=True):
        out_shape = tuple(var.aval.shape)
        out_dtype = _dtype_name(var.aval)
        if math.prod(x.shape) == 0 or math.prod(out_shape) == 0:
            raise unsupported(f"ark.persistent: {prim} of a zero-size array (at {b.source})")
        if prim in _REDUCE_OF:
            shape = tuple(x.shape)
            inbox = _put(b, _matrix(b, x), n, per_peer=False)
            red = _reduce(b, _REDUCE_OF[prim], inbox, (0,), inbox.shape[1:], out_dtype)
            outs.append(b.reshape(red, shape))
        elif prim in ("all_gather", "all_gather_invariant"):
            dim = int(eqn.params["all_gather_dimension"])
            shape = tuple(x.shape)
            inbox = _put(b, _matrix(b, x), n, per_peer=False)
            stacked = b.reshape(inbox, (n, *shape))
            perm = (*range(1, dim + 1), 0, *range(dim + 1, len(shape) + 1))
            moved = b.transpose(stacked, perm)
            outs.append(b.reshape(moved, out_shape))
        elif prim == "reduce_scatter":
            dim = int(eqn.params["scatter_dimension"])
            blocks, _ = _blocks(b, x, dim, n)
            inbox = _put(b, blocks, n, per_peer=True)
            red = _reduce(b, "reduce_sum", inbox, (0,), inbox.shape[1:], out_dtype)
            outs.append(b.reshape(red, out_shape))
        elif prim == "all_to_all":
            split, concat = int(eqn.params["split_axis"]), int(eqn.params["concat_axis"])
            blocks, rest = _blocks(b, x, split, n)
            inbox = _put(b, blocks, n, per_peer=True)
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


def _matrix(b, node):
    shape = tuple(node.shape)
    n_cols = shape[-1] if shape else 1
    return b.reshape(node, (math.prod(shape) // n_cols, n_cols))
