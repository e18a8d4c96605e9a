"""Python reference interpreter: runs a plan task by task with numpy, in the documented math order.

It exists to diff-test the planner without C++ and the C++ / CUDA executors against it. Workspace
tensors are views into one byte buffer (so liveness-based reuse is exercised) that starts as NaN
bytes, so a missing dependency shows up as wrong numbers.
"""

from __future__ import annotations

import numpy as np
import scipy.special

from jax_ark._persistent._format import Instr, Plan, PlanError, np_dtype
from jax_ark._persistent._schedule import tile_linear

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
}


def round_to(v: np.ndarray, dtype: str) -> np.ndarray:
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


def _eval(plan: Plan, prog: list[Instr], idx, shape, acc, buffers) -> np.ndarray:
    regs: list[np.ndarray] = []
    with np.errstate(all="ignore"):
        for ins in prog:
            if ins.op == "load_acc":
                r = acc
            elif ins.op == "load":
                view = plan.views[int(ins.a)]
                off = np.full(shape, view.offset, dtype=np.int64)
                for d, s in enumerate(view.strides):
                    if s:
                        off = off + idx[d] * s
                r = buffers[view.tensor][off].astype(np.float32)
            elif ins.op == "const":
                r = np.full(shape, np.float32(ins.a), dtype=np.float32)
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
    return regs[-1]


def run_task(plan: Plan, t: int, buffers: dict[int, np.ndarray]) -> None:
    task = plan.tasks[t]
    op = plan.ops[task.op]
    out = plan.tensors[op.out]
    lin = tile_linear(op, task)
    acc = None
    with np.errstate(all="ignore"):
        if op.kind == "matmul":
            av, bv = plan.views[op.a_view], plan.views[op.b_view]
            b = np.arange(task.b0, task.b1)[:, None, None]
            m = np.arange(task.m0, task.m1)[None, :, None]
            n = np.arange(task.n0, task.n1)[None, None, :]
            k = np.arange(op.K)
            a_tile = buffers[av.tensor][
                av.offset + b * av.strides[0] + m * av.strides[1] + k[None, None, :] * av.strides[2]
            ].astype(np.float32)
            b_tile = buffers[bv.tensor][
                bv.offset + b * bv.strides[0] + k[None, :, None] * bv.strides[1] + n * bv.strides[2]
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
            vals = _eval(plan, op.prologue, idx, (rows, K), None, buffers)
            if op.reduce_kind == "sum":
                acc = np.zeros(rows, np.float32)
                for r in range(K):
                    acc = acc + vals[:, r]
            else:
                acc = np.full(rows, -np.inf, np.float32)
                for r in range(K):
                    acc = np.maximum(acc, vals[:, r])
            acc = round_to(acc, op.acc_dtype)
    idx = np.unravel_index(lin, out.shape) if out.shape else ()
    if not out.shape:
        idx = ()
    value = _eval(plan, op.epilogue, idx, lin.shape, acc, buffers)
    buffers[op.out][lin] = value.astype(np_dtype(out.dtype))


def _buffers(plan: Plan, args: list[np.ndarray]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    workspace = np.full(max(plan.workspace_bytes, 1), 0xFF, dtype=np.uint8)  # 0xFF.. = NaN
    buffers: dict[int, np.ndarray] = {}
    for tid, spec in enumerate(plan.tensors):
        dt = np_dtype(spec.dtype)
        if spec.storage == "arg":
            arr = np.asarray(args[spec.index])
            buffers[tid] = np.ascontiguousarray(arr).astype(dt, copy=False).reshape(-1)
        elif spec.storage == "result":
            buffers[tid] = np.full(spec.num_elements, np.nan, np.float32).astype(dt)
        else:
            raw = workspace[spec.byte_offset : spec.byte_offset + spec.nbytes]
            buffers[tid] = raw.view(dt)
    return buffers, workspace


def execution_order(plan: Plan, rng: np.random.Generator | None = None) -> list[int]:
    """An order in which workers could run their queues (each waits for its task's dependencies);
    with rng, the next worker to advance is random (a stand-in for arbitrary timing)."""
    done = [False] * len(plan.tasks)
    pos = [0] * plan.num_workers
    order: list[int] = []
    while len(order) < len(plan.tasks):
        ready = [
            w
            for w, q in enumerate(plan.queues)
            if pos[w] < len(q) and all(done[d] for d in plan.tasks[q[pos[w]]].deps)
        ]
        if not ready:
            stuck = [
                plan.task_name(q[pos[w]]) for w, q in enumerate(plan.queues) if pos[w] < len(q)
            ]
            raise PlanError(f"plan deadlocks: every worker waits ({'; '.join(stuck)})")
        for w in [ready[rng.integers(len(ready))]] if rng is not None else ready:
            t = plan.queues[w][pos[w]]
            pos[w] += 1
            done[t] = True
            order.append(t)
    return order


def interpret(plan: Plan, *args, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Runs the plan on numpy inputs (user inputs only; constants come from the plan)."""
    if len(args) != plan.num_inputs:
        raise ValueError(f"plan takes {plan.num_inputs} inputs, got {len(args)}")
    full = list(args) + [plan.constants[t] for t in plan.args[plan.num_inputs :]]
    buffers, _ = _buffers(plan, full)
    for t in execution_order(plan, rng):
        run_task(plan, t, buffers)
    return [buffers[o].reshape(plan.tensors[o].shape) for o in plan.outputs]
