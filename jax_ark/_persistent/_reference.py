"""Python reference interpreter: runs a plan task by task with numpy, in the documented math order.

It exists to diff-test the planner without C++ and the C++ / CUDA executors against it. Workspace
tensors are views into one byte buffer (so liveness-based reuse is exercised) that starts as NaN
bytes, so a missing dependency shows up as wrong numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.special

from jax_ark._persistent._format import (
    ARG_REDUCES,
    DROP_STORE,
    INT_DTYPES,
    INT_REDUCES,
    Instr,
    Plan,
    PlanError,
    np_dtype,
)
from jax_ark._persistent._schedule import epilogue_shape, tile_linear

_UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "tanh": np.tanh,
    "logistic": lambda x: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "sqrt": np.sqrt,
    "rsqrt": lambda x: np.float32(1) / np.sqrt(x),
    "erf": lambda x: scipy.special.erf(x).astype(np.float32),
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "square": lambda x: x * x,
    "sign": np.sign,
    "copy": lambda x: x,
}
_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "eq": lambda a, b: (a == b).astype(np.float32),
    "ne": lambda a, b: (a != b).astype(np.float32),
    "lt": lambda a, b: (a < b).astype(np.float32),
    "le": lambda a, b: (a <= b).astype(np.float32),
    "gt": lambda a, b: (a > b).astype(np.float32),
    "ge": lambda a, b: (a >= b).astype(np.float32),
    "rem": np.fmod,
}


def _s(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint32).view(np.int32).astype(np.int64)


def _u(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint32).astype(np.int64)


def _bits(x: np.ndarray) -> np.ndarray:
    """int64 values -> uint32 bits (two's complement wrap)."""
    return (np.asarray(x, np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _flag(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _idiv(a, b):
    sa, sb = _s(a), _s(b)
    safe = np.where(sb == 0, 1, sb)
    q = np.abs(sa) // np.abs(safe) * np.sign(sa) * np.sign(safe)  # truncation toward zero
    return _bits(np.where(sb == 0, -1, q))


def _irem(a, b):
    sa, sb = _s(a), _s(b)
    safe = np.where(sb == 0, 1, sb)
    q = np.abs(sa) // np.abs(safe) * np.sign(sa) * np.sign(safe)
    return _bits(np.where(sb == 0, sa, sa - q * safe))


def _shift(a, b, kind):
    sa, ub = _s(a), _u(b)
    amount = np.minimum(ub, 31)
    if kind == "shl":
        r = np.where(ub >= 32, 0, _u(a) << amount)
    elif kind == "shra":
        r = np.where(ub >= 32, np.where(sa < 0, -1, 0), sa >> amount)
    else:
        r = np.where(ub >= 32, 0, _u(a) >> amount)
    return _bits(r)


def _f2i(x, unsigned: bool):
    x = np.asarray(x, np.float32).astype(np.float64)
    lo, hi = (0, 2**32 - 1) if unsigned else (-(2**31), 2**31 - 1)
    t = np.trunc(np.where(np.isnan(x), 0, np.clip(x, lo, hi)))
    return _bits(t.astype(np.int64))


def _ipow(x, n: int):
    p = np.ones_like(_u(x))
    for _ in range(n):
        p = (p * _u(x)) & 0xFFFFFFFF
    return _bits(p)


# Integer opcodes: uint32 bit registers in, uint32 bits (or float32 0/1 flags) out.
_INT_BINARY = {
    "iadd": lambda a, b: _bits(_u(a) + _u(b)),
    "isub": lambda a, b: _bits(_u(a) - _u(b)),
    "imul": lambda a, b: _bits(_u(a) * _u(b)),
    "idiv": _idiv,
    "irem": _irem,
    "udiv": lambda a, b: _bits(np.where(_u(b) == 0, 2**32 - 1, _u(a) // np.maximum(_u(b), 1))),
    "urem": lambda a, b: _bits(np.where(_u(b) == 0, _u(a), _u(a) % np.maximum(_u(b), 1))),
    "imax": lambda a, b: _bits(np.maximum(_s(a), _s(b))),
    "imin": lambda a, b: _bits(np.minimum(_s(a), _s(b))),
    "umax": lambda a, b: _bits(np.maximum(_u(a), _u(b))),
    "umin": lambda a, b: _bits(np.minimum(_u(a), _u(b))),
    "and": lambda a, b: _bits(_u(a) & _u(b)),
    "or": lambda a, b: _bits(_u(a) | _u(b)),
    "xor": lambda a, b: _bits(_u(a) ^ _u(b)),
    "shl": lambda a, b: _shift(a, b, "shl"),
    "shra": lambda a, b: _shift(a, b, "shra"),
    "shrl": lambda a, b: _shift(a, b, "shrl"),
    "ieq": lambda a, b: _flag(_s(a) == _s(b)),
    "ine": lambda a, b: _flag(_s(a) != _s(b)),
    "ilt": lambda a, b: _flag(_s(a) < _s(b)),
    "ile": lambda a, b: _flag(_s(a) <= _s(b)),
    "igt": lambda a, b: _flag(_s(a) > _s(b)),
    "ige": lambda a, b: _flag(_s(a) >= _s(b)),
    "ult": lambda a, b: _flag(_u(a) < _u(b)),
    "ule": lambda a, b: _flag(_u(a) <= _u(b)),
    "ugt": lambda a, b: _flag(_u(a) > _u(b)),
    "uge": lambda a, b: _flag(_u(a) >= _u(b)),
}
_INT_UNARY = {
    "ineg": lambda x: _bits(-_s(x)),
    "not": lambda x: _bits(~_u(x)),
    "iabs": lambda x: _bits(np.abs(_s(x))),
    "isign": lambda x: _bits(np.sign(_s(x))),
    "i2f": lambda x: _s(x).astype(np.int32).astype(np.float32),
    "u2f": lambda x: _u(x).astype(np.uint32).astype(np.float32),
    "f2i": lambda x: _f2i(x, False),
    "f2u": lambda x: _f2i(x, True),
    "imov": lambda x: np.asarray(x, np.uint32),
}


def round_to(v: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in INT_DTYPES:  # integer registers hold bits; narrow ones wrap to their width
        bits = np.asarray(v).astype(np.uint32)
        if dtype in ("int32", "uint32"):
            return bits
        return _bits(bits.astype(np_dtype(dtype)).astype(np.int64))
    v = np.asarray(v, dtype=np.float32)
    if dtype in ("bfloat16", "float16"):
        return v.astype(np_dtype(dtype)).astype(np.float32)
    if dtype == "bool":
        return (v != 0).astype(np.float32)
    return v


def _integer_pow(x: np.ndarray, n: int) -> np.ndarray:
    p = np.ones_like(x) if n == 0 else x.copy()
    for _ in range(abs(n) - 1):
        p = p * x
    return np.float32(1) / p if n < 0 else p


def _eval(
    plan: Plan,
    prog: list[Instr],
    idx,
    shape,
    acc,
    buffers,
    all_regs: bool = False,
    its: tuple[int, ...] = (),
    op: int = -1,
    rank: int = 0,
):
    regs: list[np.ndarray] = []
    with np.errstate(all="ignore"):
        for ins in prog:
            if ins.op == "load_acc":
                r = acc
            elif ins.op in ("load", "load_at"):
                view = plan.views[int(ins.a)]
                at = view.offset + plan.view_shift(int(ins.a), op, its)
                off = np.full(shape, at, dtype=np.int64)
                for d, s in enumerate(view.strides):
                    if s:
                        off = off + idx[d] * s
                if ins.op == "load_at":  # moved by a device value, clamped into the tensor
                    off = off + _s(regs[int(ins.b)])
                    off = np.clip(off, 0, plan.tensors[view.tensor].num_elements - 1)
                src = buffers[view.tensor]
                if src.dtype.kind in "iu":  # narrow values sign- / zero-extended to 32 bits
                    r = _bits(src[off].astype(np.int64))
                else:
                    r = src[off].astype(np.float32)
            elif ins.op == "load_iter":  # the loop iteration (v3)
                r = np.full(shape, its[-1] if its else 0, dtype=np.uint32)
            elif ins.op == "load_rank":  # this rank in the plan's group (v3)
                r = np.full(shape, rank, dtype=np.uint32)
            elif ins.op == "const" and ins.dtype in INT_DTYPES:
                r = np.full(shape, int(ins.a) & 0xFFFFFFFF, dtype=np.uint32)
            elif ins.op == "const":
                r = np.full(shape, np.float32(ins.a), dtype=np.float32)
            elif ins.op == "bitcast":  # the 32 bits of one register kind as the other
                src = np.asarray(regs[int(ins.a)])
                r = src.view(np.float32 if src.dtype == np.uint32 else np.uint32)
            elif ins.op == "ipow":
                r = _ipow(regs[int(ins.a)], int(ins.b))
            elif ins.op in _INT_BINARY:
                r = _INT_BINARY[ins.op](regs[int(ins.a)], regs[int(ins.b)])
            elif ins.op in _INT_UNARY:
                r = _INT_UNARY[ins.op](regs[int(ins.a)])
            elif ins.op == "integer_pow":
                r = _integer_pow(regs[int(ins.a)], int(ins.b))
            elif ins.op in _UNARY:
                r = _UNARY[ins.op](regs[int(ins.a)])
            elif ins.op in _BINARY:
                r = _BINARY[ins.op](regs[int(ins.a)], regs[int(ins.b)])
            elif ins.op == "select":
                r = np.where(regs[int(ins.a)] != 0, regs[int(ins.c)], regs[int(ins.b)])
            else:
                raise PlanError(f"unknown opcode {ins.op!r}")
            regs.append(round_to(np.broadcast_to(r, shape), ins.dtype))
    return regs if all_regs else regs[-1]


def _run_put(
    plan: Plan, t: int, rank: int, group: list[dict[int, np.ndarray]], its: tuple[int, ...] = ()
) -> None:
    """Put task t on `rank` (plan v3) at iterations `its` of its loop: for every rank q and slot b
    of the task that the op's routing gives to `rank` (default: slot `rank` of every q, from row
    q), its tile of the source row (at that iteration) into slot b of q's inbox (in a loop: of
    the iteration's slice of the stacked inbox); a slot of `rank`'s own inbox that nobody sends
    to is zeroed."""
    task = plan.tasks[t]
    op = plan.ops[task.op]
    av = plan.views[op.a_view]
    at = av.offset + plan.view_shift(op.a_view, task.op, its)
    base = plan.stacked_slice(task.op, its) * op.B if op.stacked else 0
    m = np.arange(task.m0, task.m1)[:, None]
    n = np.arange(task.n0, task.n1)[None, :]
    for b in range(task.b0, task.b1):
        to = (((base + b) * op.M + m) * op.N + n).ravel()
        for q, buffers in enumerate(group):
            src_rank, row = route_of(op, q, b)
            if src_rank != rank:
                continue
            src = at + row * av.strides[0] + m * av.strides[1] + n * av.strides[2]
            buffers[op.out][to] = group[rank][av.tensor][src.ravel()]
        if route_of(op, rank, b)[0] < 0:
            group[rank][op.out][to] = 0


def route_of(op, q: int, b: int) -> tuple[int, int]:
    """(source rank, source row) of slot b of rank q's inbox of put op `op` (-1: no source)."""
    if op.recv_from is None:
        return b, q
    return op.recv_from[q][b], op.send_row[q][b]


def run_task(
    plan: Plan,
    t: int,
    buffers: dict[int, np.ndarray],
    its: tuple[int, ...] | int = (),
    rank: int = 0,
) -> None:
    """Runs task t at iterations `its` of its loops, outermost first (() outside loops; an int:
    the iteration of a loop that is not nested), on `rank` of the plan's group (0 without one)."""
    task = plan.tasks[t]
    op = plan.ops[task.op]
    if isinstance(its, int):
        its = (its,) if op.loop >= 0 else ()
    ev = {"its": its, "op": task.op, "rank": rank}
    if op.kind == "put":
        raise PlanError(f"{plan.task_name(t)} is a put: run the plan with interpret_group")
    out = plan.tensors[op.out]
    if op.scatter_fold:
        return _run_scatter_fold(plan, op, buffers, ev)
    lin = tile_linear(op, task)
    acc = None
    with np.errstate(all="ignore"):
        if op.kind == "matmul":
            av, bv = plan.views[op.a_view], plan.views[op.b_view]
            a_at = av.offset + plan.view_shift(op.a_view, task.op, its)
            b_at = bv.offset + plan.view_shift(op.b_view, task.op, its)
            b = np.arange(task.b0, task.b1)[:, None, None]
            m = np.arange(task.m0, task.m1)[None, :, None]
            n = np.arange(task.n0, task.n1)[None, None, :]
            k = np.arange(op.K)
            a_tile = buffers[av.tensor][
                a_at + b * av.strides[0] + m * av.strides[1] + k[None, None, :] * av.strides[2]
            ].astype(np.float32)
            b_tile = buffers[bv.tensor][
                b_at + b * bv.strides[0] + k[None, :, None] * bv.strides[1] + n * bv.strides[2]
            ].astype(np.float32)
            acc = np.zeros((task.b1 - task.b0, task.m1 - task.m0, task.n1 - task.n0), np.float32)
            for kk in range(op.K):  # k ascending, product and sum each rounded to float32
                acc = acc + a_tile[:, :, kk : kk + 1] * b_tile[:, kk : kk + 1, :]
            acc = round_to(acc.ravel(), op.acc_dtype)
        elif op.kind == "reduce":
            kept, red = op.iter_dims[: op.kept_rank], op.iter_dims[op.kept_rank :]
            rows, K = task.m1 - task.m0, op.K
            m_idx = np.unravel_index(np.arange(task.m0, task.m1), kept) if kept else ()
            r_idx = np.unravel_index(np.arange(K), red) if red else ()
            idx = tuple(np.broadcast_to(i[:, None], (rows, K)) for i in m_idx) + tuple(
                np.broadcast_to(i[None, :], (rows, K)) for i in r_idx
            )
            vals = _eval(plan, op.prologue, idx, (rows, K), None, buffers, **ev)
            acc = round_to(_fold(op.reduce_kind, vals), op.acc_dtype)
    if op.store_view >= 0:  # window store: the epilogue runs over iter_dims
        idx = np.unravel_index(lin, op.iter_dims) if op.iter_dims else ()
        regs = _eval(plan, op.epilogue, idx, lin.shape, acc, buffers, all_regs=True, **ev)
        view = plan.views[op.store_view]
        moved = _s(regs[op.store_at])
        keep = moved != DROP_STORE  # a scatter point out of bounds stores nothing
        at = np.full(lin.shape, view.offset, np.int64) + moved
        for d, stride in enumerate(view.strides):
            at = at + idx[d] * stride
        if op.kind == "map":  # one task: each element clamped into the tensor
            at = np.clip(at, 0, out.num_elements - 1)
        else:  # a matmul's tiles: an element outside the tensor is dropped
            keep &= (at >= 0) & (at < out.num_elements)
        lin, value = at[keep], regs[-1][keep]
    else:
        shape = epilogue_shape(plan, op)
        idx = np.unravel_index(lin, shape) if shape else ()
        value = _eval(plan, op.epilogue, idx, lin.shape, acc, buffers, **ev)
        if op.stacked:  # one slice of the stacked output per iteration
            lin = lin + plan.stacked_slice(task.op, its) * (op.B * op.M * op.N)
    _store(buffers, op.out, out.dtype, lin, value)


def _store(buffers, tensor: int, dtype: str, lin: np.ndarray, value: np.ndarray) -> None:
    if dtype in INT_DTYPES:  # the low bits (a narrow register holds an in-range value)
        buffers[tensor][lin] = value.astype(np.uint32).astype(np_dtype(dtype))
    else:
        buffers[tensor][lin] = value.astype(np_dtype(dtype))


def _run_scatter_fold(plan: Plan, op, buffers, ev) -> None:
    """A scatter fold (docs/plan_format.md, "Scatter folds"): the epilogue's first values over
    the whole output, then each prologue value over iter_dims folded into the element its store
    view and store_at register name, in iteration order, one rounding to the output's dtype per
    step. Round k applies every element's k-th value (the elements of one round are distinct)."""
    out = plan.tensors[op.out]
    lin = np.arange(out.num_elements, dtype=np.int64)
    idx = np.unravel_index(lin, out.shape) if out.shape else ()
    _store(
        buffers,
        op.out,
        out.dtype,
        lin,
        _eval(plan, op.epilogue, idx, lin.shape, None, buffers, **ev),
    )
    r = np.arange(op.K, dtype=np.int64)
    ridx = np.unravel_index(r, op.iter_dims) if op.iter_dims else ()
    regs = _eval(plan, op.prologue, ridx, r.shape, None, buffers, all_regs=True, **ev)
    view = plan.views[op.store_view]
    moved = _s(regs[op.store_at])
    at = view.offset + moved
    for d, stride in enumerate(view.strides):
        at = at + ridx[d] * stride
    keep = (moved != DROP_STORE) & (at >= 0) & (at < out.num_elements)
    at, value = at[keep], regs[-1][keep]
    order = np.argsort(at, kind="stable")  # by element, in iteration order within one
    sorted_at = at[order]
    starts = np.flatnonzero(np.r_[True, sorted_at[1:] != sorted_at[:-1]])
    occurrence = np.empty_like(order)
    occurrence[order] = np.arange(order.size) - np.repeat(
        starts, np.diff(np.r_[starts, order.size])
    )
    dst = buffers[op.out]
    with np.errstate(all="ignore"):
        for k in range(int(occurrence.max(initial=-1)) + 1):
            sel = occurrence == k
            e = at[sel]
            cur = (
                _bits(dst[e].astype(np.int64))
                if dst.dtype.kind in "iu"
                else dst[e].astype(np.float32)
            )
            new = round_to(_combine(op.reduce_kind, cur, value[sel]), out.dtype)
            _store(buffers, op.out, out.dtype, e, new)


# One step of each non-arg fold kind (tile_ops.hpp reduce_combine): integer kinds on the keyed
# 32-bit values (_s, or _u for the unsigned kinds; _bits keeps the low 32 bits, so sums and
# products wrap), float kinds in float32 (NaN propagates through maximum / minimum, as nan_max).
_INT_STEPS = {
    "isum": np.add, "iprod": np.multiply, "imax": np.maximum, "umax": np.maximum,
    "imin": np.minimum, "umin": np.minimum, "iand": np.bitwise_and, "ior": np.bitwise_or,
    "ixor": np.bitwise_xor,
}  # fmt: skip
_FLOAT_STEPS = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}


def _key(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    return _u if kind[0] == "u" else _s


def _combine(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One step of a fold of registers a and b (a scatter fold's; not arg kinds)."""
    if kind == "last":
        return b
    if kind in INT_REDUCES:
        return _bits(_INT_STEPS[kind](_key(kind)(a), _key(kind)(b)))
    return _FLOAT_STEPS[kind](a, b).astype(np.float32)


def _fold(kind: str, vals: np.ndarray) -> np.ndarray:
    """Folds vals[rows, K] along K, r ascending (docs/plan_format.md, REDUCE kinds)."""
    rows, K = vals.shape
    if kind in ARG_REDUCES:
        keyed = _s(vals) if kind in INT_REDUCES else vals.astype(np.float64)
        if kind in ("argmax", "argmin"):
            nan = np.isnan(keyed)
            # the first NaN wins; otherwise the first extremum
            keyed = np.where(nan, np.inf if kind == "argmax" else -np.inf, keyed)
            first_nan = np.where(nan.any(axis=1), np.argmax(nan, axis=1), -1)
        else:
            first_nan = np.full(rows, -1)
        best = np.argmax(keyed, axis=1) if kind.endswith("max") else np.argmin(keyed, axis=1)
        return _bits(np.where(first_nan >= 0, first_nan, best))
    if kind in INT_REDUCES:
        v = _key(kind)(vals)
        if kind == "iprod":  # wrapping: the low 32 bits after each multiplication
            acc = np.ones(rows, np.int64)
            for r in range(K):
                acc = (acc * v[:, r]) & 0xFFFFFFFF
            return _bits(acc)
        return _bits(_INT_STEPS[kind].reduce(v, axis=1))  # exact: sums are the low bits' sums
    acc = np.full(rows, {"sum": 0.0, "prod": 1.0, "max": -np.inf, "min": np.inf}[kind], np.float32)
    step = _FLOAT_STEPS[kind]
    for r in range(K):  # one float32 rounding per step, in order
        acc = step(acc, vals[:, r])
    return acc


def _buffers(plan: Plan, args: list[np.ndarray]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    workspace = np.full(max(plan.workspace_bytes, 1), 0xFF, dtype=np.uint8)  # 0xFF.. = NaN
    buffers: dict[int, np.ndarray] = {}
    for tid, spec in enumerate(plan.tensors):
        dt = np_dtype(spec.dtype)
        if spec.storage == "arg":
            arr = np.asarray(args[spec.index])
            buffers[tid] = np.ascontiguousarray(arr).astype(dt, copy=False).reshape(-1)
        elif spec.storage == "result" and spec.alias >= 0:
            pass  # the aliased operand's buffer itself (below): updated in place
        elif spec.storage == "result":
            fill = 0x5A if dt.kind in "iub" else 0xFF  # a recognizable non-result (NaN for floats)
            buffers[tid] = np.full(spec.nbytes, fill, np.uint8).view(dt)
        else:
            raw = workspace[spec.byte_offset : spec.byte_offset + spec.nbytes]
            buffers[tid] = raw.view(dt)
    by_index = {plan.tensors[a].index: a for a in plan.args}
    for tid, spec in enumerate(plan.tensors):
        if spec.storage == "result" and spec.alias >= 0:
            src = buffers[by_index[spec.alias]]
            buffers[by_index[spec.alias]] = buffers[tid] = src.copy()  # a caller's array stays
    return buffers, workspace


def dependency_target(plan: Plan, t: int, d: int, its: tuple[int, ...] | int) -> int:
    """What counters[d] must reach before task t's run at iterations `its` (docs/plan_format.md,
    "Loops"): counters count the finished runs of each task."""
    if isinstance(its, int):
        its = (its,) if plan.ops[plan.tasks[t].op].loop >= 0 else ()
    return plan.dependency_target(t, d, its)


class _Cursor:
    """A worker's position: its queue index and, inside the segments of its queue that hold its
    tasks of a loop (consecutive; an inner loop's inside its outer loop's), the iteration of each
    loop entered; at a while loop's check point, `pending_check` (plan_format.hpp QueueCursor)."""

    def __init__(self, plan: Plan, queue: list[int]):
        self.plan, self.queue, self.q = plan, queue, 0
        self.segs: list[list[int]] = []  # per entered loop: [begin, end, iteration, trips, loop]
        self.pending_check = self.checked = False
        self._settle()

    def _loop_at(self, q: int, level: int) -> int:
        chain = self.plan.loop_chain(self.plan.tasks[self.queue[q]].op)
        return chain[level] if level < len(chain) else -1

    def _needs_check(self) -> bool:
        if len(self.segs) != 1 or self.checked:
            return False
        pred = self.plan.loops[self.segs[0][4]].pred_op
        if pred < 0:
            return False
        return self.q == self.segs[0][1] or self.plan.tasks[self.queue[self.q]].op > pred

    def _settle(self) -> None:
        while True:
            if self._needs_check():
                self.pending_check = True
                return
            if not self.segs or self.q != self.segs[-1][1]:
                break
            seg = self.segs[-1]
            seg[2] += 1
            if seg[2] < seg[3]:
                self.q = seg[0]
                if len(self.segs) == 1:
                    self.checked = False
                continue
            self.segs.pop()
        before = len(self.segs)
        self._enter()
        if len(self.segs) > before and self._needs_check():
            self.pending_check = True

    def _enter(self) -> None:
        while self.q < len(self.queue):
            loop = self._loop_at(self.q, len(self.segs))
            if loop < 0:
                return
            end = self.q + 1
            while end < len(self.queue) and self._loop_at(end, len(self.segs)) == loop:
                end += 1
            if not self.segs:
                self.checked = False
            self.segs.append([self.q, end, 0, self.plan.loops[loop].trip_count, loop])

    @property
    def done(self) -> bool:
        return self.q >= len(self.queue) and not self.pending_check

    def current(self) -> tuple[int, tuple[int, ...]]:
        return self.queue[self.q], tuple(seg[2] for seg in self.segs)

    def check_point(self) -> tuple[int, int]:
        """At a pending check: (the while loop, its iteration)."""
        return self.segs[0][4], self.segs[0][2]

    def segment(self) -> list[int]:
        """The worker's tasks of the entered top-level loop."""
        return self.queue[self.segs[0][0] : self.segs[0][1]]

    def advance(self) -> None:
        self.q += 1
        self._settle()

    def resolve_check(self, taken: bool) -> None:
        self.pending_check = False
        if taken:
            self.checked = True
        else:
            self.q = self.segs[0][1]
            self.segs = []
        self._settle()


Predicate = Callable[[int, int], bool]  # (while loop, iteration) -> does the body run


def execution_order(
    plan: Plan,
    rng: np.random.Generator | None = None,
    run: Callable[[int, tuple[int, ...]], None] | None = None,
    predicate: Predicate | None = None,
) -> list[tuple[int, tuple[int, ...]]]:
    """(task, iterations) pairs in an order in which workers could run their queues (each waits
    for its task's dependency targets); with rng, the next worker to advance is random (a
    stand-in for arbitrary timing). run(t, its) is called as each run is ordered, and
    predicate(loop, i) at a while loop's check point once the predicate task's run i is done
    (without one, a while loop runs its body until its guard, as if always true)."""
    count = [0] * len(plan.tasks)
    cursors = [_Cursor(plan, q) for q in plan.queues]
    order: list[tuple[int, tuple[int, ...]]] = []
    verdicts: dict[tuple[int, int], bool] = {}
    pred_task = {
        k: next((t for t, x in enumerate(plan.tasks) if x.op == loop.pred_op), -1)
        for k, loop in enumerate(plan.loops)
        if loop.pred_op >= 0
    }

    def runnable(c: _Cursor) -> bool:
        if c.pending_check:
            loop, i = c.check_point()
            return count[pred_task[loop]] >= i + 1
        t, its = c.current()
        return all(count[d] >= plan.dependency_target(t, d, its) for d in plan.tasks[t].deps)

    while any(not c.done for c in cursors):
        ready = [w for w, c in enumerate(cursors) if not c.done and runnable(c)]
        if not ready:
            stuck = [
                f"{plan.task_name(c.current()[0])} iterations {c.current()[1]}"
                if not c.pending_check
                else f"the check of while loop {c.check_point()[0]}"
                for c in cursors
                if not c.done
            ]
            raise PlanError(f"plan deadlocks: every worker waits ({'; '.join(stuck)})")
        for w in [ready[rng.integers(len(ready))]] if rng is not None else ready:
            c = cursors[w]
            if c.pending_check:
                loop, i = c.check_point()
                if (loop, i) not in verdicts:
                    verdicts[loop, i] = True if predicate is None else bool(predicate(loop, i))
                taken = verdicts[loop, i]
                if taken and i + 1 >= plan.loops[loop].trip_count and predicate is not None:
                    raise PlanError(
                        f"while loop {loop} ({plan.loops[loop].source}) did not end within "
                        f"{plan.loops[loop].trip_count - 1} iterations (its guard: raise "
                        "max_while_iterations or the loop's trip_count)"
                    )
                if not taken:  # the loop ended: its tasks count as finished
                    for t in c.segment():
                        count[t] = plan.trip_count(plan.tasks[t].op)
                c.resolve_check(taken)
                continue
            t, its = c.current()
            c.advance()
            count[t] = plan.run_index(plan.tasks[t].op, its) + 1
            order.append((t, its))
            if run is not None:
                run(t, its)
    return order


def interpret(plan: Plan, *args, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Runs the plan on numpy inputs (user inputs only; constants come from the plan)."""
    if len(args) != plan.num_inputs:
        raise ValueError(f"plan takes {plan.num_inputs} inputs, got {len(args)}")
    if plan.comm is not None:
        raise PlanError("the plan has put tasks (a communication group): use interpret_group")
    full = list(args) + [plan.constants[t] for t in plan.args[plan.num_inputs :]]
    buffers, _ = _buffers(plan, full)

    def predicate(loop: int, i: int) -> bool:
        return bool(buffers[plan.ops[plan.loops[loop].pred_op].out][i])

    execution_order(
        plan, rng, run=lambda t, its: run_task(plan, t, buffers, its), predicate=predicate
    )
    return [buffers[o].reshape(plan.tensors[o].shape) for o in plan.outputs]


def interpret_group(plan: Plan, per_rank_args: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Runs a plan with put tasks (v3) on every rank of its group: per_rank_args[r] are rank r's
    user inputs; returns each rank's outputs. All ranks follow one execution order, every task
    on every rank before the next task (the ranks run the same plan, so that order is one the
    executors could take)."""
    if plan.comm is None:
        raise PlanError("the plan has no communication group: use interpret")
    n = plan.comm.group_size
    if len(per_rank_args) != n:
        raise ValueError(f"the plan's group has {n} ranks, got inputs for {len(per_rank_args)}")
    group = []
    for args in per_rank_args:
        if len(args) != plan.num_inputs:
            raise ValueError(f"plan takes {plan.num_inputs} inputs, got {len(args)}")
        full = list(args) + [plan.constants[t] for t in plan.args[plan.num_inputs :]]
        group.append(_buffers(plan, full)[0])

    def predicate(loop: int, i: int) -> bool:
        # A while loop's decision must be the same on every rank (a predicate computed from a
        # psum is): a rank leaving the loop while another continues would leave puts unanswered.
        out = plan.ops[plan.loops[loop].pred_op].out
        verdicts = {bool(buffers[out][i]) for buffers in group}
        if len(verdicts) != 1:
            raise PlanError(
                f"while loop {loop} ({plan.loops[loop].source}): the ranks disagree on its "
                f"predicate at iteration {i}; with communication in the loop every rank must take "
                "the same decision"
            )
        return verdicts.pop()

    def run(t: int, it: tuple[int, ...]) -> None:
        if plan.ops[plan.tasks[t].op].kind == "put":
            for r in range(n):
                _run_put(plan, t, r, group, it)
        else:
            for r, buffers in enumerate(group):
                run_task(plan, t, buffers, it, rank=r)

    execution_order(plan, run=run, predicate=predicate)
    return [[b[o].reshape(plan.tensors[o].shape) for o in plan.outputs] for b in group]
