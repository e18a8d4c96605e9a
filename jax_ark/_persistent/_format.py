"""The plan data model: tensors, views, ops, tasks, queues; JSON and binary encodings.

The binary layout mirrors cuda/include/jax_ark/plan_format.hpp (docs/plan_format.md is normative).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# v2: int32 / uint32 tensors, integer opcodes; v3: loops (scan / fori_loop) and / or comm (put)
# ops, both optional sections (one plan with both is refused: no communication inside loops yet)
PLAN_VERSION = 3
MAGIC = 0x504B5241
MAX_RANK = 6
MAX_PROGRAM_LEN = 64
PROFILE_WORDS_PER_TASK = 4
WORKSPACE_ALIGN = 256
# Bounds the runtime enforces (cuda/include/jax_ark/plan_check.hpp); validate() checks them first.
MAX_WORKERS = 1024
MAX_INTEGER_POW_EXPONENT = 1 << 16
MAX_WORK = 1 << 45  # element-operations of a whole plan
MAX_MATMUL_PANEL = 1 << 28  # K x (n1 - n0) of one matmul task
MAX_TILING_CELLS = 1 << 24  # grid cells of an op's tiling
# The guard of a while loop by default: more body iterations fail the call (the plan's loop then
# has this + 1 iterations, one stacked predicate byte each).
DEFAULT_MAX_WHILE_ITERATIONS = 1 << 16
MAX_LOOP_DEPTH = 2  # a loop and loops inside its body (v3)
MAX_TRIP_COUNT = 1 << 24  # iterations of one loop (v3); a task's counter reaches its trip count
MAX_GROUP_SIZE = 4096  # v3: ranks of a plan's communication group
# A window store's offset register value that drops the element instead of storing it (a scatter
# point out of bounds; dynamic_update_slice clamps instead). plan_format.hpp kDropStore.
DROP_STORE = -(1 << 31)
INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)

DTYPE_CODES = {
    "float32": 0, "bfloat16": 1, "float16": 2, "bool": 3, "int32": 4, "uint32": 5,
    "int8": 6, "uint8": 7, "int16": 8, "uint16": 9,
}  # fmt: skip
DTYPE_SIZES = {
    "float32": 4, "bfloat16": 2, "float16": 2, "bool": 1, "int32": 4, "uint32": 4,
    "int8": 1, "uint8": 1, "int16": 2, "uint16": 2,
}  # fmt: skip
# Registers of these dtypes hold integer bits; every other register holds a float32 value. A
# narrow integer's register holds its value sign- (int) or zero- (uint) extended to 32 bits.
INT_DTYPES = frozenset({"int32", "uint32", "int8", "uint8", "int16", "uint16"})
NARROW_INT_DTYPES = frozenset({"int8", "uint8", "int16", "uint16"})
STORAGE_CODES = {"arg": 0, "result": 1, "workspace": 2}
OP_KIND_CODES = {"matmul": 1, "reduce": 2, "map": 3, "put": 4}  # put: v3 communication
REDUCE_CODES = {
    "sum": 0, "max": 1, "min": 2, "isum": 3, "imax": 4, "imin": 5, "umax": 6, "umin": 7,
    "argmax": 8, "argmin": 9, "iargmax": 10, "iargmin": 11, "prod": 12, "iprod": 13,
    "iand": 14, "ior": 15, "ixor": 16, "last": 17,
}  # fmt: skip
# Reduce kinds whose prologue yields integer bits (the others fold float32 values).
INT_REDUCES = frozenset(
    {"isum", "imax", "imin", "umax", "umin", "iargmax", "iargmin", "iprod", "iand", "ior", "ixor"}
)
ARG_REDUCES = frozenset({"argmax", "argmin", "iargmax", "iargmin"})
# Kinds a scatter fold (Op.scatter_fold) may combine with: every kind but the arg kinds; "last"
# (the value replaces the element: a scatter's `set`) is for scatter folds only.
SCATTER_FOLD_KINDS = frozenset(REDUCE_CODES) - ARG_REDUCES

OPCODES = {
    "load_acc": 0, "load": 1, "const": 2, "load_at": 3, "load_iter": 4, "load_rank": 5,
    "neg": 10, "exp": 11, "log": 12, "tanh": 13, "logistic": 14, "sqrt": 15, "rsqrt": 16,
    "erf": 17, "abs": 18, "integer_pow": 19, "sin": 20, "cos": 21, "log1p": 22, "expm1": 23,
    "square": 24, "sign": 25, "copy": 26,
    "add": 40, "sub": 41, "mul": 42, "div": 43, "max": 44, "min": 45, "pow": 46,
    "eq": 47, "ne": 48, "lt": 49, "le": 50, "gt": 51, "ge": 52, "rem": 53,
    "select": 60,
    "iadd": 70, "isub": 71, "imul": 72, "idiv": 73, "irem": 74, "udiv": 75, "urem": 76,
    "imax": 77, "imin": 78, "umax": 79, "umin": 80, "and": 81, "or": 82, "xor": 83,
    "shl": 84, "shra": 85, "shrl": 86,
    "ieq": 87, "ine": 88, "ilt": 89, "ile": 90, "igt": 91, "ige": 92,
    "ult": 93, "ule": 94, "ugt": 95, "uge": 96,
    "ineg": 100, "not": 101, "iabs": 102, "isign": 103, "i2f": 104, "u2f": 105, "f2i": 106,
    "f2u": 107, "imov": 108, "ipow": 109, "bitcast": 110,
}  # fmt: skip
UNARY_OPS = frozenset(k for k, v in OPCODES.items() if 10 <= v <= 26)
BINARY_OPS = frozenset(k for k, v in OPCODES.items() if 40 <= v <= 53)
# v2 integer opcodes: 32-bit register operands in, 32 bits out (XLA semantics, tile_ops.hpp).
INT_BINARY_OPS = frozenset(k for k, v in OPCODES.items() if 70 <= v <= 96)
INT_UNARY_OPS = frozenset(k for k, v in OPCODES.items() if 100 <= v <= 110)
# Opcodes whose operands are integer registers; the result is integer unless it is a comparison
# (bool) or a conversion to float.
INT_OPERAND_OPS = (INT_BINARY_OPS | INT_UNARY_OPS) - {"f2i", "f2u"}
# Instructions that read a view (a = view id); load_at also reads the int32 offset register b.
LOAD_OPS = frozenset({"load", "load_at"})


class PlanError(ValueError):
    """A plan is malformed or cannot run; the message names the offending task / op / tensor."""


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16" | "float16" | "bool" | "int32" | "uint32"
    storage: str  # "arg" | "result" | "workspace"
    index: int = 0  # operand index (arg) or result index (result)
    byte_offset: int = 0  # workspace offset
    # result tensors only: the operand index whose buffer this result IS (input_output_aliases);
    # it starts with that operand's content and is updated in place (-1: a fresh buffer)
    alias: int = -1

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.num_elements * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class View:
    """element(idx) = tensor.flat[offset + i * iter_stride + j * outer_iter_stride +
    sum(idx[d] * strides[d])], where i is the iteration of the innermost loop of the op reading it
    and j that of the loop around that loop (0 outside loops / when not nested; v3)."""

    tensor: int
    offset: int
    strides: tuple[int, ...]
    iter_stride: int = 0
    outer_iter_stride: int = 0


@dataclass
class Instr:
    """One program instruction; register i = result of instruction i.

    op: opcode name; dtype: rounding dtype of the result; a, b, c: operands (register indices,
    a view id for "load", the value for "const" (an int for int32 / uint32), the exponent in b for
    "integer_pow" / "ipow").
    """

    op: str
    dtype: str
    a: float | int = 0
    b: int = 0
    c: int = 0

    def to_list(self) -> list:
        return [self.op, self.dtype, self.a, self.b, self.c]

    @staticmethod
    def from_list(x: list) -> Instr:
        op, dtype, a, b, c = x
        return Instr(op, dtype, a, b, c)


@dataclass
class Op:
    name: str
    kind: str  # "matmul" | "reduce" | "map" | "put" (v3: see CommGroup)
    out: int  # tensor id
    B: int
    M: int
    N: int
    K: int = 0
    acc_dtype: str = "float32"
    reduce_kind: str = "sum"
    a_view: int = -1
    b_view: int = -1
    iter_dims: tuple[int, ...] = ()  # reduce: kept dims + reduced dims
    kept_rank: int = 0
    prologue: list[Instr] = field(default_factory=list)
    epilogue: list[Instr] = field(default_factory=list)
    tile_m: int = 0
    tile_n: int = 0
    source: str = ""  # user source line that produced the op
    # Window store (map ops writing part of an aliased result in place, e.g. a KV-cache row):
    # the epilogue runs over iter_dims and stores at store_view's element + the int32 register
    # store_at, clamped into the tensor. -1: the op writes its whole output tensor.
    store_view: int = -1
    store_at: int = -1
    # Loops (v3): the innermost loop whose body this op is part of (-1: none); a stacked op (in
    # a loop) writes slice i of its output (shape (trip_count, *S)) at iteration i, or slice
    # trip_count - 1 - i when stack_reversed (scan(reverse=True)).
    loop: int = -1
    stacked: bool = False
    stack_reversed: bool = False
    # Put ops (v3) with a routing table (ppermute; a collective over a subgroup of the plan's
    # ranks): slot b of rank q's inbox is written by rank recv_from[q][b] (-1: nobody, zeros) from
    # row send_row[q][b] of a_view. None: the default routing (slot b from rank b, row q).
    recv_from: list[list[int]] | None = None
    send_row: list[list[int]] | None = None
    # Put ops (CPU executor only): no copies; a reader of the inbox reads each slot's tile where
    # it lies, in the source rank's source tensor (docs/plan_format.md, "Puts read in place").
    read_in_place: bool = False

    @property
    def scatter_fold(self) -> bool:
        """A reduce op with a store view (docs/plan_format.md, "Scatter folds"): its epilogue gives
        every output element its first value, then each prologue value over iter_dims is folded
        into the element its store view and store_at register name, in iteration order."""
        return self.kind == "reduce" and self.store_view >= 0


@dataclass
class Loop:
    """A loop (v3): ops first_op .. end_op - 1 are its body, run trip_count times. The body's
    tasks are planned once and re-run per iteration (docs/plan_format.md, "Loops")."""

    trip_count: int
    first_op: int
    end_op: int
    source: str = ""
    parent: int = -1  # the loop whose body holds this one (-1: top level); at most 2 levels
    # A while loop (-1: a loop of trip_count iterations): the op whose stacked bool output slice
    # i says whether iteration i runs the ops after it (the body); the ops up to it (the head)
    # run every iteration. trip_count - 1 bounds the body iterations (exceeding it is an error).
    pred_op: int = -1


@dataclass
class CommGroup:
    """v3: the one communication group of a plan with put ops or axis_index (docs/plan_format.md,
    "Communication"): every mesh axis its collectives name. A put op's output is its symmetric
    inbox `[B, M, N]`: by default (B = group_size) on rank r, a task whose b range holds r copies
    its (m, n) tile of `a_view[p, m, n]` into row r of every rank p's inbox, then every task
    waits until ranks b0..b1-1 have put their tiles; a put with a routing table (Op.recv_from /
    send_row) sends and waits as the table says (ppermute, a collective over fewer axes)."""

    axes: tuple  # the mesh axes the group spans (rank = jax.lax.axis_index(axes))
    group_size: int
    # The size of each axis (the routing tables of put ops over some of the axes and axis_index
    # programs depend on them, not only on their product); () in plans written before.
    axis_sizes: tuple = ()


@dataclass
class Task:
    op: int
    b0: int
    b1: int
    m0: int
    m1: int
    n0: int
    n1: int
    deps: list[int] = field(default_factory=list)

    @property
    def tile(self) -> tuple[int, int, int, int, int, int]:
        return (self.b0, self.b1, self.m0, self.m1, self.n0, self.n1)


@dataclass
class Plan:
    """A persistent-kernel plan: inspect with summary(), edit, validate(), serialize.

    args: tensor ids of the FFI operands in order (user inputs first, then constants);
    outputs: tensor ids of the results in order. constants: arrays of the constant operands, keyed
    by tensor id. queues[w]: the tasks worker w runs, in order.
    """

    num_workers: int
    tensors: list[TensorSpec]
    views: list[View]
    ops: list[Op]
    tasks: list[Task]
    queues: list[list[int]]
    num_inputs: int
    args: list[int]
    outputs: list[int]
    constants: dict[int, np.ndarray]
    workspace_bytes: int
    version: int = PLAN_VERSION
    loops: list[Loop] = field(default_factory=list)
    comm: CommGroup | None = None  # v3: set when the plan has put ops

    @property
    def num_counters(self) -> int:
        """Entries of the counters result: one per task, then (v3) one signal per put task and
        source rank (unused for other tasks; indexed num_tasks + task * group_size + rank)."""
        return len(self.tasks) * (1 + (self.comm.group_size if self.comm else 0))

    # ---- inspection -----------------------------------------------------------------------------
    def task_name(self, t: int) -> str:
        task = self.tasks[t]
        op = self.ops[task.op]
        tile = f"b{task.b0}:{task.b1} m{task.m0}:{task.m1} n{task.n0}:{task.n1}"
        return f"task {t} (op {task.op} '{op.name}', tile {tile})"

    def loop_chain(self, op: int) -> list[int]:
        """The loops around op, outermost first (empty outside loops)."""
        chain: list[int] = []
        loop = self.ops[op].loop
        while 0 <= loop < len(self.loops) and len(chain) <= len(self.loops):
            chain.append(loop)
            loop = self.loops[loop].parent
        return chain[::-1]

    def common_depth(self, a: int, b: int) -> int:
        """How many loops ops a and b are both in (0: none)."""
        n = 0
        for x, y in zip(self.loop_chain(a), self.loop_chain(b), strict=False):
            if x != y:
                break
            n += 1
        return n

    def carried(self, t: int, d: int) -> bool:
        """Whether task t's dependency d is on an EARLIER iteration of a loop both are in: d's op
        not before t's (a loop-carried read, or a write-after-read of the next iteration). See
        dependency_target for what a run of t waits for."""
        a, b = self.tasks[t].op, self.tasks[d].op
        return b >= a and self.common_depth(a, b) > 0

    def run_index(self, op: int, its: tuple[int, ...]) -> int:
        """How many runs of op precede the run at iterations `its` (of its loops, outermost
        first); its counter holds run index + 1 when that run is done."""
        k = 0
        for loop, i in zip(self.loop_chain(op), its, strict=True):
            k = k * self.loops[loop].trip_count + i
        return k

    def dependency_target(self, t: int, d: int, its: tuple[int, ...]) -> int:
        """What counters[d] must reach before task t's run at iterations `its` (docs/plan_format.md,
        "Loops"): with C the innermost loop both ops are in, k t's run index over the loops down
        to C and R the runs of d per iteration of C, (k + 1) * R if d's op is before t's (this
        iteration of C), else k * R (the previous one: carried); all of d's runs without a common
        loop."""
        a, b = self.tasks[t].op, self.tasks[d].op
        c = self.common_depth(a, b)
        if c == 0:
            return self.trip_count(b)
        k = 0
        for loop, i in zip(self.loop_chain(a)[:c], its[:c], strict=True):
            k = k * self.loops[loop].trip_count + i
        runs = math.prod(self.loops[loop].trip_count for loop in self.loop_chain(b)[c:])
        return (k if b >= a else k + 1) * runs

    def trip_count(self, op: int) -> int:
        """How many times op's tasks run in all (the product of its loops' trip counts, 1 outside
        loops)."""
        return math.prod(self.loops[loop].trip_count for loop in self.loop_chain(op))

    def view_shift(self, view: int, op: int, its: tuple[int, ...]) -> int:
        """How far `view` moves for op's run at iterations `its` (iteration strides, v3)."""
        v = self.views[view]
        if not its:
            return 0
        shift = its[-1] * v.iter_stride
        if len(its) > 1:
            shift += its[-2] * v.outer_iter_stride
        return shift

    def runs_per_call(self, op: int) -> int:
        """How many times op runs per call: the product of its loops' trip counts."""
        return math.prod(self.loops[loop].trip_count for loop in self.loop_chain(op))

    def stacked_slice(self, op: int, its: tuple[int, ...]) -> int:
        """The slice of its (trip_count, *S) output a stacked op writes at iterations `its`; a
        put's inbox has one slice per run of its loops (runs_per_call), slice k at run k."""
        if self.ops[op].kind == "put":
            return self.run_index(op, its)
        i = its[-1]
        return (
            self.loops[self.ops[op].loop].trip_count - 1 - i if self.ops[op].stack_reversed else i
        )

    def flops(self, t: int) -> int:
        task = self.tasks[t]
        op = self.ops[task.op]
        elems = (task.b1 - task.b0) * (task.m1 - task.m0) * (task.n1 - task.n0)
        if op.kind == "matmul":
            return 2 * elems * op.K + elems * len(op.epilogue)
        if op.scatter_fold:  # the prologue runs once per value, not per output element
            return op.K * (len(op.prologue) + 1) + elems * len(op.epilogue)
        if op.kind == "reduce":
            return elems * op.K * (len(op.prologue) + 1) + elems * len(op.epilogue)
        if op.kind == "put":
            return 0
        return elems * len(op.epilogue)

    def put_bytes(self, t: int) -> int:
        """Bytes a put task's source rank copies into each rank's inbox (its tile); 0 for other
        tasks."""
        task = self.tasks[t]
        op = self.ops[task.op]
        if op.kind != "put":
            return 0
        return (task.m1 - task.m0) * (task.n1 - task.n0) * DTYPE_SIZES[self.tensors[op.out].dtype]

    def critical_path(self) -> list[int]:
        """Longest chain of dependent tasks by estimated cost (list of task ids)."""
        from jax_ark._persistent._schedule import task_costs

        costs = task_costs(self)
        best: list[float] = [0.0] * len(self.tasks)
        prev: list[int] = [-1] * len(self.tasks)
        for t in _topological_order(self):
            base, arg = 0.0, -1
            for d in self.tasks[t].deps:
                if best[d] > base:
                    base, arg = best[d], d
            best[t] = base + costs[t]
            prev[t] = arg
        if not best:
            return []
        t = int(np.argmax(best))
        path = []
        while t >= 0:
            path.append(t)
            t = prev[t]
        return path[::-1]

    def summary(self) -> str:
        lines = [
            f"ark plan v{self.version}: {len(self.ops)} ops, {len(self.tasks)} tasks, "
            f"{self.num_workers} workers, workspace {self.workspace_bytes} bytes"
        ]
        op_tasks: dict[int, int] = {}
        for task in self.tasks:
            op_tasks[task.op] = op_tasks.get(task.op, 0) + 1
        total_flops = 0
        for i, op in enumerate(self.ops):
            out = self.tensors[op.out]
            fl = self.trip_count(i) * sum(
                self.flops(t) for t, task in enumerate(self.tasks) if task.op == i
            )
            total_flops += fl
            extra = f" K={op.K}" if op.kind in ("matmul", "reduce") else ""
            if op.loop >= 0:
                extra += f" loop={op.loop}" + (" stacked" if op.stacked else "")
                extra += " reversed" if op.stack_reversed else ""
            for li, loop in enumerate(self.loops):
                if loop.first_op == i:
                    lines.append(
                        f"  loop {li}: ops {loop.first_op}..{loop.end_op - 1} run "
                        + (
                            f"while op {loop.pred_op} is true, at most {loop.trip_count - 1} "
                            "times (body planned once)"
                            if loop.pred_op >= 0
                            else f"{loop.trip_count} times (body planned once)"
                        )
                        + (f" inside loop {loop.parent}" if loop.parent >= 0 else "")
                        + f" {loop.source}"
                    )
            if op.kind == "put" and self.comm is not None and op.recv_from is not None:
                extra = (
                    f" routed over {op.B} slots of the group of {self.comm.group_size} "
                    f"(axes {','.join(map(str, self.comm.axes))})"
                )
            elif op.kind == "put" and self.comm is not None:
                # Each rank copies its tiles into all n inboxes (its own included).
                n = self.comm.group_size
                mine = sum(
                    (task.b1 - task.b0) * self.put_bytes(t)
                    for t, task in enumerate(self.tasks)
                    if task.op == i
                ) // max(1, n)
                extra = (
                    f" group={n} (axes {','.join(map(str, self.comm.axes))}): each rank puts "
                    f"{mine} bytes into each of the {n} inboxes"
                )
            if op.kind == "put" and op.read_in_place:
                extra += f"; read in place from t{self.views[op.a_view].tensor} (no copies)"
            # a window store writes only its window (iter_dims) of the tensor
            if op.scatter_fold:
                window = f"{op.reduce_kind}-fold of {list(op.iter_dims)} into "
            else:
                window = f"window {list(op.iter_dims)} of " if op.store_view >= 0 else ""
            lines.append(
                f"  op {i:3d} {op.kind:6s} {op.name:24s} -> {window}t{op.out} {out.dtype}"
                f"{list(out.shape)} [{out.storage}] tasks={op_tasks.get(i, 0)}{extra} "
                f"epilogue={len(op.epilogue)} flops={fl} {op.source}"
            )
        in_bytes = sum(self.tensors[a].nbytes for a in self.args)
        out_bytes = sum(self.tensors[o].nbytes for o in self.outputs)
        lines.append(
            f"  bytes: args {in_bytes}, outputs {out_bytes}, workspace {self.workspace_bytes}; "
            f"total flops {total_flops}"
        )
        if self.comm is not None:
            lines.extend(_comm_summary(self))
        lines.extend(_queue_summary(self.queues))
        path = self.critical_path()
        lines.append(
            f"  critical path: {len(path)} tasks over ops "
            + " -> ".join(str(op) for op in _dedupe([self.tasks[t].op for t in path]))
        )
        return "\n".join(lines)

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "jax_ark.plan",
            "version": self.version,
            "num_workers": self.num_workers,
            "num_inputs": self.num_inputs,
            "args": list(self.args),
            "outputs": list(self.outputs),
            "workspace_bytes": self.workspace_bytes,
            "tensors": [dataclasses.asdict(t) | {"shape": list(t.shape)} for t in self.tensors],
            "views": [
                {"tensor": v.tensor, "offset": v.offset, "strides": list(v.strides)}
                | ({"iter_stride": v.iter_stride} if v.iter_stride else {})
                | ({"outer_iter_stride": v.outer_iter_stride} if v.outer_iter_stride else {})
                for v in self.views
            ],
            "ops": [
                {
                    **{
                        k: v
                        for k, v in dataclasses.asdict(op).items()
                        if k not in ("prologue", "epilogue")
                        and not (k in ("recv_from", "send_row") and v is None)
                        and not (k == "read_in_place" and not v)
                    },
                    "iter_dims": list(op.iter_dims),
                    "prologue": [i.to_list() for i in op.prologue],
                    "epilogue": [i.to_list() for i in op.epilogue],
                }
                for op in self.ops
            ],
            "loops": [dataclasses.asdict(loop) for loop in self.loops],
            "tasks": [dataclasses.asdict(t) for t in self.tasks],
            "queues": [list(q) for q in self.queues],
            **(
                {
                    "comm": {"axes": list(self.comm.axes), "group_size": self.comm.group_size}
                    | ({"axis_sizes": list(self.comm.axis_sizes)} if self.comm.axis_sizes else {})
                }
                if self.comm is not None
                else {}
            ),
            "constants": {
                str(k): {
                    "dtype": self.tensors[k].dtype,
                    "data": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode(),
                }
                for k, v in self.constants.items()
            },
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_json(text: str | bytes | dict) -> Plan:
        """Parses a plan; malformed input raises PlanError naming the field
        (e.g. `ops[3].epilogue[2].op`)."""
        if isinstance(text, (str, bytes, bytearray)):
            try:
                d = json.loads(text)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, deep nesting
                raise PlanError(f"plan: not valid JSON ({e})") from None
        else:
            d = text
        return _parse_plan(d)

    def copy(self) -> Plan:
        """A deep copy, checked field by field (PlanError names a malformed field)."""
        try:
            d = self.to_dict()
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001  (edited fields of any type end here)
            raise PlanError(f"plan: cannot serialize it ({type(e).__name__}: {e})") from None
        return _parse_plan(d)

    def validate(self) -> Plan:
        """Raises PlanError naming the offending task / op / tensor; returns self when valid."""
        from jax_ark._persistent._validate import validate

        validate(self)
        return self

    # ---- binary ---------------------------------------------------------------------------------
    def to_binary(self) -> np.ndarray:
        """The int32 words of plan_format.hpp (version PLAN_VERSION)."""
        return _encode(self)


