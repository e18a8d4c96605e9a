"""Planner back-end: tiling, tile-level dependencies, workspace reuse, worker placement.

Used by the planner and by the validator (which recomputes the dependencies a plan needs).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from jax_ark._persistent._format import (
    DTYPE_SIZES,
    WORKSPACE_ALIGN,
    Op,
    Plan,
    Task,
)
from jax_ark._persistent._trace import TraceResult
from jax_ark._persistent._validate import read_in_place_problem

# ---- tiling ----------------------------------------


# Most rows a tile may have for the CUDA executor's GEMV path (tile_ops_device.cuh, gemv_kn).
GPU_GEMV_MAX_ROWS = 16
# Column granularity of GPU tiles: 8 elements = one 16-byte vector of bf16 / f16 weights.
GPU_COLUMN_QUANTUM = 8
# Rows of one GEMM sub-tile of the CUDA executor (gemm_tile, 64 x 64).
GPU_GEMM_ROWS = 64


def _round_up(x: int, q: int) -> int:
    return -(-x // q) * q


def gpu_tile_shape(op: Op, num_workers: int) -> tuple[int, int, int]:
    """(tile_b, tile_m, tile_n) for the CUDA executor: every op split into about one tile per worker
    (one worker = one SM), so a layer of a decode chain uses every SM once. A GEMV (<= 16 rows per
    batch entry) keeps all its rows in one tile and splits columns in multiples of 8:
    d=1024 on 132 SMs -> tile_n 8 (128 tiles), d=4096 -> 32 (128), d=256 -> 8 (32)."""
    w = max(1, num_workers)
    if op.kind == "matmul":
        tb = max(1, op.B // w)  # many batch entries (attention heads): group them
        groups = -(-op.B // tb)
        if op.M <= GPU_GEMV_MAX_ROWS:
            tm = op.M
            per_group = max(1, w // groups)
            tn = _round_up(-(-op.N // per_group), GPU_COLUMN_QUANTUM)
        else:
            tm = GPU_GEMM_ROWS
            row_tiles = groups * -(-op.M // tm)
            per_row_tile = max(1, w // row_tiles)
            tn = min(64, _round_up(-(-op.N // per_row_tile), GPU_COLUMN_QUANTUM))
        return tb, max(1, min(op.M, tm)), max(1, min(op.N, tn))
    if op.kind == "map":  # one element per thread, at least a block's worth (256) per tile
        total = op.M * op.N
        per_task = min(16384, max(256, _round_up(-(-total // w), 256)))
        if op.N >= per_task:
            return 1, 1, per_task
        return 1, max(1, min(op.M, per_task // max(1, op.N))), max(1, op.N)
    # reduce: one warp per row; whole rows, split so every worker gets some
    tm = max(1, min(op.M, 16384 // max(1, op.K)))
    return 1, max(1, min(tm, -(-op.M // w))), 1


# Fewest multiply-adds a CPU matmul task is cut to (rows added when K is small).
_MIN_TASK_MACS = 65536


def _tiles(
    op: Op, num_workers: int, tile_m: int | None, tile_n: int | None, platform: str = "cpu"
) -> list[Task]:
    if op.store_view >= 0 and op.kind in ("map", "reduce"):
        # A map's window store writes elements chosen at run time, clamped into the tensor in
        # element order: one task; so does a scatter fold, which folds in iteration order. (A
        # matmul's window store is tiled as usual; every tile of it counts as writing the whole
        # tensor, written_elements.)
        op.tile_m, op.tile_n = op.M, op.N
        return [Task(-1, 0, op.B, 0, op.M, 0, op.N)]
    if op.kind == "put":
        return _put_tiles(op, num_workers, tile_m, tile_n)
    if platform == "gpu":
        tb, tm, tn = gpu_tile_shape(op, num_workers)
        if op.kind != "reduce":
            tn = min(op.N, tile_n or tn)
        tm = max(1, min(op.M, tile_m or tm))
    elif op.kind == "matmul":
        default_n = 64
        if op.M <= 8:
            # GEMV-like (decode): a tile reads a K x tn slab of weights row by row; wide slabs, one
            # per worker, stream memory better than many narrow strided ones.
            default_n = max(64, -(-math.ceil(op.N / num_workers) // 64) * 64)
        tn = min(op.N, tile_n or default_n)
        # 32 rows; more when a tile has few terms per output (a convolution's im2col over 9
        # taps: K = 9), so each task keeps about _MIN_TASK_MACS multiply-adds to pay for its
        # scheduling (784 tasks of 32 x 32 x 9 spent more time being scheduled than computing).
        rows = 32 * math.ceil(_MIN_TASK_MACS / (32 * tn * max(1, op.K)))
        rows = min(rows, max(32, math.ceil(op.M / max(1, num_workers))))  # a tile per worker
        tm = min(op.M, tile_m or rows)
        tb = max(1, min(op.B, 2048 // max(1, tm * tn)))
    elif op.kind == "map":
        tn = min(op.N, tile_n or 1024)
        tm = max(1, min(op.M, tile_m or max(1, 4096 // tn)))
        tb = 1
    else:  # CPU reduce: whole rows; split rows so every worker gets some
        tn = 1
        tm = tile_m or max(1, min(op.M, 16384 // max(1, op.K)))
        tm = max(1, min(tm, math.ceil(op.M / max(1, num_workers))))
        tb = 1
    op.tile_m, op.tile_n = tm, tn
    tasks = []
    for b0 in range(0, op.B, tb):
        for m0 in range(0, op.M, tm):
            for n0 in range(0, op.N, tn):
                tasks.append(
                    Task(-1, b0, min(op.B, b0 + tb), m0, min(op.M, m0 + tm), n0, min(op.N, n0 + tn))
                )
    return tasks


def _put_tiles(op: Op, num_workers: int, tile_m: int | None, tile_n: int | None) -> list[Task]:
    """A put op: one source rank per task (a consumer then waits for exactly the ranks whose rows
    it reads) and row tiles, so that a producer's finished rows go out while it computes the
    rest; about one tile per worker and at most 16K elements per tile."""
    tn = min(op.N, tile_n or 4096)
    rows = max(1, min(op.M, 16384 // max(1, tn)))
    tm = max(1, min(op.M, tile_m or max(-(-op.M // max(1, num_workers)), 1), rows))
    op.tile_m, op.tile_n = tm, tn
    return [
        Task(-1, b, b + 1, m0, min(op.M, m0 + tm), n0, min(op.N, n0 + tn))
        for b in range(op.B)
        for m0 in range(0, op.M, tm)
        for n0 in range(0, op.N, tn)
    ]


# ---- read / write sets ----------------------------------------


def tile_linear(op: Op, task: Task) -> np.ndarray:
    """Flat output indices a task writes."""
    b = np.arange(task.b0, task.b1, dtype=np.int64)
    m = np.arange(task.m0, task.m1, dtype=np.int64)
    n = np.arange(task.n0, task.n1, dtype=np.int64)
    return ((b[:, None, None] * op.M + m[None, :, None]) * op.N + n[None, None, :]).ravel()


def written_elements(plan: Plan, task: Task) -> np.ndarray:
    """Flat elements of its output tensor a task writes over all iterations of its loop."""
    op = plan.ops[task.op]
    if op.store_view >= 0:  # a window store may write any element of its tensor
        return np.arange(plan.tensors[op.out].num_elements, dtype=np.int64)
    lin = tile_linear(op, task)
    if not op.stacked:
        return lin
    slices = np.arange(plan.loops[op.loop].trip_count, dtype=np.int64)  # every slice, any order
    return (lin[None, :] + slices[:, None] * (op.B * op.M * op.N)).ravel()


def epilogue_shape(plan: Plan, op: Op) -> tuple[int, ...]:
    """The index space of op's epilogue: its output's shape (a stacked op: one slice)."""
    shape = tuple(plan.tensors[op.out].shape)
    return shape[1:] if op.stacked else shape


def _all_iterations(plan: Plan, op_index: int, view, off: np.ndarray) -> np.ndarray:
    """Elements a view reads at iteration 0 (off), moved to every iteration of op's loops (the
    innermost by iter_stride, the one around it by outer_iter_stride)."""
    chain = plan.loop_chain(op_index)
    steps = np.zeros(1, dtype=np.int64)
    for loop, stride in zip(chain[::-1], (view.iter_stride, view.outer_iter_stride), strict=False):
        trips = plan.loops[loop].trip_count
        if stride and trips > 1:
            more = np.arange(trips, dtype=np.int64) * stride
            steps = (steps[None, :] + more[:, None]).ravel()
    if steps.size == 1:
        return off
    return (off.ravel()[None, :] + steps[:, None]).ravel()


def _offsets(view, idx: tuple[np.ndarray, ...]) -> np.ndarray:
    off = np.full(idx[0].shape if idx else (1,), view.offset, dtype=np.int64)
    for d, s in enumerate(view.strides):
        if s:
            off = off + idx[d] * s
    return off


def program_views(program) -> list[int]:
    return [int(i.a) for i in program if i.op in ("load", "load_at")]


def task_reads(
    plan: Plan, task: Task, only: set[int] | dict | None = None
) -> list[tuple[int, np.ndarray]]:
    """(tensor id, flat element indices) the task reads, per view; only tensors in `only` if given
    (skipping never-produced weights saves most of the planning time of a GEMV chain)."""
    op = plan.ops[task.op]

    def want(tensor: int) -> bool:
        return only is None or tensor in only

    reads: list[tuple[int, np.ndarray]] = []
    if op.kind == "put":
        # The source tile for every peer (the plan is the same on every rank; the rank that
        # runs the copy is only known at run time).
        av = plan.views[op.a_view]
        if want(av.tensor):
            p = np.arange(op.B, dtype=np.int64)
            m = np.arange(task.m0, task.m1, dtype=np.int64)
            n = np.arange(task.n0, task.n1, dtype=np.int64)
            s = av.strides
            off = av.offset + p[:, None, None] * s[0] + m[None, :, None] * s[1] + n * s[2]
            # in a loop the source view moves with the iteration (iter_stride), as any view
            reads.append((av.tensor, _all_iterations(plan, task.op, av, np.unique(off.ravel()))))
        return reads
    if op.kind == "matmul":
        av, bv = plan.views[op.a_view], plan.views[op.b_view]
        b = np.arange(task.b0, task.b1, dtype=np.int64)
        k = np.arange(op.K, dtype=np.int64)
        if want(av.tensor):
            m = np.arange(task.m0, task.m1, dtype=np.int64)
            sa = av.strides
            a_off = av.offset + b[:, None, None] * sa[0] + m[None, :, None] * sa[1] + k * sa[2]
            reads.append((av.tensor, _all_iterations(plan, task.op, av, a_off.ravel())))
        if want(bv.tensor):
            n = np.arange(task.n0, task.n1, dtype=np.int64)
            sb = bv.strides
            b_off = bv.offset + b[:, None, None] * sb[0] + k[None, :, None] * sb[1] + n * sb[2]
            reads.append((bv.tensor, _all_iterations(plan, task.op, bv, b_off.ravel())))
    if op.kind == "reduce" and op.prologue:
        kept = op.iter_dims[: op.kept_rank]
        red = op.iter_dims[op.kept_rank :]
        m_idx = np.unravel_index(np.arange(task.m0, task.m1, dtype=np.int64), kept) if kept else ()
        r_idx = np.unravel_index(np.arange(op.K, dtype=np.int64), red) if red else ()
        # a scatter fold's one task walks the prologue's space once (its M is the output's size)
        rows = 1 if op.scatter_fold else task.m1 - task.m0
        for v in program_views(op.prologue):
            view = plan.views[v]
            if not want(view.tensor):
                continue
            s = view.strides
            mk = np.zeros(rows, dtype=np.int64)
            for d in range(len(kept)):
                mk = mk + m_idx[d] * s[d]
            rr = np.zeros(op.K, dtype=np.int64)
            for d in range(len(red)):
                rr = rr + r_idx[d] * s[len(kept) + d]
            off = (view.offset + mk[:, None] + rr[None, :]).ravel()
            reads.append((view.tensor, _all_iterations(plan, task.op, view, off)))
    # load_at reads an element chosen at run time (a device index): any element of its tensor.
    for ins in list(op.prologue) + list(op.epilogue):
        if ins.op == "load_at" and want(plan.views[int(ins.a)].tensor):
            tensor = plan.views[int(ins.a)].tensor
            reads.append((tensor, np.arange(plan.tensors[tensor].num_elements, dtype=np.int64)))
    views = [v for v in program_views(op.epilogue) if want(plan.views[v].tensor)]
    if views:
        # a window store's epilogue walks the window (iter_dims), not its output tensor (a
        # scatter fold's walks its output: the first values)
        walks_window = op.store_view >= 0 and not op.scatter_fold
        out_shape = tuple(op.iter_dims) if walks_window else epilogue_shape(plan, op)
        lin = tile_linear(op, task)
        idx = np.unravel_index(lin, out_shape) if out_shape else ()
        for v in views:
            view = plan.views[v]
            off = _offsets(view, idx) if out_shape else np.array([view.offset])
            reads.append((view.tensor, _all_iterations(plan, task.op, view, off)))
    return reads


def _producers(plan: Plan) -> dict[int, int]:
    return {op.out: i for i, op in enumerate(plan.ops)}


def writer_ops(plan: Plan) -> dict[int, list[int]]:
    """Each written tensor's writer ops in program order (several only for a chain of window
    stores updating one buffer)."""
    writers: dict[int, list[int]] = {}
    for i, op in enumerate(plan.ops):
        writers.setdefault(op.out, []).append(i)
    return writers


def required_dependencies(plan: Plan) -> list[set[int]]:
    """For each task, the tasks that must finish before it: read-after-write (producer tiles of
    every element read) and write-after-read (earlier users of reused workspace bytes)."""
    n = len(plan.tasks)
    need: list[set[int]] = [set() for _ in range(n)]
    producer = _producers(plan)
    owner: dict[int, np.ndarray] = {}
    for tid, spec in enumerate(plan.tensors):
        if tid in producer:
            owner[tid] = np.full(spec.num_elements, -1, dtype=np.int64)
    written: list[np.ndarray] = []
    for t, task in enumerate(plan.tasks):
        op = plan.ops[task.op]
        lin = written_elements(plan, task)
        written.append(lin)
        owner[op.out][lin] = t
    # write-after-write: window stores updating one tensor in turn (a chain of
    # dynamic_update_slices of one buffer) run in program order, each window possibly overlapping
    # the one before; a read after the last store then depends on every store through it.
    tasks_of: dict[int, list[int]] = {}
    for t, task in enumerate(plan.tasks):
        tasks_of.setdefault(task.op, []).append(t)
    for ops in writer_ops(plan).values():
        for before, after in zip(ops, ops[1:], strict=False):
            for t in tasks_of.get(after, []):
                need[t].update(tasks_of.get(before, []))
    tiles_of = {  # the tasks of a window store with several (a matmul's), by task
        t: tasks_of[task.op]
        for t, task in enumerate(plan.tasks)
        if plan.ops[task.op].store_view >= 0 and len(tasks_of[task.op]) > 1
    }
    # read intervals of workspace tensors, for the write-after-read check below
    read_span: dict[int, list[tuple[int, int, int]]] = {}
    for t, task in enumerate(plan.tasks):
        for tensor, idx in task_reads(plan, task, owner):
            if idx.size == 0:
                continue
            prod = owner[tensor][idx]
            prod = prod[prod >= 0]
            if prod.size:  # bincount: the distinct producers, much faster than np.unique here
                producers = [int(p) for p in np.flatnonzero(np.bincount(prod)) if p != t]
                # A window store's tasks each count as writing its whole tensor, so `owner` names
                # only its last one: a reader depends on every tile of a (matmul's) tiled one,
                # and in a loop every tile waits for the reader before its next run.
                producers = [
                    q for p in producers for q in (tiles_of[p] if p in tiles_of else (p,)) if q != t
                ]
                need[t].update(producers)
                for p in producers:
                    # A tensor written in a loop t is in too is written again next iteration: its
                    # writer waits for this read (write-after-read; same or next iteration of the
                    # innermost common loop, see carried)
                    if plan.common_depth(task.op, plan.tasks[p].op) > 0:
                        need[p].add(t)
            if plan.tensors[tensor].storage == "workspace":
                read_span.setdefault(tensor, []).append((t, int(idx.min()), int(idx.max())))
    # In a loop, its window may overlap the previous iteration's: each tile waits for every other
    # tile's previous run (a dependency within one op is carried), the runs of one task are in
    # order anyway.
    for i, op in enumerate(plan.ops):
        tiles = tasks_of.get(i, [])
        if op.store_view >= 0 and plan.loop_chain(i) and len(tiles) > 1:
            for t in tiles:
                need[t].update(q for q in tiles if q != t)
    # write-after-read on an aliased result: its writers overwrite the operand it aliases, so
    # every task reading that operand must finish first
    for t, task in enumerate(plan.tasks):
        out = plan.tensors[plan.ops[task.op].out]
        if out.storage != "result" or out.alias < 0:
            continue
        sources = {a for a in plan.args if plan.tensors[a].index == out.alias}
        for r, other in enumerate(plan.tasks):
            if r != t and any(tensor in sources for tensor, _ in task_reads(plan, other)):
                need[t].add(r)
    # write-after-read on reused workspace bytes
    ws = [i for i, s in enumerate(plan.tensors) if s.storage == "workspace" and i in producer]
    for y in ws:
        ys = plan.tensors[y]
        y_lo, y_hi = ys.byte_offset, ys.byte_offset + ys.nbytes
        for x in ws:
            if x == y or producer[x] >= producer[y]:
                continue
            xs = plan.tensors[x]
            if xs.byte_offset >= y_hi or xs.byte_offset + xs.nbytes <= y_lo:
                continue
            size_x, size_y = DTYPE_SIZES[xs.dtype], DTYPE_SIZES[ys.dtype]
            users = read_span.get(x) or [
                (t, int(written[t].min()), int(written[t].max()))
                for t, task in enumerate(plan.tasks)
                if task.op == producer[x]
            ]
            for w, task in enumerate(plan.tasks):
                if task.op != producer[y]:
                    continue
                w_lo = ys.byte_offset + int(written[w].min()) * size_y
                w_hi = ys.byte_offset + (int(written[w].max()) + 1) * size_y
                for r, lo, hi in users:
                    r_lo = xs.byte_offset + lo * size_x
                    r_hi = xs.byte_offset + (hi + 1) * size_x
                    if r_lo < w_hi and w_lo < r_hi and r != w:
                        need[w].add(r)
    return need


# ---- workspace ----------------------------------------


def _allocate_workspace(plan: Plan) -> int:
    """Liveness-based first-fit: tensors whose [producer op, last reader op] ranges are disjoint may
    share bytes (required_dependencies then orders the later writer after the earlier readers)."""
    producer = _producers(plan)
    last_use = dict(producer)
    first_use = dict(producer)
    for i, op in enumerate(plan.ops):
        views = program_views(op.prologue) + program_views(op.epilogue)
        if op.kind == "matmul":
            views += [op.a_view, op.b_view]
        elif op.kind == "put":
            views.append(op.a_view)  # the source a put copies out to the peers
        for v in views:
            t = plan.views[v].tensor
            last_use[t] = max(last_use.get(t, i), i)
            first_use[t] = min(first_use.get(t, i), i)
    # A tensor used inside a loop is used at every iteration: it lives over the whole loop (its
    # bytes are never shared with another tensor of the loop, whatever the iteration).
    for loop in plan.loops:
        for t in last_use:
            if first_use[t] < loop.end_op and last_use[t] >= loop.first_op:
                first_use[t] = min(first_use[t], loop.first_op)
                last_use[t] = max(last_use[t], loop.end_op - 1)
    # A put's inbox is written by peers whenever they get there: live for the whole plan, so no
    # other tensor shares its bytes (a local write-after-read dependency cannot order a peer).
    # So is a read-in-place put's source: peers read it whenever they get there.
    inboxes = {op.out for op in plan.ops if op.kind == "put"} | {
        plan.views[op.a_view].tensor for op in plan.ops if op.kind == "put" and op.read_in_place
    }
    for t in inboxes:
        first_use[t] = -1
        last_use[t] = len(plan.ops)
    placed: list[tuple[int, int, int, int]] = []  # (first op, last op, lo, hi)
    top = 0
    # Inboxes (and read-in-place sources) first: live for the whole plan, they then fill
    # [0, inbox bytes) and nothing else lands there, which is the part of the workspace the
    # executors keep in the group's symmetric (peer-mapped) region
    # (cuda/include/jax_ark/gpu/persistent_comm_device.hpp).
    for t in sorted(
        (t for t, s in enumerate(plan.tensors) if s.storage == "workspace"),
        key=lambda t: (t not in inboxes, producer.get(t, 0)),
    ):
        spec = plan.tensors[t]
        first, last = first_use.get(t, 0), last_use.get(t, 0)
        size = -(-spec.nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
        busy = sorted((lo, hi) for f, la, lo, hi in placed if not (la < first or last < f))
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        spec.byte_offset = offset
        placed.append((first, last, offset, offset + size))
        top = max(top, offset + size)
    return top


# ---- placement ----------------------------------------


def task_costs(plan: Plan) -> list[float]:
    """Rough relative cost of each task (flops + bytes + a fixed per-task overhead)."""
    costs = []
    for t, task in enumerate(plan.tasks):
        op = plan.ops[task.op]
        elems = (task.b1 - task.b0) * (task.m1 - task.m0) * (task.n1 - task.n0)
        moved = elems * (op.K + 1) if op.kind != "map" else 2 * elems
        if op.kind == "put":  # one copy per rank of the group, and waiting for the peers
            moved = 2 * elems * op.B
        costs.append(plan.flops(t) + moved + 2000.0)
    return costs


def _place(plan: Plan) -> list[list[int]]:
    """List scheduling: highest bottom level (critical path to the end) first, on the worker that
    can start it earliest. The assignment order is a topological order of dependencies, so queues
    built from it can never deadlock."""
    n = len(plan.tasks)
    costs = task_costs(plan)
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for t, task in enumerate(plan.tasks):
        for d in task.deps:
            if not plan.carried(t, d):  # an earlier iteration's: no order within one iteration
                succ[d].append(t)
                indeg[t] += 1
    bottom = [0.0] * n
    for t in reversed(range(n)):  # tasks are created in op order: producers before consumers
        bottom[t] = costs[t] + max((bottom[s] for s in succ[t]), default=0.0)
    finish = [0.0] * n
    free = [0.0] * plan.num_workers
    queues: list[list[int]] = [[] for _ in range(plan.num_workers)]
    ready = [(-bottom[t], t) for t in range(n) if indeg[t] == 0]
    heapq.heapify(ready)
    while ready:
        _, t = heapq.heappop(ready)
        est = max((finish[d] for d in plan.tasks[t].deps if not plan.carried(t, d)), default=0.0)
        w = min(range(plan.num_workers), key=lambda w: (max(free[w], est), w))
        finish[t] = max(free[w], est) + costs[t]
        free[w] = finish[t]
        queues[w].append(t)
        for s in succ[t]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (-bottom[s], s))
    # Loops: a worker runs its tasks of a loop as one segment, once per iteration, so each queue
    # lists the tasks before a loop, then the loop's, then those after (stable: the order within
    # a stage stays topological). docs/plan_format.md, "Loops", says why this cannot deadlock.
    if plan.loops:
        queues = [sorted(q, key=lambda t: stage_of(plan, plan.tasks[t].op)) for q in queues]
    return queues


def stage_of(plan: Plan, op: int) -> int:
    """How many loop boundaries (a loop's first op or end op, a while loop's first body op) are at
    or before op: the stages are the runs of ops between boundaries (before a loop, an outer
    loop's ops before its inner loop, the inner loop, a while loop's head and body, ...). Queues
    and same-iteration dependencies only go from a stage to the same or a later one (a carried
    dependency goes to an earlier iteration instead)."""
    bounds = {b for loop in plan.loops for b in (loop.first_op, loop.end_op)}
    bounds |= {loop.pred_op + 1 for loop in plan.loops if loop.pred_op >= 0}  # while: head | body
    return sum(1 for b in bounds if b <= op)


def build_plan(
    traced: TraceResult,
    num_workers: int,
    tile_m: int | None = None,
    tile_n: int | None = None,
    platform: str = "cpu",
) -> Plan:
    """platform "cpu" / "gpu" picks the default tile shapes (explicit tile_m / tile_n win)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform must be 'cpu' or 'gpu', got {platform!r}")
    tasks: list[Task] = []
    for i, op in enumerate(traced.ops):
        for task in _tiles(op, num_workers, tile_m, tile_n, platform):
            task.op = i
            tasks.append(task)
    plan = Plan(
        num_workers=num_workers,
        tensors=traced.tensors,
        views=traced.views,
        ops=traced.ops,
        tasks=tasks,
        queues=[],
        num_inputs=traced.num_inputs,
        args=traced.args,
        outputs=traced.outputs,
        constants=traced.constants,
        workspace_bytes=0,
        loops=traced.loops,
        comm=traced.comm,
    )
    for i, op in enumerate(plan.ops):
        # The tracer asks for every put outside loops to be read in place on the CPU; the
        # finished plan says whether each can be (its source may be an argument, ...).
        if op.kind == "put" and op.read_in_place:
            op.read_in_place = platform == "cpu" and not read_in_place_problem(plan, i)
    plan.workspace_bytes = _allocate_workspace(plan)
    for task, deps in zip(plan.tasks, required_dependencies(plan), strict=True):
        task.deps = sorted(deps)
    plan.queues = _place(plan)
    return plan