def _comm_summary(plan: Plan, listed: int = 12) -> list[str]:
    """The put tasks: tile, the source ranks it awaits, bytes copied per peer by its source."""
    lines = []
    puts = [t for t, task in enumerate(plan.tasks) if plan.ops[task.op].kind == "put"]
    n = plan.comm.group_size if plan.comm else 1
    for t in puts[:listed]:
        task = plan.tasks[t]
        if plan.ops[task.op].recv_from is not None:
            lines.append(
                f"  comm {plan.task_name(t)}: slots {task.b0}..{task.b1 - 1} as routed, "
                f"{plan.put_bytes(t)} bytes per slot"
            )
            continue
        src = f"rank {task.b0}" if task.b1 - task.b0 == 1 else f"ranks {task.b0}..{task.b1 - 1}"
        lines.append(
            f"  comm {plan.task_name(t)}: {src} -> all {n} ranks, {plan.put_bytes(t)} bytes to each"
        )
    if len(puts) > listed:
        lines.append(f"  comm: ... {len(puts) - listed} more put tasks")
    return lines


def _queue_summary(queues: list[list[int]], listed: int = 8) -> list[str]:
    """One line per worker for a few workers; for many (a GPU plan has one per SM), the spread."""
    if len(queues) <= listed:
        return [f"  worker {w}: {len(q)} tasks" for w, q in enumerate(queues)]
    counts = np.array([len(q) for q in queues])
    busiest = int(np.argmax(counts))
    return [
        f"  workers: {len(queues)}, tasks per worker min {counts.min()} / median "
        f"{float(np.median(counts)):g} / max {counts.max()} (worker {busiest}), "
        f"{int(np.sum(counts == 0))} idle"
    ]


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _dedupe(xs: list[int]) -> list[int]:
    out: list[int] = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


def topological_order(preds: list[list[int]]) -> tuple[list[int], int | None]:
    """Kahn's algorithm over predecessor lists: (the nodes in an order where every node follows its
    predecessors, None) if the graph is acyclic, else (the nodes it could order, a node that waits
    on a cycle)."""
    n = len(preds)
    indeg = [len(p) for p in preds]
    succ: list[list[int]] = [[] for _ in range(n)]
    for t, ps in enumerate(preds):
        for p in ps:
            succ[p].append(t)
    order = [t for t in range(n) if indeg[t] == 0]
    for t in order:
        for s in succ[t]:
            indeg[s] -= 1
            if indeg[s] == 0:
                order.append(s)
    stuck = None if len(order) == n else next(t for t in range(n) if indeg[t] > 0)
    return order, stuck


def _topological_order(plan: Plan) -> list[int]:
    """Topological order of tasks over dependency edges within an iteration (raises PlanError on
    a cycle)."""
    order, stuck = topological_order(
        [[d for d in task.deps if not plan.carried(t, d)] for t, task in enumerate(plan.tasks)]
    )
    if stuck is not None:
        raise PlanError(f"dependency cycle through {plan.task_name(stuck)}")
    return order


# ---- binary encoding ----------------------------------------
def _pad_even(words: list[int]) -> None:
    if len(words) % 2:
        words.append(0)


def _i64(x: int) -> list[int]:
    lo, hi = struct.unpack("<ii", struct.pack("<q", int(x)))
    return [lo, hi]


def _dims6(dims: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for d in list(dims) + [1] * (MAX_RANK - len(dims)):
        out += _i64(d)
    return out


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def _instr_words(ins: Instr) -> list[int]:
    word0 = OPCODES[ins.op] | (DTYPE_CODES[ins.dtype] << 16)
    if ins.op == "const" and ins.dtype in INT_DTYPES:
        a = struct.unpack("<i", struct.pack("<I", int(ins.a) & 0xFFFFFFFF))[0]
    elif ins.op == "const":
        a = _f32_bits(ins.a)
    else:
        a = int(ins.a)
    return [word0, a, int(ins.b), int(ins.c)]


def _encode(plan: Plan) -> np.ndarray:
    code: list[int] = []
    prog_at: list[tuple[int, int, int, int]] = []
    for op in plan.ops:
        pro_at = len(code) // 4
        for ins in op.prologue:
            code += _instr_words(ins)
        epi_at = len(code) // 4
        for ins in op.epilogue:
            code += _instr_words(ins)
        prog_at.append((pro_at, len(op.prologue), epi_at, len(op.epilogue)))
    names = b""
    name_at = []
    for op in plan.ops:
        raw = op.name.encode()
        name_at.append((len(names), len(raw)))
        names += raw
    names_words = np.frombuffer(names + b"\0" * (-len(names) % 4), dtype="<i4").tolist()

    # v3 routing tables of put ops (docs/plan_format.md, "Communication"): recv_from then
    # send_row, each [group_size][B] row-major; route_at[i] = the word offset of op i's table in
    # the route section (-1: none).
    route_words: list[int] = []
    route_at: list[int] = []
    for op in plan.ops:
        if op.recv_from is None:
            route_at.append(-1)
            continue
        route_at.append(len(route_words))
        for table in (op.recv_from, op.send_row or []):
            for row in table:
                route_words += list(row)

    words: list[int] = [0] * 32
    sections: dict[str, int] = {}

    sections["tensors"] = len(words)
    for t in plan.tensors:
        words += [DTYPE_CODES[t.dtype], len(t.shape), STORAGE_CODES[t.storage], t.index]
        words += _i64(t.byte_offset) + _i64(t.num_elements) + _dims6(t.shape)
        words += [t.alias + 1, 0, 0, 0]
    _pad_even(words)
    sections["views"] = len(words)
    for v in plan.views:
        words += [v.tensor, len(v.strides)] + _i64(v.offset)
        for s in list(v.strides) + [0] * (MAX_RANK - len(v.strides)):
            words += _i64(s)
    _pad_even(words)
    sections["ops"] = len(words)
    for i, op in enumerate(plan.ops):
        pro_at, pro_len, epi_at, epi_len = prog_at[i]
        words += [OP_KIND_CODES[op.kind], op.out, DTYPE_CODES[op.acc_dtype]]
        words += [REDUCE_CODES[op.reduce_kind], op.a_view, op.b_view, len(op.iter_dims)]
        words += [op.kept_rank, pro_at, pro_len, epi_at, epi_len, name_at[i][0], name_at[i][1]]
        words += [op.tile_m, op.tile_n]
        words += _i64(op.B) + _i64(op.M) + _i64(op.N) + _i64(op.K) + _dims6(op.iter_dims)
        words += [op.store_view + 1, op.store_at + 1, route_at[i] + 1, int(op.read_in_place)]
    _pad_even(words)
    sections["tasks"] = len(words)
    for t in plan.tasks:
        words += [t.op, 0, t.b0, t.b1, t.m0, t.m1, t.n0, t.n1]
    sections["dep_offsets"] = len(words)
    acc = 0
    for t in plan.tasks:
        words.append(acc)
        acc += len(t.deps)
    words.append(acc)
    _pad_even(words)
    sections["deps"] = len(words)
    for t in plan.tasks:
        words += list(t.deps)
    _pad_even(words)
    sections["queue_offsets"] = len(words)
    acc = 0
    for q in plan.queues:
        words.append(acc)
        acc += len(q)
    words.append(acc)
    _pad_even(words)
    sections["queues"] = len(words)
    for q in plan.queues:
        words += list(q)
    _pad_even(words)
    sections["code"] = len(words)
    words += code
    _pad_even(words)
    sections["names"] = len(words)
    words += names_words
    _pad_even(words)
    loops_at = _encode_loops(plan, words)
    _pad_even(words)
    routes_at = 0
    if route_words:
        routes_at = len(words)
        words += [len(route_words), 0, *route_words]

    header = [
        MAGIC, PLAN_VERSION, 32, len(words),
        plan.num_workers, len(plan.tasks), len(plan.ops), len(plan.tensors),
        len(plan.views), len(plan.args), len(plan.outputs), 0,
        sections["tensors"], sections["views"], sections["ops"], sections["tasks"],
        sections["dep_offsets"], sections["deps"], sum(len(t.deps) for t in plan.tasks),
        sections["queue_offsets"],
        sections["queues"], sections["code"], len(code), sections["names"],
        len(names), plan.num_counters, PROFILE_WORDS_PER_TASK, routes_at,
        *_i64(plan.workspace_bytes), loops_at, plan.comm.group_size if plan.comm else 0,
    ]  # fmt: skip
    assert len(header) == 32
    words[:32] = header
    return np.asarray(words, dtype=np.int32)


def _encode_loops(plan: Plan, words: list[int]) -> int:
    """Appends the v3 loop section (docs/plan_format.md, "Loops"); returns its word offset, 0 when
    the plan has no loops (then the binary is a v2 plan's but for the version)."""
    if not plan.loops:
        return 0
    at = len(words)
    outer = any(v.outer_iter_stride for v in plan.views)
    words += [len(plan.loops), 1 if outer else 0]  # flags: the outer_iter_stride array follows
    for loop in plan.loops:
        pred_task = next((t for t, x in enumerate(plan.tasks) if x.op == loop.pred_op), -1)
        words += _i64(loop.trip_count) + [loop.first_op, loop.end_op, loop.parent + 1]
        words += [loop.pred_op + 1, pred_task if loop.pred_op >= 0 else 0, 0]
    for op in plan.ops:
        words += [op.loop, (2 if op.stack_reversed else 1) if op.stacked else 0]
    for v in plan.views:
        words += _i64(v.iter_stride)
    if outer:
        for v in plan.views:
            words += _i64(v.outer_iter_stride)
    return at


# ---- strict parsing: every field type- and range-checked, errors name the field's path --------
def _field(d: Any, key: str, path: str) -> Any:
    if not isinstance(d, dict):
        raise PlanError(f"{path}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise PlanError(f"{path}.{key}: missing" if path else f"{key}: missing")
    return d[key]


def _int(x: Any, path: str, lo: int = INT64[0], hi: int = INT64[1]) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise PlanError(f"{path}: expected an integer, got {type(x).__name__} {x!r:.40}")
    x = int(x)
    if not lo <= x <= hi:
        raise PlanError(f"{path}: {x} not in {lo}..{hi}")
    return x


def _bool(x: Any, path: str) -> bool:
    if not isinstance(x, bool):
        raise PlanError(f"{path}: expected true / false, got {type(x).__name__}")
    return x


def _str(x: Any, path: str, choices: Any = None) -> str:
    if not isinstance(x, str):
        raise PlanError(f"{path}: expected a string, got {type(x).__name__}")
    if choices is not None and x not in choices:
        raise PlanError(f"{path}: {x!r:.40} is not one of {sorted(choices)}")
    return x


def _list(x: Any, path: str, max_len: int | None = None) -> list:
    if not isinstance(x, (list, tuple)):
        raise PlanError(f"{path}: expected a list, got {type(x).__name__}")
    if max_len is not None and len(x) > max_len:
        raise PlanError(f"{path}: {len(x)} entries, at most {max_len}")
    return list(x)


def _ints(x: Any, path: str, lo: int, hi: int, max_len: int | None = None) -> list[int]:
    return [_int(v, f"{path}[{i}]", lo, hi) for i, v in enumerate(_list(x, path, max_len))]


def _obj(d: Any, path: str, allowed: set[str]) -> None:
    if not isinstance(d, dict):
        raise PlanError(f"{path}: expected an object, got {type(d).__name__}")
    _keys(d, path, allowed)


def _keys(d: dict, path: str, allowed: set[str]) -> None:
    extra = set(d) - allowed
    if extra:
        raise PlanError(f"{path}: unknown field(s) {sorted(map(str, extra))}")


def _parse_instr(x: Any, path: str) -> Instr:
    x = _list(x, path)
    if len(x) != 5:
        raise PlanError(f"{path}: an instruction is [op, dtype, a, b, c], got {len(x)} entries")
    op = _str(x[0], f"{path}.op", OPCODES)
    dtype = _str(x[1], f"{path}.dtype", DTYPE_CODES)
    if op == "const" and dtype in INT_DTYPES:
        # an integer const holds 32 bits: int32 or uint32 values (to_binary keeps the low 32 bits)
        a: float | int = _int(x[2], f"{path}.a", INT32[0], (1 << 32) - 1)
    elif op == "const":
        if isinstance(x[2], bool) or not isinstance(x[2], (int, float, np.integer, np.floating)):
            raise PlanError(f"{path}.a: a const's value must be a number")
        a = float(x[2])
        if math.isfinite(a) and abs(a) > float(np.finfo(np.float32).max):
            raise PlanError(f"{path}.a: {a} overflows float32")
    else:
        a = _int(x[2], f"{path}.a", *INT32)
    return Instr(op, dtype, a, _int(x[3], f"{path}.b", *INT32), _int(x[4], f"{path}.c", *INT32))


_TENSOR_KEYS = {"name", "shape", "dtype", "storage", "index", "byte_offset", "alias"}
_OP_KEYS = {f.name for f in dataclasses.fields(Op)}
_TASK_KEYS = {f.name for f in dataclasses.fields(Task)}
_PLAN_KEYS = {
    "format", "version", "num_workers", "num_inputs", "args", "outputs", "workspace_bytes",
    "tensors", "views", "ops", "tasks", "queues", "constants", "loops", "comm",
}  # fmt: skip
_LOOP_KEYS = {f.name for f in dataclasses.fields(Loop)}


def _parse_loops(d: dict, version: int, num_ops: int) -> list[Loop]:
    """The v3 loop section: loops' op ranges are checked here; op.loop against them in validate."""
    loops = []
    for i, x in enumerate(_list(d.get("loops", []), "loops", num_ops)):
        path = f"loops[{i}]"
        _obj(x, path, _LOOP_KEYS)
        loops.append(
            Loop(
                trip_count=_int(_field(x, "trip_count", path), f"{path}.trip_count", 1,
                                MAX_TRIP_COUNT),
                first_op=_int(_field(x, "first_op", path), f"{path}.first_op", 0, num_ops - 1),
                end_op=_int(_field(x, "end_op", path), f"{path}.end_op", 1, num_ops),
                source=_str(x.get("source", ""), f"{path}.source"),
                parent=_int(x.get("parent", -1), f"{path}.parent", -1, i - 1),
                pred_op=_int(x.get("pred_op", -1), f"{path}.pred_op", -1, num_ops - 1),
            )
        )  # fmt: skip
    if loops and version < 3:
        raise PlanError(f"loops: a version {version} plan has no loops (loops need version 3)")
    return loops


def _parse_plan(d: Any) -> Plan:
    if not isinstance(d, dict):
        raise PlanError(f"plan: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != "jax_ark.plan":
        raise PlanError("format: not a jax_ark plan (missing format: jax_ark.plan)")
    _keys(d, "plan", _PLAN_KEYS)
    version = _int(_field(d, "version", ""), "version")
    if version > PLAN_VERSION:
        raise PlanError(
            f"version: plan version {version} is newer than this jax_ark ({PLAN_VERSION})"
        )
    if version < 1:
        raise PlanError(f"version: {version} is not a plan version (1..{PLAN_VERSION})")
    tensors = []
    for i, t in enumerate(_list(_field(d, "tensors", ""), "tensors", INT32[1])):
        path = f"tensors[{i}]"
        _obj(t, path, _TENSOR_KEYS)
        tensors.append(
            TensorSpec(
                name=_str(_field(t, "name", path), f"{path}.name"),
                shape=tuple(
                    _ints(_field(t, "shape", path), f"{path}.shape", 0, INT64[1], MAX_RANK)
                ),
                dtype=_str(_field(t, "dtype", path), f"{path}.dtype", DTYPE_CODES),
                storage=_str(_field(t, "storage", path), f"{path}.storage", STORAGE_CODES),
                index=_int(t.get("index", 0), f"{path}.index", *INT32),
                byte_offset=_int(t.get("byte_offset", 0), f"{path}.byte_offset"),
                alias=_int(t.get("alias", -1), f"{path}.alias", -1, INT32[1] - 1),
            )
        )
    views = []
    for i, v in enumerate(_list(_field(d, "views", ""), "views", INT32[1])):
        path = f"views[{i}]"
        _obj(v, path, {"tensor", "offset", "strides", "iter_stride", "outer_iter_stride"})
        views.append(
            View(
                _int(_field(v, "tensor", path), f"{path}.tensor", *INT32),
                _int(_field(v, "offset", path), f"{path}.offset"),
                tuple(_ints(_field(v, "strides", path), f"{path}.strides", *INT64, MAX_RANK)),
                _int(v.get("iter_stride", 0), f"{path}.iter_stride"),
                _int(v.get("outer_iter_stride", 0), f"{path}.outer_iter_stride"),
            )
        )
        if (views[-1].iter_stride or views[-1].outer_iter_stride) and version < 3:
            raise PlanError(f"{path}.iter_stride: needs plan version 3 (loops)")
    ops = []
    for i, o in enumerate(_list(_field(d, "ops", ""), "ops", INT32[1])):
        path = f"ops[{i}]"
        _obj(o, path, _OP_KEYS)
        ops.append(
            Op(
                name=_str(_field(o, "name", path), f"{path}.name"),
                kind=_str(_field(o, "kind", path), f"{path}.kind", OP_KIND_CODES),
                out=_int(_field(o, "out", path), f"{path}.out", *INT32),
                B=_int(_field(o, "B", path), f"{path}.B"),
                M=_int(_field(o, "M", path), f"{path}.M"),
                N=_int(_field(o, "N", path), f"{path}.N"),
                K=_int(o.get("K", 0), f"{path}.K"),
                acc_dtype=_str(o.get("acc_dtype", "float32"), f"{path}.acc_dtype", DTYPE_CODES),
                reduce_kind=_str(o.get("reduce_kind", "sum"), f"{path}.reduce_kind", REDUCE_CODES),
                a_view=_int(o.get("a_view", -1), f"{path}.a_view", *INT32),
                b_view=_int(o.get("b_view", -1), f"{path}.b_view", *INT32),
                iter_dims=tuple(
                    _ints(o.get("iter_dims", []), f"{path}.iter_dims", *INT64, MAX_RANK)
                ),
                kept_rank=_int(o.get("kept_rank", 0), f"{path}.kept_rank", *INT32),
                prologue=[
                    _parse_instr(x, f"{path}.prologue[{k}]")
                    for k, x in enumerate(_list(o.get("prologue", []), f"{path}.prologue"))
                ],
                epilogue=[
                    _parse_instr(x, f"{path}.epilogue[{k}]")
                    for k, x in enumerate(_list(o.get("epilogue", []), f"{path}.epilogue"))
                ],
                tile_m=_int(o.get("tile_m", 0), f"{path}.tile_m", *INT32),
                tile_n=_int(o.get("tile_n", 0), f"{path}.tile_n", *INT32),
                source=_str(o.get("source", ""), f"{path}.source"),
                store_view=_int(o.get("store_view", -1), f"{path}.store_view", -1, INT32[1] - 1),
                store_at=_int(o.get("store_at", -1), f"{path}.store_at", -1, INT32[1] - 1),
                loop=_int(o.get("loop", -1), f"{path}.loop", -1, INT32[1] - 1),
                stacked=_bool(o.get("stacked", False), f"{path}.stacked"),
                stack_reversed=_bool(o.get("stack_reversed", False), f"{path}.stack_reversed"),
                recv_from=_table(o.get("recv_from"), f"{path}.recv_from"),
                send_row=_table(o.get("send_row"), f"{path}.send_row"),
                read_in_place=_bool(o.get("read_in_place", False), f"{path}.read_in_place"),
            )
        )
        if (ops[-1].recv_from is None) != (ops[-1].send_row is None):
            raise PlanError(f"{path}: a routing table needs both recv_from and send_row")
        if ops[-1].recv_from is not None and (version < 3 or ops[-1].kind != "put"):
            raise PlanError(f"{path}.recv_from: only put ops (plan version 3) have a routing table")
        if (ops[-1].loop >= 0 or ops[-1].stacked) and version < 3:
            raise PlanError(f"{path}.loop: needs plan version 3 (loops)")
    tasks = []
    for i, t in enumerate(_list(_field(d, "tasks", ""), "tasks", INT32[1])):
        path = f"tasks[{i}]"
        _obj(t, path, _TASK_KEYS)
        tasks.append(
            Task(
                *(_int(_field(t, k, path), f"{path}.{k}", *INT32) for k in _TILE_FIELDS),
                deps=_ints(t.get("deps", []), f"{path}.deps", *INT32),
            )
        )
    num_workers = _int(_field(d, "num_workers", ""), "num_workers")
    if not 1 <= num_workers <= MAX_WORKERS:
        raise PlanError(f"num_workers: {num_workers} not in 1..{MAX_WORKERS}")
    queues = [
        _ints(q, f"queues[{w}]", *INT32)
        for w, q in enumerate(_list(_field(d, "queues", ""), "queues", MAX_WORKERS))
    ]
    args = _ints(_field(d, "args", ""), "args", 0, len(tensors) - 1)
    outputs = _ints(_field(d, "outputs", ""), "outputs", 0, len(tensors) - 1)
    num_inputs = _int(_field(d, "num_inputs", ""), "num_inputs", 0, len(args))
    constants: dict[int, np.ndarray] = {}
    raw_constants = _field(d, "constants", "")
    if not isinstance(raw_constants, dict):
        raise PlanError("constants: expected an object")
    for k, c in raw_constants.items():
        path = f"constants[{k!r}]"
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise PlanError(f"{path}: key must be a tensor id") from None
        if tid not in args[num_inputs:]:
            raise PlanError(f"{path}: tensor {tid} is not one of the plan's constant operands")
        spec = tensors[tid]
        _obj(c, path, {"dtype", "data"})
        if _str(c.get("dtype", spec.dtype), f"{path}.dtype") != spec.dtype:
            raise PlanError(f"{path}.dtype: {c['dtype']!r} != tensor {tid}'s {spec.dtype}")
        try:
            raw = base64.b64decode(_str(_field(c, "data", path), f"{path}.data"), validate=True)
        except ValueError as e:
            raise PlanError(f"{path}.data: not base64 ({e})") from None
        if len(raw) != spec.nbytes:
            raise PlanError(f"{path}.data: {len(raw)} bytes, tensor {tid} has {spec.nbytes}")
        constants[tid] = np.frombuffer(raw, dtype=np_dtype(spec.dtype)).reshape(spec.shape)
    for t in args[num_inputs:]:
        if t not in constants:
            raise PlanError(f"constants: constant operand tensor {t} has no data")
    comm = _parse_comm(d.get("comm"), version)
    return Plan(
        num_workers=num_workers,
        comm=comm,
        tensors=tensors,
        views=views,
        ops=ops,
        tasks=tasks,
        queues=queues,
        num_inputs=num_inputs,
        args=args,
        outputs=outputs,
        constants=constants,
        workspace_bytes=_int(_field(d, "workspace_bytes", ""), "workspace_bytes", 0),
        version=version,
        loops=_parse_loops(d, version, len(ops)),
    )


_TILE_FIELDS = ("op", "b0", "b1", "m0", "m1", "n0", "n1")


def _table(x: Any, path: str) -> list[list[int]] | None:
    """A routing table: a list (one per rank) of lists of int32 (one per inbox slot), or absent."""
    if x is None:
        return None
    rows = _list(x, path, MAX_GROUP_SIZE)
    return [_ints(r, f"{path}[{q}]", *INT32, MAX_GROUP_SIZE) for q, r in enumerate(rows)]


def _parse_comm(c: Any, version: int) -> CommGroup | None:
    """v3 `comm`: {"axes": [mesh axis names], "group_size": n} or absent."""
    if c is None:
        return None
    if version < 3:
        raise PlanError(f"comm: needs plan version 3, the plan is version {version}")
    _obj(c, "comm", {"axes", "group_size", "axis_sizes"})
    axes = _list(_field(c, "axes", "comm"), "comm.axes", MAX_RANK)
    if not axes:
        raise PlanError("comm.axes: names no mesh axis")
    for i, a in enumerate(axes):
        _str(a, f"comm.axes[{i}]")
    if len(set(axes)) != len(axes):
        raise PlanError("comm.axes: an axis is named twice")
    size = _int(_field(c, "group_size", "comm"), "comm.group_size", 1, MAX_GROUP_SIZE)
    sizes = _ints(c.get("axis_sizes", []), "comm.axis_sizes", 1, MAX_GROUP_SIZE, MAX_RANK)
    if sizes and (len(sizes) != len(axes) or math.prod(sizes) != size):
        raise PlanError("comm.axis_sizes: one size per axis, their product group_size")
    return CommGroup(tuple(axes), size, tuple(sizes))
