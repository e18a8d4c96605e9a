"""Tracing a JAX function into plan ops (matmul / reduce / map) with fused elementwise programs.

Every jaxpr value is held lazily as a `_Node`:
- `_Load`: a strided view of a materialized tensor (reshape / transpose / broadcast are views);
- `_Imm`: a scalar constant broadcast to a shape;
- `_Ew`: an elementwise op over nodes of the same shape (a program still to be compiled);
- `_Pending`: the accumulator of a matmul / reduce that is not emitted yet, so the elementwise ops
  applied to it can become its epilogue.
A node is *materialized* (an op emitted, writing a new tensor) only when something needs memory:
a matmul operand, a view the program form cannot express, a value used more than once, an output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend.core import jaxpr_as_fun

from jax_ark._collective_primitive import varying_axes

# algorithms written in jax.numpy, planned as jaxprs
from jax_ark._persistent import _precision, _prefix, _radix
from jax_ark._persistent._comm import COMM_PRIMITIVES, plan_group, translate_collective
from jax_ark._persistent._format import (
    ARG_REDUCES,
    DEFAULT_MAX_WHILE_ITERATIONS,
    DROP_STORE,
    INT_DTYPES,
    MAX_LOOP_DEPTH,
    MAX_PROGRAM_LEN,
    MAX_RANK,
    MAX_TRIP_COUNT,
    NARROW_INT_DTYPES,
    CommGroup,
    Instr,
    Loop,
    Op,
    PlanError,
    TensorSpec,
    View,
    np_dtype,
)
from jax_ark._persistent._random import bind_eqn, without_keys

_SUPPORTED_DTYPES = {
    "float32", "bfloat16", "float16", "bool", "int32", "uint32", "int8", "uint8", "int16", "uint16"
}  # fmt: skip
# Programs longer than this get their largest operands materialized (keeps headroom below 64).
_FUSE_LIMIT = 40


class UnsupportedError(PlanError):
    """The traced function uses something the persistent planner cannot run."""


# ---- lazy nodes ----------------------------------------
@dataclass(eq=False)
class _Node:
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return 1


@dataclass(eq=False)
class _Load(_Node):
    tensor: int = 0
    offset: int = 0
    strides: tuple[int, ...] = ()
    iter_stride: int = 0  # inside a loop body: moves by this many elements per iteration (xs)
    outer_iter_stride: int = 0  # in a nested loop's body: ... per iteration of the outer loop


@dataclass(eq=False)
class _Imm(_Node):
    value: float | int = 0.0  # an int for int32 / uint32 (exact), else a float


@dataclass(eq=False)
class _Ew(_Node):
    op: str = ""
    args: tuple[_Node, ...] = ()
    imm: int = 0  # integer_pow exponent
    _size: int = 1

    @property
    def size(self) -> int:
        return self._size


@dataclass(eq=False)
class _Core:
    """An accumulating op not yet emitted (its accumulator value)."""

    kind: str  # matmul | reduce
    acc_dtype: str
    B: int
    M: int
    N: int
    K: int
    a: _Load | None = None  # matmul operands, rank-3 views (b, m, k) / (b, k, n)
    b: _Load | None = None
    prologue: _Node | None = None  # reduce: value over iter_dims
    iter_dims: tuple[int, ...] = ()
    kept_rank: int = 0
    reduce_kind: str = "sum"
    negate: bool = False  # reduce_min = -max(-x): the epilogue negates the accumulator
    source: str = ""
    name: str = ""
    emitted: bool = False
    out_shape: tuple[int, ...] = ()
    out_tensor: int = -1
    raw_tensor: int = -1  # a tensor holding the accumulator itself (no epilogue), once emitted


@dataclass(eq=False)
class _Pending(_Node):
    core: _Core | None = None


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _is_identity(node: _Load, tensor_shape: tuple[int, ...]) -> bool:
    if (
        node.offset != 0
        or node.iter_stride != 0
        or node.outer_iter_stride != 0
        or math.prod(node.shape) != math.prod(tensor_shape)
    ):
        return False
    want = _row_major(node.shape)
    return all(s == w or d == 1 for s, w, d in zip(node.strides, want, node.shape, strict=True))


def _reshape_strides(shape, strides, new_shape) -> tuple[int, ...] | None:
    """Strides for viewing (shape, strides) as new_shape in row-major order, or None."""
    old = [(d, s) for d, s in zip(shape, strides, strict=True) if d != 1]
    new_idx = [i for i, d in enumerate(new_shape) if d != 1]
    out = [0] * len(new_shape)
    i = j = 0
    while i < len(old) or j < len(new_idx):
        # take a group: old dims old[i:i2], new dims new_idx[j:j2] with equal products
        i2, j2 = i, j
        po, pn = 1, 1
        while True:
            if po == pn and (i2 > i or j2 > j):
                break
            if po <= pn and i2 < len(old):
                po *= old[i2][0]
                i2 += 1
            elif j2 < len(new_idx):
                pn *= new_shape[new_idx[j2]]
                j2 += 1
            else:
                return None
        group = old[i:i2]
        for p in range(len(group) - 1):
            if group[p][1] != group[p + 1][1] * group[p + 1][0]:
                return None
        acc = group[-1][1]
        for q in range(j2 - 1, j - 1, -1):
            out[new_idx[q]] = acc
            acc *= new_shape[new_idx[q]]
        i, j = i2, j2
    return tuple(out)


def _merge(shape, strides, dims) -> tuple[int, int] | None:
    """(size, stride) of dims merged in the given order, or None when not a single stride."""
    dims = [d for d in dims if shape[d] != 1]
    if not dims:
        return 1, 0
    for p in range(len(dims) - 1):
        if strides[dims[p]] != strides[dims[p + 1]] * shape[dims[p + 1]]:
            return None
    return math.prod(shape[d] for d in dims), strides[dims[-1]]


# ---- the builder ----------------------------------------
@dataclass
class TraceResult:
    tensors: list[TensorSpec]
    views: list[View]
    ops: list[Op]
    args: list[int]
    num_inputs: int
    outputs: list[int]
    constants: dict[int, np.ndarray]
    loops: list[Loop] = field(default_factory=list)
    comm: CommGroup | None = None  # v3: the group of the function's collectives


@dataclass
class _Builder:
    tensors: list[TensorSpec] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    view_ids: dict[Any, int] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    # padded copies of tensors already emitted and the op count then (_conv._padded: a pooling
    # and its gradient pad the same input)
    padded: dict[Any, Any] = field(default_factory=dict)
    args: list[int] = field(default_factory=list)
    constants: dict[int, np.ndarray] = field(default_factory=dict)
    source: str = ""  # source line of the eqn being translated
    platform: str = "cpu"  # the executor planned for
    aranges: dict[tuple[int, str], int] = field(default_factory=dict)  # iota constants by size
    # In-place updates: the function's output index of each top-level jaxpr var, the use count of
    # each top-level var, the eqn being translated, user input tensors already aliased.
    top_outputs: dict = field(default_factory=dict)
    top_counts: dict = field(default_factory=dict)
    eqn: Any = None
    aliased: set[int] = field(default_factory=set)
    num_inputs: int = 0
    loops: list[Loop] = field(default_factory=list)
    loop_stack: list[int] = field(default_factory=list)  # the loops whose bodies are translated
    comm: CommGroup | None = None  # the plan's group, set before translating (_comm.plan_group)
    max_while_iterations: int = 0  # the guard of while loops (trace's argument)
    # In-place loop state (see _in_place_state): id(dynamic_update_slice eqn of a loop body) ->
    # the aliased result tensor it updates in place, and id(scan eqn nested in such a loop) ->
    # {carry index k or ys index q: that tensor} for the carries / xs->ys that hold the state.
    loop_in_place: dict[int, int] = field(default_factory=dict)
    scan_in_place: dict[int, dict[int, int]] = field(default_factory=dict)
    # In-place loop state that starts as a constant fill (a ring matmul's zeros): result tensor ->
    # the plan constant holding the fill, whose operand index it aliases once constants are
    # numbered (after the user inputs, at the end of tracing).
    fill_alias: dict[int, int] = field(default_factory=dict)
    # Chains of top-level updates of one buffer (_dus_chains): id(dynamic_update_slice eqn) ->
    # the var the buffer ends up as; and the result tensors such chains update in place.
    dus_chain_end: dict[int, Any] = field(default_factory=dict)
    chain_results: set[int] = field(default_factory=set)
    # jaxpr var -> mesh axes over which its value is the same on every rank: the output of a
    # pvary over those axes (shard_map's check_vma typing: pvary only takes values invariant over
    # its axes). A psum over them is then folded locally (_comm.translate_collective).
    uniform_over: dict = field(default_factory=dict)
    # Inside a cond branch holding a while_loop: a bool scalar, true when the conds around it take
    # this branch. Every branch is planned (_cond); a while loop in an untaken one must run no
    # iteration, since its carries there are values the branch never sees.
    branch_taken: Any = None

    def new_tensor(self, shape, dtype, storage="workspace", index=0, name="") -> int:
        if len(shape) > MAX_RANK:
            raise UnsupportedError(f"rank {len(shape)} > {MAX_RANK} at {self.source}")
        self.tensors.append(
            TensorSpec(name or f"t{len(self.tensors)}", tuple(shape), dtype, storage, index)
        )
        return len(self.tensors) - 1

    def view_id(self, node: _Load) -> int:
        key = (node.tensor, node.offset, node.strides, node.iter_stride, node.outer_iter_stride)
        if key not in self.view_ids:
            self.views.append(
                View(
                    node.tensor,
                    node.offset,
                    tuple(node.strides),
                    node.iter_stride,
                    node.outer_iter_stride,
                )
            )
            self.view_ids[key] = len(self.views) - 1
        return self.view_ids[key]

    def load(self, tensor: int) -> _Load:
        spec = self.tensors[tensor]
        return _Load(spec.shape, spec.dtype, tensor, 0, _row_major(spec.shape))

    # ---- node transforms (None = cannot be expressed without materializing) ---------------------
    @staticmethod
    def _rebuilt(node: _Ew, shape, memo: dict | None, transform) -> _Node | None:
        """node rebuilt over `shape` from its transformed args; a node reached twice (a shared
        index, gelu's x) is rebuilt once, so the program still computes it once."""
        memo = {} if memo is None else memo
        if id(node) not in memo:
            args = [transform(a, memo) for a in node.args]
            memo[id(node)] = (
                None
                if any(a is None for a in args)
                else _Ew(
                    shape, node.dtype, op=node.op, args=tuple(args), imm=node.imm, _size=node.size
                )
            )
        return memo[id(node)]

    def broadcast(self, node: _Node, shape, dims) -> _Node:
        out = self._broadcast(node, tuple(shape), tuple(dims))
        if out is None:
            out = self._broadcast(self.materialize(node), tuple(shape), tuple(dims))
        return out

    def _broadcast(self, node, shape, dims, memo=None):
        if isinstance(node, _Imm):
            return _Imm(shape, node.dtype, value=node.value)
        if isinstance(node, _Load):
            strides = [0] * len(shape)
            for i, d in enumerate(dims):
                strides[d] = node.strides[i] if node.shape[i] == shape[d] else 0
            return _Load(
                shape,
                node.dtype,
                node.tensor,
                node.offset,
                tuple(strides),
                node.iter_stride,
                node.outer_iter_stride,
            )
        if isinstance(node, _Ew):
            return self._rebuilt(node, shape, memo, lambda a, m: self._broadcast(a, shape, dims, m))
        return None

    def transpose(self, node: _Node, perm) -> _Node:
        out = self._transpose(node, tuple(perm))
        if out is None:
            out = self._transpose(self.materialize(node), tuple(perm))
        return out

    def _transpose(self, node, perm, memo=None):
        shape = tuple(node.shape[p] for p in perm)
        if isinstance(node, _Imm):
            return _Imm(shape, node.dtype, value=node.value)
        if isinstance(node, _Load):
            strides = tuple(node.strides[p] for p in perm)
            return _Load(
                shape,
                node.dtype,
                node.tensor,
                node.offset,
                strides,
                node.iter_stride,
                node.outer_iter_stride,
            )
        if isinstance(node, _Ew):
            return self._rebuilt(node, shape, memo, lambda a, m: self._transpose(a, perm, m))
        return None

    def slice(self, node: _Node, start, limit, step) -> _Node:
        step = tuple(step or (1,) * len(start))
        out = self._slice(node, tuple(start), tuple(limit), step)
        if out is None:
            out = self._slice(self.materialize(node), tuple(start), tuple(limit), step)
        return out

    def _slice(self, node, start, limit, step, memo=None):
        shape = tuple(
            max(0, -(-(hi - lo) // st)) for lo, hi, st in zip(start, limit, step, strict=True)
        )
        if isinstance(node, _Imm):
            return _Imm(shape, node.dtype, value=node.value)
        if isinstance(node, _Load):
            offset = node.offset + sum(lo * s for lo, s in zip(start, node.strides, strict=True))
            strides = tuple(s * st for s, st in zip(node.strides, step, strict=True))
            return _Load(
                shape,
                node.dtype,
                node.tensor,
                offset,
                strides,
                node.iter_stride,
                node.outer_iter_stride,
            )
        if isinstance(node, _Ew):
            return self._rebuilt(
                node, shape, memo, lambda a, m: self._slice(a, start, limit, step, m)
            )
        return None

    def reshape(self, node: _Node, shape) -> _Node:
        shape = tuple(shape)
        out = self._reshape(node, shape)
        if out is None:
            out = self._reshape(self.materialize(node), shape)
        return out

    def _reshape(self, node, shape, memo=None):
        if isinstance(node, _Imm):
            return _Imm(shape, node.dtype, value=node.value)
        if isinstance(node, _Pending):
            # The accumulator is indexed by the flat output index: a reshape keeps it.
            return _Pending(shape, node.dtype, core=node.core)
        if isinstance(node, _Load):
            strides = _reshape_strides(node.shape, node.strides, shape)
            if strides is None:
                return None
            return _Load(
                shape,
                node.dtype,
                node.tensor,
                node.offset,
                strides,
                node.iter_stride,
                node.outer_iter_stride,
            )
        if isinstance(node, _Ew):
            return self._rebuilt(node, shape, memo, lambda a, m: self._reshape(a, shape, m))
        return None

    def elementwise(self, op: str, args: list[_Node], shape, dtype, imm: int = 0) -> _Node:
        shape = tuple(shape)
        # jax broadcasts scalars and size-1 dims implicitly in elementwise ops (numpy alignment).
        args = [
            a
            if a.shape == shape
            else self.broadcast(a, shape, tuple(range(len(shape) - len(a.shape), len(shape))))
            for a in args
        ]
        for a in args:
            if a.shape != shape:
                raise UnsupportedError(f"{op}: operand shape {a.shape} != {shape} at {self.source}")
        size = 1 + sum(a.size for a in args)
        while size > _FUSE_LIMIT:
            big = max(range(len(args)), key=lambda i: args[i].size)
            others = [c for i, a in enumerate(args) if i != big for c in _cores(a)]
            shared = [c for c in _cores(args[big]) if c in others]
            if shared:
                # An accumulator read by several operands (a matmul whose output feeds both
                # branches of gelu's backward): fusing it into the biggest operand's program
                # would leave the others a second op recomputing it (_raw). Store it once.
                for core in shared:
                    self._emit_core(core, None, None, "workspace", 0)
                args = [self._substitute(a) for a in args]
            else:
                args[big] = self.materialize(args[big])
            size = 1 + sum(a.size for a in args)
        return _Ew(shape, dtype, op=op, args=tuple(args), imm=imm, _size=size)

    # ---- materialization ---------------------------------------------------------------------
    def materialize(
        self,
        node: _Node,
        storage: str = "workspace",
        index: int = 0,
        into: int | None = None,
        stacked: int = 0,
    ) -> _Load:
        """Emits the op computing `node` into a new contiguous tensor; returns its identity view.

        into: write this existing (not yet written) tensor instead (a loop's carry);
        stacked: inside a loop of that many iterations, a tensor (stacked, *node.shape) whose
        slice i the op writes at iteration i (a scan's stacked outputs)."""
        if isinstance(node, _Load) and storage == "workspace" and into is None and not stacked:
            if _is_identity(node, self.tensors[node.tensor].shape):
                return node
        if math.prod(node.shape) == 0:
            # Nothing to compute (a zero-size dim): the tensor exists, no op writes it.
            if into is not None:
                return self.load(into)
            shape = ((stacked,) if stacked else ()) + tuple(node.shape)
            return self.load(self.new_tensor(shape, node.dtype, storage, index))
        # A value used several times may stay lazy in some consumers (_fuses_into_one) while
        # another consumer already emitted its accumulator (jax.grad's backward reuses the
        # forward's matmuls): read those from memory, never emit an accumulator twice.
        node = self._substitute(node)
        cores = _cores(node)
        # Only one accumulator can feed an epilogue: emit the others on their own first.
        for core in cores[1:]:
            self._emit_core(core, None, None, "workspace", 0)
        if len(cores) > 1:
            node = self._substitute(node)
        if cores:
            return self._emit_core(cores[0], node, node.shape, storage, index, into, stacked)
        out = self._out_tensor(node.shape, node.dtype, storage, index, into, stacked)
        n_cols = node.shape[-1] if node.shape else 1
        op = Op(
            name=f"map{len(self.ops)}",
            kind="map",
            out=out,
            B=1,
            M=max(1, math.prod(node.shape) // max(1, n_cols)),
            N=n_cols,
            acc_dtype=node.dtype,
            epilogue=self._compile(node),
            source=self.source,
            stacked=bool(stacked),
        )
        self.ops.append(op)
        return self.load(out)

    def _out_tensor(self, shape, dtype, storage, index, into, stacked) -> int:
        if into is not None:
            spec = self.tensors[into]
            if spec.shape != tuple(shape) or spec.dtype != dtype:
                raise AssertionError("internal error: loop carry shape / dtype changed")
            return into
        return self.new_tensor(
            ((stacked,) if stacked else ()) + tuple(shape), dtype, storage, index
        )

    def _raw(self, core: _Core) -> int:
        """A tensor holding core's accumulator as is. A core emitted with an epilogue (fused into
        one consumer's expression) holds that expression, not the accumulator: a consumer that
        still needs the accumulator gets a second op computing it (correct rather than fast).
        Within one expression this is avoided (`elementwise` stores an accumulator several
        operands read before splitting the expression); across separate values it remains."""
        if core.raw_tensor < 0:
            twin = dataclasses.replace(core, emitted=False, out_tensor=-1, raw_tensor=-1)
            self._emit_core(twin, None, None, "workspace", 0)
            core.raw_tensor = twin.out_tensor
        return core.raw_tensor

    def _substitute(self, node: _Node, memo: dict | None = None) -> _Node:
        """Replaces pendings whose core is already emitted by loads of their accumulator. A node
        reached twice (a shared index, gelu's x) stays one node, so its program computes it once;
        a subtree without such pendings is returned as it is."""
        memo = {} if memo is None else memo
        if id(node) in memo:
            return memo[id(node)]
        out = node
        if isinstance(node, _Pending) and node.core.emitted:
            out = self.reshape(self.load(self._raw(node.core)), node.shape)
        elif isinstance(node, _Ew):
            args = tuple(self._substitute(a, memo) for a in node.args)
            if any(a is not old for a, old in zip(args, node.args, strict=True)):
                out = _Ew(
                    node.shape, node.dtype, op=node.op, args=args, imm=node.imm, _size=node.size
                )
        memo[id(node)] = out
        return out

    def strip_pendings(self, node: _Node) -> _Node:
        node = self._substitute(node)
        for core in _cores(node):
            self._emit_core(core, None, None, "workspace", 0)
        return self._substitute(node)

    def _emit_core(
        self, core: _Core, epilogue: _Node | None, shape, storage, index, into=None, stacked=0
    ) -> _Load:
        if core.emitted:
            raise AssertionError("internal error: accumulator emitted twice")
        if shape is None:
            shape = core.out_shape
        if epilogue is None:
            epilogue = _Pending(shape, core.acc_dtype, core=core)
        out = self._out_tensor(shape, epilogue.dtype, storage, index, into, stacked)
        op = self.core_op(core, out, stacked=bool(stacked))
        op.epilogue = self._compile(epilogue, acc_negate=core.negate)
        if isinstance(epilogue, _Pending) and not stacked and into is None:
            core.raw_tensor = out
        self.ops.append(op)
        return self.load(out)

    def core_op(self, core: _Core, out: int, stacked: bool = False) -> Op:
        """The op computing core's accumulator into tensor `out`, its epilogue still to set (the
        caller appends it); core counts as emitted from here on."""
        op = Op(
            name=f"{core.name or core.kind}{len(self.ops)}",
            kind=core.kind,
            out=out,
            B=core.B,
            M=core.M,
            N=core.N,
            K=core.K,
            acc_dtype=core.acc_dtype,
            reduce_kind=core.reduce_kind,
            source=core.source,
            stacked=stacked,
        )
        if core.kind == "matmul":
            op.a_view = self.view_id(core.a)
            op.b_view = self.view_id(core.b)
        else:
            op.iter_dims = core.iter_dims
            op.kept_rank = core.kept_rank
            op.prologue = self._compile(core.prologue)
        core.emitted = True
        core.out_tensor = out
        return op

    def compile_with(
        self, node: _Node, extra: list[_Node], acc_negate: bool = False
    ) -> tuple[list[Instr], list[int]]:
        """A program whose last register is node's value and which also computes `extra` nodes
        (their registers are returned)."""
        regs: list[int] = []
        prog = self._compile(node, acc_negate=acc_negate, extra=extra, extra_regs=regs)
        return prog, regs

    def _compile(
        self,
        node: _Node,
        acc_negate: bool = False,
        extra: list[_Node] | None = None,
        extra_regs: list[int] | None = None,
    ) -> list[Instr]:
        prog: list[Instr] = []
        memo: dict[Any, int] = {}

        def emit(n: _Node) -> int:
            if isinstance(n, _Load):
                key = ("load", self.view_id(n), n.dtype)
            elif isinstance(n, _Imm):
                key = ("const", n.value, n.dtype)
            elif isinstance(n, _Pending):
                key = ("acc",)
            else:
                key = ("node", id(n))
            if key in memo:
                return memo[key]
            if isinstance(n, _Load):
                prog.append(Instr("load", n.dtype, self.view_id(n)))
            elif isinstance(n, _Imm):
                value = int(n.value) if n.dtype in INT_DTYPES else float(n.value)
                prog.append(Instr("const", n.dtype, value))
            elif isinstance(n, _Pending):
                prog.append(Instr("load_acc", n.core.acc_dtype))
                if acc_negate:
                    prog.append(Instr("neg", n.core.acc_dtype, len(prog) - 1))
            elif n.op in ("load_iter", "load_rank"):  # the loop iteration / the rank (v3)
                prog.append(Instr(n.op, "int32"))
            else:
                if n.op == "load_at":  # args: (the static view, the int32 offset node)
                    moved = emit(n.args[1])
                    prog.append(Instr("load_at", n.dtype, self.view_id(n.args[0]), moved))
                    memo[key] = len(prog) - 1
                    return memo[key]
                regs = [emit(a) for a in n.args]
                if n.op == "select":
                    prog.append(Instr("select", n.dtype, regs[0], regs[1], regs[2]))
                elif n.op in ("integer_pow", "ipow"):
                    prog.append(Instr(n.op, n.dtype, regs[0], n.imm))
                elif len(regs) == 1:
                    prog.append(Instr(n.op, n.dtype, regs[0]))
                else:
                    prog.append(Instr(n.op, n.dtype, regs[0], regs[1]))
            memo[key] = len(prog) - 1
            return memo[key]

        for e in extra or []:
            extra_regs.append(emit(e))
        last = emit(node)
        if last != len(prog) - 1:  # the value was computed before the extras: copy it last
            prog.append(Instr("imov" if node.dtype in INT_DTYPES else "copy", node.dtype, last))
        if len(prog) > MAX_PROGRAM_LEN:
            raise AssertionError(f"internal error: program of {len(prog)} instructions")
        return prog


def _cores(node: _Node) -> list[_Core]:
    found: list[_Core] = []

    def walk(n):
        if isinstance(n, _Pending):
            if n.core not in found:
                found.append(n.core)
        elif isinstance(n, _Ew):
            for a in n.args:
                walk(a)

    walk(node)
    return found


# ---- erf_inv ------------------------------------------------------------------------------
# M. Giles, "Approximating the erfinv function" (GPU Computing Gems Jade Edition, 2011), single
# precision: in w = -log(1 - x^2), a polynomial in w - 2.5 below w = 5 and one in sqrt(w) - 3
# above; the ones XLA's ErfInv evaluates for float32 (jax.random.normal draws through it).
_ERF_INV_CENTRAL = (
    2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
    -0.00125372503, -0.00417768164, 0.246640727, 1.50140941,
)  # fmt: skip
_ERF_INV_TAIL = (
    -0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
    -0.0076224613, 0.00943887047, 1.00167406, 2.83297682,
)  # fmt: skip


class _Ops:
    """Elementwise ops over one shape, of one dtype unless `dtype=` names another (a comparison's
    bool, a conversion's target): the builder's calls, short enough to read as math."""

    def __init__(self, b: _Builder, shape, dtype: str = "float32"):
        self.b, self.shape, self.dtype = b, tuple(shape), dtype

    def __call__(self, name: str, *args: _Node, dtype: str | None = None) -> _Node:
        return self.b.elementwise(name, list(args), self.shape, dtype or self.dtype)

    def const(self, value) -> _Node:
        """A scalar of this dtype (an integer's bits wrap to 32)."""
        if self.dtype in INT_DTYPES:
            value = int(value) & 0xFFFFFFFF if self.dtype == "uint32" else int(value)
            return _Imm((), self.dtype, value=value)
        return _Imm((), self.dtype, value=float(value))

    def where(self, pred: _Node, if_true: _Node, if_false: _Node) -> _Node:
        return self("select", pred, if_false, if_true)  # select_n(pred, on_false, on_true)

    def is_zero(self, x: _Node) -> _Node:
        return self("ieq" if self.dtype in INT_DTYPES else "eq", x, self.const(0), dtype="bool")

    def is_finite(self, x: _Node) -> _Node:
        return self("lt", self("abs", x), self.const(np.inf), dtype="bool")

    def floor(self, x: _Node) -> _Node:
        return _round_to_integer(self.b, "floor", x, 0, self.dtype)


def _erf_inv(b: _Builder, x: _Node, out_dtype: str) -> _Node:
    """erf_inv in float32 operations (16-bit inputs widened, the result rounded once, as XLA):
    p(w) * x, +-inf at +-1, NaN outside [-1, 1] (log1p of less than -1)."""
    f32 = "float32"
    if x.dtype != f32:
        x = _convert(b, x, f32)
    ew = _Ops(b, x.shape)

    def c(value):
        return ew.const(np.float32(value))

    def horner(coefficients, t):
        p = c(coefficients[0])
        for k in coefficients[1:]:
            p = ew("add", c(k), ew("mul", p, t))
        return p

    w = ew("neg", ew("log1p", ew("neg", ew("mul", x, x))))
    central = horner(_ERF_INV_CENTRAL, ew("sub", w, c(2.5)))
    tail = horner(_ERF_INV_TAIL, ew("sub", ew("sqrt", w), c(3.0)))
    p = ew("select", ew("lt", w, c(5.0), dtype="bool"), tail, central)  # (pred, false, true)
    at_one = ew("eq", ew("abs", x), c(1.0), dtype="bool")
    result = ew("select", at_one, ew("mul", p, x), ew("mul", x, c(np.inf)))
    return result if out_dtype == f32 else _convert(b, result, out_dtype)


# ---- jaxpr translation ----------------------------------------
_UNARY = {
    "neg": "neg", "exp": "exp", "log": "log", "tanh": "tanh", "logistic": "logistic",
    "sqrt": "sqrt", "rsqrt": "rsqrt", "erf": "erf", "abs": "abs", "sin": "sin", "cos": "cos",
    "log1p": "log1p", "expm1": "expm1", "square": "square", "sign": "sign",
}  # fmt: skip
_BINARY = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "max": "max", "min": "min",
    "pow": "pow", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
    "add_any": "add", "rem": "rem",
}  # fmt: skip
_IDENTITY = {"copy", "copy_p", "stop_gradient", "optimization_barrier", "pvary", "pcast"}
# ---- jax version compatibility: call primitives that are inlined ------------------------------
# Only primitives whose sub-jaxpr maps the eqn's inputs to its outputs one to one (a plain call)
# may be inlined. A name list, not "any eqn with a jaxpr param": scan, shard_map and others also
# carry a `jaxpr` and inlining one of them computes something else without an error. jax renamed
# some of these between versions (pjit -> jit in 0.9; custom_vjp_call_jaxpr(fun_jaxpr) ->
# custom_vjp_call(call_jaxpr)); jax 0.10.2 and 0.11.2 both use jit / closed_call /
# custom_jvp_call / custom_vjp_call / remat2. A call primitive renamed again in a later jax is then
# refused with a clear UnsupportedError rather than mistranslated.
_INLINE_CALLS = frozenset(
    {
        "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
        "custom_vjp_call_jaxpr", "remat2", "checkpoint", "remat",
    }
)  # fmt: skip
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _call_body(eqn) -> tuple[Any, list] | None:
    """(open jaxpr, consts) of an inlinable call eqn, or None when eqn is not such a call."""
    if eqn.primitive.name not in _INLINE_CALLS:
        return None
    for key in _CALL_PARAMS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
            jaxpr, consts = sub.jaxpr, list(sub.consts)
        elif hasattr(sub, "eqns"):  # open Jaxpr
            jaxpr, consts = sub, []
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    # A known call whose params this jax spells differently: fail loudly, never guess.
    raise UnsupportedError(
        f"ark.persistent: cannot inline '{eqn.primitive.name}' with this jax "
        f"({jax.__version__}): none of its params {sorted(eqn.params)} is a sub-jaxpr taking its "
        "operands one to one"
    )


def _source(eqn) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # internals moved: degrade to no location rather than failing
        return ""


def _dtype_name(aval) -> str:
    try:
        return np.dtype(aval.dtype).name
    except TypeError:  # an extended dtype numpy does not know: a typed PRNG key (key<fry>)
        return str(aval.dtype)


def _check_dtype(aval, where: str) -> str:
    name = _dtype_name(aval)
    if name.startswith("key<"):
        raise UnsupportedError(
            f"ark.persistent: {name} (a typed PRNG key) at {where}: random number generation "
            "is not supported inside the function; draw the random values outside and pass them in"
        )
    if name not in _SUPPORTED_DTYPES:
        raise UnsupportedError(
            f"ark.persistent: dtype {name} is not supported (float32, bfloat16, float16, bool, "
            f"int32, uint32, int16, uint16, int8, uint8), at {where}"
        )
    return name


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"


def _use_counts(jaxpr) -> dict:
    counts: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not _is_literal(v):
                counts[v] = counts.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not _is_literal(v):
            counts[v] = counts.get(v, 0) + 1
    return counts


def _consumers(jaxpr) -> dict:
    out: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not _is_literal(v):
                out.setdefault(v, []).append(eqn)
    return out


def _fuses_into_one(v, counts, consumers, position, limit: int = 48) -> bool:
    """True when every use of v flows, through elementwise eqns only, into ONE value (as in gelu's
    body, which reads its input three times). Then v can stay lazy: all its uses end up in a single
    program, where the shared subexpression is one register."""
    region: set = set()  # ids of the eqns absorbed so far
    region_vars = [v]

    def open_uses(r) -> int:
        inside = sum(1 for e in consumers.get(r, []) if id(e) in region for x in e.invars if x is r)
        return counts.get(r, 0) - inside

    for _ in range(limit):
        open_vars = sorted((r for r in region_vars if open_uses(r) > 0), key=position)
        if len(open_vars) <= 1 and (not open_vars or open_vars[0] is not v):
            return True
        # Absorb the consumers of the earliest open value; the latest one is the candidate sink.
        r = open_vars[0]
        outside = list({id(e): e for e in consumers.get(r, []) if id(e) not in region}.values())
        if not outside:
            return False  # r is also a function output
        for e in outside:
            if e.primitive.name not in _ELEMENTWISE_PRIMS:
                return False
            region.add(id(e))
            region_vars.extend(e.outvars)
    return False


def _const_node(b: _Builder, value, aval_dtype=None) -> _Node:
    arr = np.asarray(value)
    dtype = np.dtype(aval_dtype) if aval_dtype is not None else arr.dtype
    name = dtype.name
    if name not in _SUPPORTED_DTYPES:
        raise UnsupportedError(f"ark.persistent: constant of dtype {name} at {b.source}")
    if arr.ndim == 0 or (arr.size > 0 and np.all(arr == arr.reshape(-1)[0])):
        return _Imm(tuple(arr.shape), name, value=_scalar(arr.reshape(-1)[0], name))
    t = b.new_tensor(arr.shape, name, "arg", 0, name=f"const{len(b.constants)}")
    b.constants[t] = np.asarray(arr)
    return b.load(t)


# ---- integer and boolean values (plan v2) ----------------------------------------
# Registers of int32 / uint32 dtype hold bits and are computed by the integer opcodes; bool
# registers hold float 0 / 1, so boolean logic maps onto float opcodes exactly.
def _kind(dtype: str) -> str:
    return _KINDS.get(dtype, "float")


_KINDS = {
    "int32": "int", "int16": "int", "int8": "int", "uint32": "uint", "uint16": "uint",
    "uint8": "uint", "bool": "bool",
}  # fmt: skip


def _int_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _zero(dtype: str) -> float | int:
    return 0 if dtype in INT_DTYPES else 0.0


def _scalar(x, dtype: str) -> float | int:
    if dtype in INT_DTYPES:
        return int(x)
    return float(np.asarray(x, np.float32))


# jaxpr primitive -> opcode by operand kind; None: not defined for that kind (refused).
_INT_TYPED: dict[str, dict[str, str]] = {
    "add": {"int": "iadd", "uint": "iadd"},
    "add_any": {"int": "iadd", "uint": "iadd"},
    "sub": {"int": "isub", "uint": "isub"},
    "mul": {"int": "imul", "uint": "imul"},
    "div": {"int": "idiv", "uint": "udiv"},
    "rem": {"int": "irem", "uint": "urem"},
    "max": {"int": "imax", "uint": "umax"},
    "min": {"int": "imin", "uint": "umin"},
    "eq": {"int": "ieq", "uint": "ieq"},
    "ne": {"int": "ine", "uint": "ine"},
    "lt": {"int": "ilt", "uint": "ult"},
    "le": {"int": "ile", "uint": "ule"},
    "gt": {"int": "igt", "uint": "ugt"},
    "ge": {"int": "ige", "uint": "uge"},
    "neg": {"int": "ineg", "uint": "ineg"},
    "abs": {"int": "iabs", "uint": "imov"},
    "sign": {"int": "isign"},
    "and": {"int": "and", "uint": "and", "bool": "mul"},  # bool: 1*1 = 1, else 0
    "or": {"int": "or", "uint": "or", "bool": "max"},
    "xor": {"int": "xor", "uint": "xor", "bool": "ne"},
    "not": {"int": "not", "uint": "not"},
    "shift_left": {"int": "shl", "uint": "shl"},
    "shift_right_arithmetic": {"int": "shra", "uint": "shra"},
    "shift_right_logical": {"int": "shrl", "uint": "shrl"},
}


# Float functions without an opcode, written with opcodes: sinh / cosh, tan, cbrt in float32,
# rounded once to the output's dtype, within a few float32 ulps of XLA's (not bit-identical);
# exp2 (flash attention's softmax) as XLA expands it.
_COMPOSED = frozenset({"exp2", "sinh", "cosh", "tan", "cbrt", "atan"})
# Comparisons in XLA's total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN): integer
# comparisons of the values' total-order keys.
_TOTAL_ORDER_COMPARE = {"eq_to": "ieq", "le_to": "ile", "lt_to": "ilt"}


def _composed(b: _Builder, prim: str, x: _Node, out_dtype: str) -> _Node:
    shape, f = x.shape, "float32"
    if prim == "exp2":
        # XLA expands exp2 as exp(x * ln 2) in the operand's dtype (for bfloat16 the product is
        # rounded to bfloat16 first): the same two instructions at that dtype.
        ln2 = _Imm((), out_dtype, value=float(np.log(2.0)))
        product = b.elementwise("mul", [_convert(b, x, out_dtype), ln2], shape, out_dtype)
        return b.elementwise("exp", [product], shape, out_dtype)
    x = _convert(b, x, f)
    op = _Ops(b, shape)
    const = op.const

    if prim == "tan":
        y = op("div", op("sin", x), op("cos", x))
    elif prim == "atan":
        y = _copysign(b, _atan_of_nonnegative(b, op("abs", x)), x)
    elif prim == "cbrt":  # sign(x) |x|^(1/3): pow of a negative base is NaN
        y = op("mul", op("sign", x), op("pow", op("abs", x), const(1.0 / 3.0)))
    else:
        # Large |x|: e^|x| / 2 as e^(|x| - ln 2), finite up to |x| = 89.4 as XLA's (e^|x| alone
        # overflows at 88.7); the other term is below float32's precision there.
        a = op("abs", x)
        big = op("gt", a, const(10.0), dtype="bool")
        half_exp = op("exp", op("sub", a, const(float(np.log(2.0)))))
        if prim == "cosh":  # (e^|x| + e^-|x|) / 2
            e = op("exp", a)
            small = op("add", op("mul", e, const(0.5)), op("div", const(0.5), e))
        else:  # sinh through expm1, accurate near 0: u = e^|x| - 1, (u + u / (u + 1)) / 2
            u = op("expm1", a)
            small = op("mul", op("add", u, op("div", u, op("add", u, const(1.0)))), const(0.5))
        y = op("select", big, small, half_exp)
        if prim == "sinh":
            y = op("mul", op("sign", x), y)
    return _convert(b, y, out_dtype)


def _atan_of_nonnegative(b: _Builder, a: _Node) -> _Node:
    """atan(a) for a >= 0 (or NaN) in float32: Cephes' atanf (reduced to |z| <= tan(pi/8) by
    atan(a) = pi/2 + atan(-1/a) or pi/4 + atan((a - 1)/(a + 1)), then a degree-9 odd polynomial):
    within 2 ulps; atan(inf) = pi/2."""
    op = _Ops(b, a.shape)
    const = op.const
    big = op("gt", a, const(2.414213562373095), dtype="bool")  # tan(3 pi / 8)
    mid = op("gt", a, const(0.4142135623730950), dtype="bool")  # tan(pi / 8)
    base = op.where(big, const(np.pi / 2), op.where(mid, const(np.pi / 4), const(0.0)))
    reduced = op("div", op("sub", a, const(1.0)), op("add", a, const(1.0)))
    z = op.where(big, op("div", const(-1.0), a), op.where(mid, reduced, a))
    zz = op("mul", z, z)
    poly = const(8.05374449538e-2)
    for c in (-1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1):
        poly = op("add", op("mul", poly, zz), const(c))
    return op("add", base, op("add", op("mul", op("mul", poly, zz), z), z))


def _copysign(b: _Builder, magnitude: _Node, sign: _Node) -> _Node:
    """|magnitude| with sign's sign bit (float32 bits): -0.0 and NaNs keep theirs."""
    i = _Ops(b, magnitude.shape, "int32")
    low = i("and", i("bitcast", magnitude), i.const(0x7FFFFFFF))
    top = i("and", i("bitcast", sign), i.const(_INT32_MIN))
    return i("bitcast", i("or", low, top), dtype="float32")


def _atan2(b: _Builder, y: _Node, x: _Node, out_shape, out_dtype: str) -> _Node:
    """atan2(y, x) in float32 through atan(|y| / |x|), folded into the quadrant of (x, y) with
    IEEE's special cases: both zero -> 0 or pi, both infinite -> pi/4 or 3 pi/4, x = +-0 -> pi/2;
    the sign of y (also of a zero y) on the result. Within a few ulps of XLA's."""
    shape, f = tuple(out_shape), "float32"  # the ops below broadcast a scalar operand
    y, x = _convert(b, y, f), _convert(b, x, f)
    op = _Ops(b, shape)
    const = op.const

    def test(name, *args):
        return op(name, *args, dtype="bool")

    ay, ax = op("abs", y), op("abs", x)
    a = _atan_of_nonnegative(b, op("div", ay, ax))  # 0 / 0 and inf / inf are NaN: set below
    zero, inf = const(0.0), const(float("inf"))
    both_zero = test("mul", test("eq", ay, zero), test("eq", ax, zero))
    both_inf = test("mul", test("eq", ay, inf), test("eq", ax, inf))
    a = op("select", both_zero, a, zero)
    a = op("select", both_inf, a, const(np.pi / 4))
    x_negative = test("ilt", op("bitcast", x, dtype="int32"), _iconst(0))
    a = op("select", x_negative, a, op("sub", const(np.pi), a))
    return _convert(b, _copysign(b, a, y), out_dtype)


def _tile(b: _Builder, x: _Node, reps: tuple[int, ...], out_shape) -> _Node:
    """jnp.tile: x repeated reps[d] times along each dim, as a view of x that reads it again
    for every repetition ((rep, n) per tiled dim, the rep's stride 0), copied into the result."""
    reps = (1,) * (len(x.shape) - len(reps)) + tuple(reps)
    if math.prod(out_shape) == 0:
        return _Imm(tuple(out_shape), x.dtype, value=_zero(x.dtype))
    src = _as_load(b, x)
    shape, strides = [], []
    for n, r, s in zip(src.shape, reps, src.strides, strict=True):
        if r > 1:
            shape.append(r)
            strides.append(0)
        shape.append(n)
        strides.append(s)
    if len(shape) > MAX_RANK:
        raise UnsupportedError(
            f"ark.persistent: tile of a rank-{len(reps)} array along {sum(r > 1 for r in reps)} "
            f"dims (at most {MAX_RANK} dims together) at {b.source}"
        )
    view = _Load(tuple(shape), src.dtype, src.tensor, src.offset, tuple(strides), src.iter_stride,
                 src.outer_iter_stride)  # fmt: skip
    return b.reshape(view, tuple(out_shape))


def _typed_elementwise(b: _Builder, prim: str, args, out_shape, out_dtype, params) -> _Node:
    kind = _kind(args[0].dtype)
    if prim == "not" and kind == "bool":
        zero = _Imm((), "bool", value=0.0)
        return b.elementwise("eq", [args[0], zero], out_shape, out_dtype)
    if prim == "integer_pow":
        y = int(params["y"])
        if kind == "float":
            return b.elementwise("integer_pow", args, out_shape, out_dtype, imm=y)
        if kind in ("int", "uint") and y >= 0:
            return b.elementwise("ipow", args, out_shape, out_dtype, imm=y)
    elif prim == "pow" and kind == "float" and _kind(args[1].dtype) in ("int", "uint"):
        # lax.pow takes an integer exponent (optax's bias correction `b1 ** count`); XLA converts
        # it to the base's dtype before its `power`, so the exponent is converted here too
        # (its int32 bits would otherwise be read as a float: 0.9 ** 1 became 0.9 ** 1.4e-45).
        exponent = _convert(b, args[1], args[0].dtype)
        return b.elementwise("pow", [args[0], exponent], out_shape, out_dtype)
    elif prim == "sign" and kind == "uint":  # 0 or 1
        return b.elementwise("umin", [args[0], _Imm((), "uint32", value=1)], out_shape, out_dtype)
    elif prim == "square" and kind in ("int", "uint"):
        return b.elementwise("imul", [args[0], args[0]], out_shape, out_dtype)
    elif prim in _NARROW_SHIFTS and args[0].dtype in NARROW_INT_DTYPES:
        return _narrow_shift_right(b, prim, args, tuple(out_shape), out_dtype)
    else:
        opcode = _INT_TYPED.get(prim, {}).get(kind)
        if opcode is None and kind in ("float", "bool"):
            opcode = _UNARY.get(prim) or _BINARY.get(prim)
            mixed = [a.dtype for a in args if _kind(a.dtype) not in ("float", "bool")]
            if opcode is not None and mixed:
                # A float opcode reads every register as a float: an integer operand's bits
                # would be misread. jax gives such mixed operands only to pow (above).
                raise UnsupportedError(
                    f"ark.persistent: '{prim}' of {args[0].dtype} with {mixed[0]} operands is "
                    f"not supported (at {b.source})"
                )
        if opcode is not None:
            return b.elementwise(opcode, args, out_shape, out_dtype)
    raise UnsupportedError(
        f"ark.persistent: primitive '{prim}' on {args[0].dtype} values is not supported "
        f"(at {b.source})"
    )


# Right shifts that read the bits above a narrow integer's width, which its register extends.
_NARROW_SHIFTS = {"shift_right_logical", "shift_right_arithmetic"}


def _narrow_shift_right(b: _Builder, prim: str, args, shape: tuple, dtype: str) -> _Node:
    """A right shift of an 8- / 16-bit integer in 32 bits: logical of the value's zero-extended
    bits, arithmetic of its sign-extended ones (a register holds the extension of its dtype's
    kind, not the shift's); wrapped back to the dtype. A shift by the width or more gives 0 or the
    sign, as XLA's. The amount is read as unsigned (negative: a huge shift)."""
    x, amount = args
    width = 8 * np.dtype(dtype).itemsize
    signed = dtype.replace("u", "", 1) if dtype.startswith("u") else dtype
    if prim == "shift_right_logical":
        mask = _Imm((), "uint32", value=(1 << width) - 1)
        x32 = b.elementwise(
            "and", [b.elementwise("imov", [x], x.shape, "uint32"), mask], x.shape, "uint32"
        )
        op = "shrl"
    else:
        x32 = b.elementwise("imov", [b.elementwise("imov", [x], x.shape, signed)], x.shape, "int32")
        op = "shra"
    n = b.elementwise("imov", [amount], amount.shape, "uint32")
    return b.elementwise("imov", [b.elementwise(op, [x32, n], shape, x32.dtype)], shape, dtype)


def _convert(b: _Builder, x: _Node, dtype: str) -> _Node:
    """convert_element_type with XLA's semantics: float -> int truncates and saturates (NaN -> 0);
    int -> float rounds to nearest even (to float32 first, then to a 16-bit float dtype)."""
    src, dst = _kind(x.dtype), _kind(dtype)
    if x.dtype == dtype:
        return x
    if src in ("int", "uint"):
        if dst in ("int", "uint"):
            return b.elementwise("imov", [x], x.shape, dtype)
        if dst == "bool":
            zero = _Imm((), x.dtype, value=0)
            return b.elementwise("ine", [x, zero], x.shape, dtype)
        return b.elementwise("i2f" if src == "int" else "u2f", [x], x.shape, dtype)
    if dst in ("int", "uint"):  # from a float or bool register (bool: 0.0 / 1.0)
        if dtype in NARROW_INT_DTYPES and src == "float":
            # XLA saturates to the narrow range (NaN -> 0: max / min keep the NaN, f2i zeroes it).
            low, high = _int_range(dtype)
            x = _convert(b, x, "float32")
            x = b.elementwise("max", [x, _Imm((), "float32", value=float(low))], x.shape, "float32")
            x = b.elementwise(
                "min", [x, _Imm((), "float32", value=float(high))], x.shape, "float32"
            )
        return b.elementwise("f2i" if dst == "int" else "f2u", [x], x.shape, dtype)
    return b.elementwise("copy", [x], x.shape, dtype)


def _bitcast_convert(b: _Builder, x: _Node, dtype: str) -> _Node:
    """lax.bitcast_convert_type between the 32-bit dtypes (the register's bits, reinterpreted)
    and between the 16-bit ones (_special: a 16-bit float's bits are computed from its value)."""
    if {x.dtype, dtype} <= _BITCAST16_DTYPES and x.dtype != dtype:
        return _special().bitcast16(b, x, dtype)
    if x.dtype not in _BITCAST_DTYPES or dtype not in _BITCAST_DTYPES:
        raise UnsupportedError(
            f"ark.persistent: bitcast_convert_type from {x.dtype} to {dtype} is not supported (at "
            f"{b.source}); supported: between float32, int32 and uint32, and between bfloat16, "
            "float16, int16 and uint16"
        )
    if x.dtype == dtype:
        return x
    same_kind = (x.dtype in INT_DTYPES) == (dtype in INT_DTYPES)
    return b.elementwise("imov" if same_kind else "bitcast", [x], x.shape, dtype)


_BITCAST_DTYPES = frozenset({"float32", "int32", "uint32"})
_BITCAST16_DTYPES = frozenset({"bfloat16", "float16", "int16", "uint16"})
# Largest k planned as k rounds of two reductions over the axis (a router's top-k); a larger one
# is a radix select (_radix.top_k: 32 counting passes, two running counts and a scatter).
_TOP_K_MAX = 32
_INT32_MIN = -(2**31)


def _total_order_key(b: _Builder, x: _Node) -> _Node:
    """int32 keys whose signed order is the order lax.top_k ranks x by: XLA's total order for
    floats (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN, from the float32 bits with the
    magnitude bits of negatives flipped), the values for int32, uint32 with the top bit flipped.
    The map is its own inverse on the 32 bits (_from_total_order_key)."""
    shape = x.shape
    if _kind(x.dtype) == "float":
        bits = b.elementwise("bitcast", [_convert(b, x, "float32")], shape, "int32")
        return _flip_negative_magnitudes(b, bits)
    if _kind(x.dtype) == "int":  # the value, extended to 32 bits
        return b.elementwise("imov", [x], shape, "int32") if x.dtype != "int32" else x
    if _kind(x.dtype) == "uint":
        top = _Imm((), "int32", value=_INT32_MIN)
        return b.elementwise(
            "xor", [b.elementwise("imov", [x], shape, "int32"), top], shape, "int32"
        )
    raise UnsupportedError(
        f"ark.persistent: top_k of {x.dtype} values is not supported (at {b.source})"
    )


def _flip_negative_magnitudes(b: _Builder, v: _Node) -> _Node:
    """int32 bits with the 31 low bits flipped where the sign bit is set (its own inverse)."""
    sign = b.elementwise("shra", [v, _Imm((), "int32", value=31)], v.shape, "int32")
    flip = b.elementwise("and", [sign, _Imm((), "int32", value=0x7FFFFFFF)], v.shape, "int32")
    return b.elementwise("xor", [v, flip], v.shape, "int32")


def _from_total_order_key(b: _Builder, key: _Node, dtype: str) -> _Node:
    shape = key.shape
    if _kind(dtype) == "float":
        bits = _flip_negative_magnitudes(b, key)
        return _convert(b, b.elementwise("bitcast", [bits], shape, "float32"), dtype)
    if _kind(dtype) == "uint":
        top = _Imm((), "int32", value=_INT32_MIN)
        return b.elementwise(
            "imov", [b.elementwise("xor", [key, top], shape, "int32")], shape, dtype
        )
    return b.elementwise("imov", [key], shape, dtype) if dtype != "int32" else key


def _top_k(b: _Builder, x: _Node, k: int, axis: int, out_shape) -> list[_Node]:
    """lax.top_k as k rounds over `axis`: the largest key not yet taken (reduce_max), then the
    lowest position holding it among those not taken (reduce_min). Ranked by XLA's total order,
    ties to the lower index, as jax.jit's top_k; exact, since keys are the values' bits. A taken
    element is masked with INT32_MIN, which an untaken element may equal too (-NaN with every
    payload bit set, or int32 INT_MIN): the position search therefore checks `taken` itself."""
    if k > _TOP_K_MAX:  # k rounds would be more work than a radix select
        closed = _radix.top_k_jaxpr(x, k, axis)
        return _translate(b, closed.jaxpr, list(closed.consts), [x])
    if x.dtype == "bool":  # False < True, as XLA ranks them
        values, index = _top_k(b, _convert(b, x, "int32"), k, axis, out_shape)
        return [_convert(b, values, "bool"), index]
    shape, rank = x.shape, len(x.shape)
    n = shape[axis]
    key = b.materialize(_total_order_key(b, x))
    pos = _iota(b, {"dimension": axis}, shape, "int32")
    kept = tuple(d for d in range(rank) if d != axis)
    reduced = tuple(shape[d] for d in kept)
    one = tuple(1 if d == axis else shape[d] for d in range(rank))
    taken = None
    keys, indices = [], []
    for _ in range(k):
        live = key
        if taken is not None:
            floor = _Imm((), "int32", value=_INT32_MIN)
            live = b.elementwise("select", [taken, key, floor], shape, "int32")
        best = b.materialize(_reduce(b, "reduce_max", live, (axis,), reduced, "int32"))
        is_best = b.elementwise("ieq", [key, b.broadcast(best, shape, kept)], shape, "bool")
        if taken is not None:
            no = _Imm((), "bool", value=0.0)
            is_best = b.elementwise("select", [taken, is_best, no], shape, "bool")
        where = b.elementwise("select", [is_best, _Imm((), "int32", value=n), pos], shape, "int32")
        index = b.materialize(_reduce(b, "reduce_min", where, (axis,), reduced, "int32"))
        hit = b.elementwise("ieq", [pos, b.broadcast(index, shape, kept)], shape, "bool")
        taken = hit if taken is None else b.elementwise("max", [taken, hit], shape, "bool")
        taken = b.materialize(taken)
        keys.append(b.reshape(best, one))
        indices.append(b.reshape(index, one))
    if k > 1:
        keys = [_concatenate(b, keys, {"dimension": axis}, out_shape, "int32")]
        indices = [_concatenate(b, indices, {"dimension": axis}, out_shape, "int32")]
    return [_from_total_order_key(b, keys[0], x.dtype), indices[0]]


def _round_to_integer(b: _Builder, prim: str, x: _Node, method: int, out_dtype: str) -> _Node:
    """floor / ceil / round (method 0: half away from zero, 1: half to even) from exactly rounded
    float32 ops, as XLA computes them bit for bit: below 2^23, (|x| + 2^23) - 2^23 is |x| rounded
    half to even (float32's own rounding); floor / ceil / away-from-zero adjust that by one where
    it went the wrong way. At or above 2^23 every float32 is an integer, and inf / NaN pass
    unchanged. A zero result takes x's sign (round(-0.3) = -0.0), as IEEE's does. Widened to
    float32 first: a 16-bit dtype's intermediate rounding would spoil the trick."""
    f = _convert(b, x, "float32")
    op = _Ops(b, x.shape)
    const = op.const

    def plus_one_where(pred, v):  # v + (pred ? 1 : 0)
        return op("add", v, op("select", pred, const(0.0), const(1.0)))

    big = const(8388608.0)  # 2^23
    mag = op("abs", f)
    even = op("sub", op("add", mag, big), big)
    down = op("sub", even, op("select", op("gt", even, mag, dtype="bool"), const(0.0), const(1.0)))
    up = plus_one_where(op("lt", even, mag, dtype="bool"), even)
    negative = op("lt", f, const(0.0), dtype="bool")
    if prim == "floor":  # x >= 0: |x| rounded down; x < 0: -(|x| rounded up)
        res = op("select", negative, down, op("neg", up))
    elif prim == "ceil":
        res = op("select", negative, up, op("neg", down))
    else:
        if method == 0:  # half away from zero: down + 1 where the fraction is at least a half
            m = plus_one_where(op("ge", op("sub", mag, down), const(0.5), dtype="bool"), down)
        else:
            m = even
        res = op("select", negative, m, op("neg", m))
    res = op("select", op("eq", res, const(0.0), dtype="bool"), res, op("mul", f, const(0.0)))
    res = op("select", op("lt", mag, big, dtype="bool"), f, res)
    return _convert(b, res, out_dtype)


def _split(b: _Builder, x: _Node, axis: int, sizes: list[int]) -> list[_Node]:
    """Views of x's consecutive pieces along axis; x is computed once when a piece cannot be a
    view of its lazy form."""
    bounds = []
    at = 0
    for n in sizes:
        start, limit = [0] * len(x.shape), list(x.shape)
        start[axis], limit[axis] = at, at + n
        bounds.append((tuple(start), tuple(limit)))
        at += n
    step = (1,) * len(x.shape)
    pieces = [b._slice(x, lo, hi, step) for lo, hi in bounds]
    if any(p is None for p in pieces):
        whole = b.materialize(x)
        pieces = [b._slice(whole, lo, hi, step) for lo, hi in bounds]
    return pieces


def _select_n(b: _Builder, args, out_shape, out_dtype) -> _Node:
    """select_n(pred, *cases) = cases[pred]: a chain of selects on pred >= i (bool or int32)."""
    pred, cases = args[0], list(args[1:])
    if pred.dtype == "bool":
        if len(cases) != 2:
            raise UnsupportedError(f"ark.persistent: select_n on a bool with {len(cases)} cases")
        return b.elementwise("select", [pred, *cases], out_shape, out_dtype)
    if pred.dtype != "int32":
        raise UnsupportedError(f"ark.persistent: select_n on a {pred.dtype} predicate")
    out = cases[0]
    for i, case in enumerate(cases[1:], start=1):
        take = b.elementwise("ige", [pred, _Imm((), "int32", value=i)], out_shape, "bool")
        out = b.elementwise("select", [take, out, case], out_shape, out_dtype)
    return out


def _iota(b: _Builder, params, out_shape, out_dtype) -> _Node:
    """iota as a plan constant arange(n) broadcast along its dimension (a view: no copy)."""
    dim = int(params["dimension"])
    n = out_shape[dim]
    if n > 1 and (n, out_dtype) in b.aranges:
        return b.broadcast(b.load(b.aranges[(n, out_dtype)]), out_shape, (dim,))
    values = np.arange(n).astype(np.dtype(out_dtype) if out_dtype != "bfloat16" else np.float32)
    if out_dtype == "bfloat16":
        import ml_dtypes

        values = values.astype(ml_dtypes.bfloat16)
    if n <= 1:
        return _Imm(out_shape, out_dtype, value=_zero(out_dtype))
    t = b.new_tensor((n,), out_dtype, "arg", 0, name=f"const{len(b.constants)}")
    b.constants[t] = values
    b.aranges[(n, out_dtype)] = t
    return b.broadcast(b.load(t), out_shape, (dim,))


# ---- indexing (plan v2): device indices read by the kernel through load_at -----------------------
# An indexed value is `load_at(view, offset)`: a static view over the output's index space plus an
# int32 element offset computed in the same program from the index values (loaded from device
# memory at run time, never read by the host). Indices are clamped as XLA clamps them, so every
# offset stays inside the tensor; dims whose position comes from an index have stride 0 in the view.
def _i32(b: _Builder, node: _Node, shape) -> _Node:
    """An index value as int32, broadcast to shape (scalars and index vectors)."""
    if node.dtype != "int32" and node.dtype in INT_DTYPES:  # narrow values are extended already
        node = b.elementwise("imov", [node], node.shape, "int32")
    elif node.dtype != "int32":
        raise UnsupportedError(f"ark.persistent: {node.dtype} indices at {b.source}")
    return node if node.shape == tuple(shape) else b.broadcast(node, shape, ())


def _iconst(value: int) -> _Imm:
    return _Imm((), "int32", value=int(value))


def _iop(b: _Builder, op: str, x: _Node, y: _Node | int) -> _Node:
    y = _iconst(y) if isinstance(y, (int, np.integer)) else y
    cmp = op[1:] in ("lt", "le", "gt", "ge", "eq", "ne")
    return b.elementwise(op, [x, y], x.shape, "bool" if cmp else x.dtype)


def _clamp(b: _Builder, x: _Node, lo: int, hi: int) -> _Node:
    return _iop(b, "imin", _iop(b, "imax", x, lo), hi)


def _position(b: _Builder, shape, dim: int) -> _Node:
    return _iota(b, {"dimension": dim}, tuple(shape), "int32")


def _as_load(b: _Builder, node: _Node) -> _Load:
    return node if isinstance(node, _Load) else b.materialize(node)


def _load_at(base: _Load, offset: _Node | None) -> _Node:
    if offset is None:
        return base
    return _Ew(base.shape, base.dtype, op="load_at", args=(base, offset), _size=offset.size + 2)


def _sum_offsets(b: _Builder, terms: list[_Node]) -> _Node | None:
    out = None
    for t in terms:
        out = t if out is None else b.elementwise("iadd", [out, t], t.shape, "int32")
    return out


def _and(b: _Builder, x: _Node | None, y: _Node) -> _Node:
    return y if x is None else b.elementwise("mul", [x, y], y.shape, "bool")


def _dynamic_slice(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    x = _as_load(b, args[0])
    terms = []
    offset, iter_stride = x.offset, x.iter_stride
    for d, (start, size) in enumerate(zip(args[1:], params["slice_sizes"], strict=True)):
        s = _clamp(b, _i32(b, start, out_shape), 0, x.shape[d] - size)
        affine = _iteration_affine(b, s)
        if affine is not None:
            # a constant or a function of the loop iteration (cache[l] with l a layer counter):
            # a view that moves with the iteration, read in place (no run-time offset)
            offset += affine[0] * x.strides[d]
            iter_stride += affine[1] * x.strides[d]
            continue
        terms.append(_iop(b, "imul", s, x.strides[d]))
    base = _Load(
        tuple(out_shape), x.dtype, x.tensor, offset, x.strides, iter_stride, x.outer_iter_stride
    )
    return _load_at(base, _sum_offsets(b, terms))


def _clamped_start(b: _Builder, start: _Node, hi: int, uses: int) -> _Node:
    """A dynamic_update_slice's start clamped into [0, hi] as XLA clamps it, as a scalar: a
    constant when it is one; else computed once by its own task when its arithmetic is more
    than a clamped load and would otherwise run for more than 256 of the `uses` elements of
    its consumer (a ring matmul's `(me - step) % n * rows` for every element of the output
    block), else left in the consumer's program (a decode step's one row: one task)."""
    s = _i32(b, start, ())
    if isinstance(s, _Imm):
        return _iconst(min(max(int(s.value), 0), hi))
    s = _clamp(b, s, 0, hi)
    return b.materialize(s) if s.size > 8 and uses > 256 else s


def _dynamic_update_slice(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    if math.prod(args[1].shape) == 0:
        return args[0]
    target = _in_place_target(b, args[0], out_shape)
    if target is not None:
        return _window_store(b, target, args[1], args[2:])
    operand, update = args[0], _as_load(b, args[1])
    inside, terms = None, []
    strides = [0] * len(out_shape)
    for d, start in enumerate(args[2:]):
        n, u = out_shape[d], update.shape[d]
        if u == n:  # the start clamps to 0: the update covers the dim, read along it as is
            strides[d] = update.strides[d]
            continue
        # Whether a position along d lies in the window, and the update's offset there, depend
        # on that position alone: computed as two vectors of n (small ops), broadcast into the
        # full-size select, whose program then only loads them (the start's arithmetic per
        # element of the whole result made a ring matmul's output assembly dominate its time).
        s = _clamped_start(b, start, n - u, n)
        rel = b.elementwise("isub", [_position(b, (n,), 0), s], (n,), "int32")
        in_window = b.materialize(_and(b, _iop(b, "ige", rel, 0), _iop(b, "ilt", rel, u)))
        at = b.materialize(_iop(b, "imul", _clamp(b, rel, 0, u - 1), update.strides[d]))
        inside = _and(b, inside, b.broadcast(in_window, out_shape, (d,)))
        terms.append(b.broadcast(at, out_shape, (d,)))
    base = _Load(
        tuple(out_shape),
        update.dtype,
        update.tensor,
        update.offset,
        tuple(strides),
        update.iter_stride,
        update.outer_iter_stride,
    )
    if inside is None:  # the update is the whole result
        return base
    new = _load_at(base, _sum_offsets(b, terms))
    return b.elementwise("select", [inside, operand, new], out_shape, out_dtype)


def _window_scatter(eqn) -> bool:
    """A `scatter` (set: add / mul / min / max combine with the old value) of windows of the
    operand at ONE point (x.at[i].set(v), a KV-cache write cache.at[:, pos].set(kv)) or at the
    points of one index dim (cache.at[jnp.arange(B), pos].set(kv): each sequence of a batch at
    its own position), at most _SCATTER_MAX_POINTS."""
    if eqn.primitive.name != "scatter" or eqn.params.get("update_jaxpr") is not None:
        return False
    dn = eqn.params["dimension_numbers"]
    indices = eqn.invars[1].aval.shape
    points = math.prod(indices[:-1])
    return (
        not dn.operand_batching_dims
        and not dn.scatter_indices_batching_dims
        and 1 <= len(indices) <= 2
        and 1 <= points <= _SCATTER_MAX_POINTS
        # several points add a dim to the store's iteration space
        and (points == 1 or len(eqn.invars[0].aval.shape) < MAX_RANK)
        and math.prod(eqn.invars[2].aval.shape) > 0
    )


def _is_window_update(eqn) -> bool:
    """An eqn whose result is its first operand with windows replaced (in-place candidates)."""
    return eqn.primitive.name == "dynamic_update_slice" or _window_scatter(eqn)


def _dus_chains(jaxpr, counts: dict) -> dict[int, Any]:
    """id(dynamic_update_slice eqn) -> the var its result ends up as when the result's one use is
    the operand of the next dynamic_update_slice, and so on (an unrolled ring matmul writing each
    step's product into its rows of one buffer), or window scatters (`x.at[i].set(v)`,
    _window_scatter), which update windows in place too."""
    next_update: dict = {}
    for e in jaxpr.eqns:
        v = e.invars[0] if _is_window_update(e) else None
        if v is not None and not _is_literal(v) and counts.get(v) == 1:
            next_update[v] = e
    ends: dict[int, Any] = {}
    for e in reversed(jaxpr.eqns):
        if _is_window_update(e):
            following = next_update.get(e.outvars[0])
            ends[id(e)] = ends[id(following)] if following is not None else e.outvars[0]
    return ends


def _in_place_target(b: _Builder, operand: _Node, out_shape) -> _Load | None:
    """Where the current update eqn (a dynamic_update_slice or a window scatter,
    _is_window_update) writes in place, or None (then the whole result is computed).

    A loop's in-place state (_in_place_state): the operand is a view of the state tensor (the
    whole of it, or the iteration's slice of an inner scan's xs). Outside loops, a chain of
    updates of one buffer (_dus_chains) whose last result the function returns, starting from a
    user input or a constant fill (`jnp.zeros`) that nothing else reads: the result is that
    input's buffer (aliased through the FFI call: with jax.jit donation, no copy), or one aliased
    to a plan constant holding the fill, and one window-store task per update writes only the
    update, in program order (required_dependencies orders the stores of one tensor). Updating a
    buffer by selecting over all of it per update made an unrolled ring matmul's output assembly
    cost more than its matmuls."""
    eqn = b.eqn
    if eqn is None:
        return None
    state = b.loop_in_place.get(id(eqn))
    if state is not None and isinstance(operand, _Load) and operand.tensor == state:
        return operand
    end = b.dus_chain_end.get(id(eqn))
    if end is None or b.top_counts.get(eqn.invars[0]) != 1:
        return None
    whole = (
        isinstance(operand, _Load)
        and b.tensors[operand.tensor].shape == tuple(out_shape)
        and _is_identity(operand, b.tensors[operand.tensor].shape)
    )
    if whole and operand.tensor in b.chain_results:  # a later update of the chain's buffer
        return operand
    if end not in b.top_outputs:
        return None
    if isinstance(operand, _Imm):
        out = _fill_state(b, operand, eqn.invars[0], end)
        if out is None:
            return None
    elif whole and operand.tensor in b.args[: b.num_inputs]:
        src = b.tensors[operand.tensor]
        if src.index in b.aliased:
            return None
        b.aliased.add(src.index)
        out = b.new_tensor(out_shape, src.dtype, "result", b.top_outputs.pop(end))
        b.tensors[out].alias = src.index
    else:
        return None
    b.chain_results.add(out)
    return b.load(out)


def _window_store(
    b: _Builder,
    target: _Load,
    update: _Node,
    starts,
    keep: _Node | None = None,
    points: int = 0,
) -> _Load:
    """One window-store task writing `update` into `target` (a view of an aliased result: the
    whole tensor, or the current iteration's slice of it when the state is an inner scan's xs)
    at the clamped device offset of `starts`; the other elements keep their content. With
    `keep` (a bool: a scatter point's window fits), nothing is stored where it is false. With
    `points` > 0 (a scatter of several points), update is (points, *window), and starts and keep
    hold one value per point: the task stores every point's window, in point order. Returns
    target, which now holds the updated value."""
    out = target.tensor
    src = b.tensors[out]
    space = tuple(update.shape)
    window = space[1:] if points else space
    per_point = (0,) if points else ()  # how a per-point value broadcasts over the space
    if target.outer_iter_stride:
        raise AssertionError("internal error: an in-place view moving with the outer loop")
    terms = []
    first = target.offset  # the window's first element, as far as it is known at plan time
    for d, start in enumerate(starts):
        hi = target.shape[d] - window[d]
        if points:
            s = _clamp(b, _i32(b, start, (points,)), 0, hi)
        else:
            s = _clamped_start(b, start, hi, math.prod(window))
            if isinstance(s, _Imm):  # a constant start moves the store view, not the register
                first += int(s.value) * target.strides[d]
                continue
        terms.append(b.broadcast(_iop(b, "imul", s, target.strides[d]), space, per_point))
    if target.iter_stride:
        # The slice of the innermost loop's iteration: a store view does not move with the
        # iteration, so the program adds iteration * iter_stride (LOAD_ITER) to the offset.
        i = _Ew(space, "int32", op="load_iter")
        terms.append(_iop(b, "imul", i, target.iter_stride))
    offset = _sum_offsets(b, terms) or _Imm(space, "int32", value=0)
    if keep is not None:
        drop = _Imm(space, "int32", value=DROP_STORE)
        keep = b.broadcast(keep, space, per_point)
        offset = b.elementwise("select", [keep, drop, offset], space, "int32")
    view = _Load(space, src.dtype, out, first, per_point + tuple(target.strides))
    if keep is None and not points and _matmul_window_store(b, view, update, offset):
        return target
    value = b.strip_pendings(update)
    if value.dtype != src.dtype:
        value = _convert(b, value, src.dtype)
    prog, store_at = _value_and_offset_program(b, value, offset)
    b.ops.append(
        Op(
            name=f"update_in_place{len(b.ops)}",
            kind="map",
            out=out,
            B=1,
            M=math.prod(space[:-1]) if space else 1,
            N=space[-1] if space else 1,
            acc_dtype=src.dtype,
            iter_dims=space,
            epilogue=prog,
            source=b.source,
            store_view=b.view_id(view),
            store_at=store_at,
        )
    )
    return target


def _value_and_offset_program(b: _Builder, value: _Node, offset: _Node) -> tuple[list, int]:
    """One program computing a value and the int32 offset it is stored at (a window store's
    epilogue, a scatter fold's prologue), within MAX_PROGRAM_LEN: either side too big to fuse is
    computed into memory first. Returns the program and the offset's register."""
    if value.size + offset.size > _FUSE_LIMIT:
        value = b.materialize(value)
    if offset.size > _FUSE_LIMIT:
        offset = b.materialize(offset)
    prog, (store_at,) = b.compile_with(value, [offset])
    return prog, store_at


def _matmul_window_store(b: _Builder, view: _Load, update: _Node, offset: _Node) -> bool:
    """Emits the matmul computing `update` (a matmul's pending result and its epilogue, read by
    nothing else: a pending with another use was materialized when it was bound) as a window
    store: each tile goes straight to the store view's elements moved by `offset`, instead of into a
    workspace tensor that a map's window store then copies. An unrolled ring matmul's eight
    products each made that extra pass (perf, one core). Returns False where this does not apply
    (then the caller emits the map): not exactly one pending matmul, a program too long, or a GPU
    plan (the CUDA executor runs map window stores only)."""
    if b.platform != "cpu":
        return False
    node = b._substitute(update)
    cores = _cores(node)
    if len(cores) != 1 or cores[0].kind != "matmul":
        return False
    core, space = cores[0], tuple(update.shape)
    if core.B * core.M * core.N != math.prod(space):
        return False
    out = view.tensor
    if node.dtype != b.tensors[out].dtype:
        node = _convert(b, node, b.tensors[out].dtype)
    if node.size + offset.size > _FUSE_LIMIT:
        return False
    op = b.core_op(core, out)
    op.epilogue, (op.store_at,) = b.compile_with(node, [offset], acc_negate=core.negate)
    op.iter_dims, op.store_view = space, b.view_id(view)
    b.ops.append(op)
    return True


def _gather(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    x, idx = _as_load(b, args[0]), args[1]
    dn = params["dimension_numbers"]
    sizes = tuple(params["slice_sizes"])
    mode = str(params.get("mode", "")).rsplit(".", 1)[-1].lower()
    rank = len(out_shape)
    offset_dims = tuple(dn.offset_dims)
    batch_out = [d for d in range(rank) if d not in offset_dims]  # = idx dims but the last
    collapsed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    window = [d for d in range(len(x.shape)) if d not in collapsed]
    strides = [0] * rank
    for od, xd in zip(offset_dims, window, strict=True):
        strides[od] = x.strides[xd]
    for xd, idd in zip(dn.operand_batching_dims, dn.start_indices_batching_dims, strict=True):
        strides[batch_out[idd]] = x.strides[xd]  # idx batch dim idd is output dim batch_out[idd]
    nvec = idx.shape[-1]
    idx_dims = tuple(batch_out)
    inside, terms = None, []
    for k, xd in enumerate(dn.start_index_map):
        start = b.slice(idx, (0,) * (len(idx.shape) - 1) + (k,), idx.shape[:-1] + (k + 1,), None)
        start = b.reshape(start, idx.shape[:-1])
        start = _i32(b, b.broadcast(start, out_shape, idx_dims), out_shape)
        hi = x.shape[xd] - sizes[xd]
        if mode == "fill_or_drop":
            inside = _and(b, inside, _iop(b, "ige", start, 0))
            inside = _and(b, inside, _iop(b, "ile", start, hi))
        terms.append(_iop(b, "imul", _clamp(b, start, 0, hi), x.strides[xd]))
    del nvec
    base = _Load(
        tuple(out_shape),
        x.dtype,
        x.tensor,
        x.offset,
        tuple(strides),
        x.iter_stride,
        x.outer_iter_stride,
    )
    value = _load_at(base, _sum_offsets(b, terms))
    if inside is None:
        return value
    fill = params.get("fill_value")
    if fill is None:
        fill = (
            _int_range(out_dtype)[_kind(out_dtype) == "uint"] if out_dtype in INT_DTYPES else None
        )
        fill = {"bool": 1.0}.get(out_dtype, float("nan")) if fill is None else fill
    return b.elementwise(
        "select",
        [inside, _Imm(out_shape, out_dtype, value=_scalar(fill, out_dtype)), value],
        out_shape,
        out_dtype,
    )


def _concatenate(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    axis = int(params["dimension"])
    i = _position(b, out_shape, axis)
    out, at = None, 0
    for a in args:
        n = a.shape[axis]
        if n == 0:
            continue
        x = _as_load(b, a)
        strides = tuple(0 if d == axis else s for d, s in enumerate(x.strides))
        base = _Load(
            tuple(out_shape),
            x.dtype,
            x.tensor,
            x.offset,
            strides,
            x.iter_stride,
            x.outer_iter_stride,
        )
        moved = _iop(b, "imul", _clamp(b, _iop(b, "isub", i, at), 0, n - 1), x.strides[axis])
        part = _load_at(base, moved)
        out = (
            part
            if out is None
            else b.elementwise("select", [_iop(b, "ige", i, at), out, part], out_shape, out_dtype)
        )
        at += n
    return out if out is not None else _Imm(out_shape, out_dtype, value=_zero(out_dtype))


def _stack(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    """jnp.stack (jax 0.10 binds a `stack` primitive): the operands concatenated, each with a unit
    axis inserted at `axis`."""
    axis = int(params["axis"])
    parts = [b.reshape(a, (*a.shape[:axis], 1, *a.shape[axis:])) for a in args]
    return _concatenate(b, parts, {"dimension": axis}, out_shape, out_dtype)


def _pad(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    x, fill = args
    if math.prod(x.shape) == 0:
        return b.broadcast(fill, out_shape, ())
    return _conv().pad_node(b, x, params["padding_config"], fill)


def _rev(b: _Builder, args, params, out_shape, out_dtype) -> _Node:
    x = _as_load(b, args[0])
    dims = set(params["dimensions"])
    strides = tuple(0 if d in dims else s for d, s in enumerate(x.strides))
    terms = []
    for d in sorted(dims):
        if x.shape[d] > 1:  # element n - 1 - i along a reversed dim
            neg = b.elementwise("ineg", [_position(b, out_shape, d)], out_shape, "int32")
            back = _iop(b, "iadd", neg, x.shape[d] - 1)
            terms.append(_iop(b, "imul", back, x.strides[d]))
    base = _Load(
        tuple(out_shape), x.dtype, x.tensor, x.offset, strides, x.iter_stride, x.outer_iter_stride
    )
    return _load_at(base, _sum_offsets(b, terms))


def _scatter_handler(prim, b, args, params, out_shape, out_dtype):
    return _scatter(b, prim, args, params, out_shape, out_dtype)


_SCATTER_MAX_POINTS = 16  # scatter points planned as chained selects (each one a whole-tensor pass)
# A scatter's combine -> the scatter fold's reduce kind, by the output's register kind.
_SCATTER_FOLDS = {
    "scatter": {"float": "last", "int": "last", "uint": "last", "bool": "last"},
    "scatter-add": {"float": "sum", "int": "isum", "uint": "isum"},
    "scatter-sub": {"float": "sum", "int": "isum", "uint": "isum"},  # of the negated updates
    "scatter-mul": {"float": "prod", "int": "iprod", "uint": "iprod"},
    "scatter-min": {"float": "min", "int": "imin", "uint": "umin", "bool": "min"},
    "scatter-max": {"float": "max", "int": "imax", "uint": "umax", "bool": "max"},
}


def _scatter_windows(dn, rank: int, updates_shape) -> tuple[list[int], list[int], list[int]]:
    """A scatter's operand dims its update windows span (in order: update_window_dims[j] is
    window dim j), each operand dim's window size (1 for the inserted and batching dims), and the
    update's point dims (the ones that index scatter points, in the indices' dim order)."""
    inserted = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
    window_dims = [d for d in range(rank) if d not in inserted]
    window = [1] * rank
    for j, d in enumerate(window_dims):
        window[d] = updates_shape[dn.update_window_dims[j]]
    point_dims = [d for d in range(len(updates_shape)) if d not in dn.update_window_dims]
    return window_dims, window, point_dims


def _scatter(b: _Builder, prim: str, args, params, out_shape, out_dtype) -> _Node:
    """scatter / scatter-add / -mul / -min / -max with device indices (x.at[i].set(v), a KV-cache
    write cache.at[:, pos].set(kv), tokens.at[i].set(tok)): every output element is the operand's,
    or, inside a scatter point's window, the update's (combined with the operand's for add / mul /
    min / max). A point whose window does not fit is dropped (FILL_OR_DROP, jax's default for
    scatters, and XLA's own behaviour for PROMISE_IN_BOUNDS) or clamped into the operand (CLIP),
    as XLA does. Points are applied in order (duplicate indices of `set` are unspecified in XLA;
    add / mul / min / max fold every point). Up to 16 points per batch element are unrolled as
    whole-tensor selects (they fuse into the result's readers); more are one scatter fold
    (_scatter_fold: one pass over the result, then one fold step per update element).

    Batching dims (the transpose of take_along_axis, as in the gradient of optax's integer-label
    cross entropy): operand dim operand_batching_dims[i] is paired with indices dim
    scatter_indices_batching_dims[i], and a point only writes the operand row of its own batch
    coordinates. Every batch row is then handled at once: a point's index and update are views
    that follow the output's batch coordinates, and only the points of one batch element (the
    indices' other dims) are unrolled."""
    operand, indices, updates = args
    dn = params["dimension_numbers"]
    mode = str(params.get("mode", ""))
    where = f"at {b.source}"
    if not indices.shape:
        raise UnsupportedError(f"ark.persistent: {prim} with scalar indices {where}")
    if prim == "scatter" and params.get("update_jaxpr") is not None:
        # lax.scatter_apply: a `scatter` whose update function is not "take the update" (its
        # updates are unused placeholders); planned as a set, it would store them.
        raise UnsupportedError(
            f"ark.persistent: scatter with an update function (lax.scatter_apply) {where}"
        )
    batch_shape = tuple(indices.shape[:-1])
    # operand batching dim -> its indices dim (jax puts the index vector last, so indices dim i
    # is also the i-th point dim of the update)
    batched = dict(zip(dn.operand_batching_dims, dn.scatter_indices_batching_dims, strict=True))
    free = [i for i in range(len(batch_shape)) if i not in dn.scatter_indices_batching_dims]
    free_shape = tuple(batch_shape[i] for i in free)
    points = math.prod(free_shape)
    if math.prod(batch_shape) == 0 or math.prod(updates.shape) == 0 or math.prod(out_shape) == 0:
        return operand
    if points > _SCATTER_MAX_POINTS:
        return _scatter_fold(b, prim, operand, indices, updates, dn, mode, out_shape, out_dtype)
    if prim == "scatter" and not batched and b.eqn is not None and _window_scatter(b.eqn):
        target = _in_place_target(b, operand, out_shape)
        if target is not None:
            return _scatter_window_store(b, target, indices, updates, dn, mode, out_shape)
    kind = _kind(out_dtype)
    combine = None
    if prim != "scatter":
        table = {
            "scatter-add": {"float": "add", "int": "iadd", "uint": "iadd"},
            "scatter-sub": {"float": "sub", "int": "isub", "uint": "isub"},
            "scatter-mul": {"float": "mul", "int": "imul", "uint": "imul"},
            "scatter-min": {"float": "min", "int": "imin", "uint": "umin", "bool": "min"},
            "scatter-max": {"float": "max", "int": "imax", "uint": "umax", "bool": "max"},
        }
        combine = table.get(prim.replace("_", "-"), {}).get(kind)
        if combine is None:
            raise UnsupportedError(f"ark.persistent: {prim} on {out_dtype} {where}")
    rank = len(out_shape)
    window_dims, window, scatter_dims = _scatter_windows(dn, rank, updates.shape)
    idx = _as_load(b, indices)
    upd = _as_load(b, b.strip_pendings(updates))
    # A point's index and update follow the output's batch coordinates (stride 0 elsewhere).
    start_shape = tuple(out_shape) if batched else ()
    start_strides = tuple(idx.strides[batched[d]] if d in batched else 0 for d in range(rank))
    upd_strides = tuple(
        upd.strides[scatter_dims[batched[d]]] if d in batched else 0 for d in range(rank)
    )
    cur = operand
    for p in range(points):
        at = np.unravel_index(p, free_shape) if free_shape else ()
        idx_at = idx.offset + sum(int(i) * idx.strides[f] for i, f in zip(at, free, strict=True))
        starts = {
            d: _Load(
                start_shape, idx.dtype, idx.tensor, idx_at + c * idx.strides[-1],
                start_strides if batched else (), idx.iter_stride, idx.outer_iter_stride,
            )
            for c, d in enumerate(dn.scatter_dims_to_operand_dims)
        }  # fmt: skip
        take, terms = None, []
        for d in range(rank):
            if d in batched:  # the point's own batch row: always written, no window offset
                continue
            n, w = out_shape[d], window[d]
            pos = _position(b, out_shape, d)
            if d in starts:
                s = _i32(b, starts[d], out_shape)
                if "CLIP" in mode:
                    s = _clamp(b, s, 0, n - w)
                else:  # the whole window must fit, else the point is dropped
                    take = _and(b, take, _iop(b, "ige", s, 0))
                    take = _and(b, take, _iop(b, "ile", s, n - w))
                rel = b.elementwise("isub", [pos, s], out_shape, "int32")
            else:
                rel = pos
            if d in starts or w < n:
                take = _and(b, take, _iop(b, "ige", rel, 0))
                take = _and(b, take, _iop(b, "ilt", rel, w))
            if d in window_dims:
                stride = upd.strides[dn.update_window_dims[window_dims.index(d)]]
                terms.append(_iop(b, "imul", _clamp(b, rel, 0, w - 1), stride))
        upd_at = upd.offset + sum(
            int(i) * upd.strides[scatter_dims[f]] for i, f in zip(at, free, strict=True)
        )
        base = _Load(
            tuple(out_shape), upd.dtype, upd.tensor, upd_at, upd_strides, upd.iter_stride,
            upd.outer_iter_stride,
        )  # fmt: skip
        new = _load_at(base, _sum_offsets(b, terms))
        if combine is not None:
            new = b.elementwise(combine, [cur, new], out_shape, out_dtype)
        cur = (
            new if take is None else b.elementwise("select", [take, cur, new], out_shape, out_dtype)
        )
    return cur


def _scatter_fold(
    b: _Builder, prim: str, operand, indices, updates, dn, mode: str, out_shape, out_dtype: str
) -> _Load:
    """A scatter of many points (an embedding's gradient, segment_sum, bincount, histogram,
    x.at[perm].set(v)) as ONE scatter-fold op (docs/plan_format.md, "Scatter folds"): its
    epilogue writes the operand into a new tensor, then its prologue walks the update's own
    shape, each element's value folded into the element its point's indices name (the store view
    moves along the window and batching dims; the indices give the rest, as an int32 register),
    in update order, so duplicate indices add up (or, for `set`, the last one stays) as in XLA's
    serial scatter. A point whose window does not fit is dropped (FILL_OR_DROP,
    PROMISE_IN_BOUNDS) or clamped into the operand (CLIP), as _scatter does. O(operand +
    updates) work where the unrolled selects were O(operand x points)."""
    where = f"at {b.source}"
    name = prim.replace("_", "-")
    kind = _SCATTER_FOLDS.get(name, {}).get(_kind(out_dtype))
    if kind is None:
        raise UnsupportedError(f"ark.persistent: {prim} on {out_dtype} {where}")
    space, rank = tuple(updates.shape), len(out_shape)
    window_dims, window, point_dims = _scatter_windows(dn, rank, space)
    strides = _row_major(tuple(out_shape))
    store = [0] * len(space)  # the store view: the element a value goes to before its offset
    for j, d in enumerate(window_dims):
        store[dn.update_window_dims[j]] = strides[d]
    for d, i in zip(dn.operand_batching_dims, dn.scatter_indices_batching_dims, strict=True):
        store[point_dims[i]] = strides[d]  # a point writes its own batch row
    # Each point's offset (or DROP_STORE) is computed once per point, over the point dims, and
    # read by every value of its window through a broadcast view: evaluated per value, the index
    # arithmetic cost an embedding gradient's 128-wide rows 128 times over (perf, one core).
    points = tuple(space[d] for d in point_dims)
    idx = _as_load(b, indices)
    starts, keep = _point_starts(b, idx, dn, mode, out_shape, window, points, idx.strides[:-1])
    terms = []
    for d, (_, s) in starts.items():
        if "CLIP" in mode:
            s = _clamp(b, s, 0, out_shape[d] - window[d])
        terms.append(_iop(b, "imul", s, strides[d]))
    offset = _sum_offsets(b, terms) or _Imm(points, "int32", value=0)
    if keep is not None:
        drop = _Imm(points, "int32", value=DROP_STORE)
        offset = b.elementwise("select", [keep, drop, offset], points, "int32")
    if math.prod(points) < math.prod(space) and not isinstance(offset, (_Load, _Imm)):
        offset = b.materialize(offset)
    offset = b.broadcast(offset, space, tuple(point_dims))
    value = _convert(b, b.strip_pendings(updates), out_dtype)
    if name == "scatter-sub":  # old - u is old + (-u), exactly
        negate = "ineg" if out_dtype in INT_DTYPES else "neg"
        value = b.elementwise(negate, [value], space, out_dtype)
    first = _convert(b, b.strip_pendings(operand), out_dtype)
    if first.size > _FUSE_LIMIT:  # within MAX_PROGRAM_LEN
        first = b.materialize(first)
    prologue, store_at = _value_and_offset_program(b, value, offset)
    out = b.new_tensor(tuple(out_shape), out_dtype)
    b.ops.append(
        Op(
            name=f"{name}_fold{len(b.ops)}",
            kind="reduce",
            out=out,
            B=1,
            M=math.prod(out_shape),
            N=1,
            K=math.prod(space),
            acc_dtype=out_dtype,
            reduce_kind=kind,
            iter_dims=space,
            kept_rank=0,
            prologue=prologue,
            epilogue=b._compile(first),
            source=b.source,
            store_view=b.view_id(_Load(space, out_dtype, out, 0, tuple(store))),
            store_at=store_at,
        )
    )
    return b.load(out)


def _point_starts(
    b: _Builder, idx: _Load, dn, mode: str, out_shape, window, shape, strides
) -> tuple[dict[int, tuple[_Load, _Node]], _Node | None]:
    """A scatter's start along each operand dim its indices name, per point: read from the
    indices `idx` over the points' space `shape` (`strides`: its dims' strides in idx), as is
    and as int32; and, unless mode is CLIP, whether each point's whole window fits (None: no
    test), since a point that does not fit is dropped (FILL_OR_DROP, PROMISE_IN_BOUNDS)."""
    starts, keep = {}, None
    for c, d in enumerate(dn.scatter_dims_to_operand_dims):
        start = _Load(
            shape, idx.dtype, idx.tensor, idx.offset + c * idx.strides[-1], tuple(strides),
            idx.iter_stride, idx.outer_iter_stride,
        )  # fmt: skip
        s = _i32(b, start, shape)
        starts[d] = (start, s)
        if "CLIP" not in mode:
            keep = _and(b, keep, _iop(b, "ige", s, 0))
            keep = _and(b, keep, _iop(b, "ile", s, out_shape[d] - window[d]))
    return starts, keep


def _scatter_window_store(b: _Builder, target: _Load, indices, updates, dn, mode, out_shape):
    """A scatter of one point, or of the points along one index dim (_window_scatter), updating
    `target` in place (_in_place_target): one window-store task storing each point's window of
    the update, in point order; nothing for a point whose window does not fit (FILL_OR_DROP,
    PROMISE_IN_BOUNDS), clamped into the operand under CLIP, as _scatter's select does."""
    rank = len(out_shape)
    window_dims, window, point_dims = _scatter_windows(dn, rank, updates.shape)
    points = math.prod(indices.shape[:-1])
    lead = (points,) if points > 1 else ()
    if points == 1 and not point_dims:  # the update is the window: a reshape
        update = b.broadcast(b.strip_pendings(updates), tuple(window), tuple(window_dims))
    else:
        upd = _as_load(b, b.strip_pendings(updates))
        strides = [0] * rank
        for j, d in enumerate(window_dims):
            strides[d] = upd.strides[dn.update_window_dims[j]]
        # one point: its size-1 point dims are dropped; several: the one point dim leads
        lead_strides = (upd.strides[point_dims[0]],) if points > 1 else ()
        update = _Load(
            lead + tuple(window), upd.dtype, upd.tensor, upd.offset, lead_strides + tuple(strides),
            upd.iter_stride, upd.outer_iter_stride,
        )  # fmt: skip
    idx = _as_load(b, indices)
    point_stride = (idx.strides[0],) if points > 1 else ()
    at, keep = _point_starts(b, idx, dn, mode, out_shape, window, lead, point_stride)
    starts = [at[d][0] if d in at else _iconst(0) for d in range(rank)]
    return _window_store(b, target, update, starts, keep, points if points > 1 else 0)


_INDEXING = {
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "gather": _gather,
    "concatenate": _concatenate,
    "stack": _stack,
    "pad": _pad,
    "rev": _rev,
    **{
        name: functools.partial(_scatter_handler, name)
        for name in (
            "scatter",
            "scatter-add",
            "scatter_add",
            "scatter-sub",
            "scatter_sub",
            "scatter-mul",
            "scatter_mul",
            "scatter-min",
            "scatter_min",
            "scatter-max",
            "scatter_max",
        )
    },  # fmt: skip
}


_REDUCE_KINDS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_and", "reduce_or", "reduce_prod",
    "reduce_xor",
}  # fmt: skip


def _reduce_kind(prim: str, dtype: str) -> str:
    kind = _kind(dtype)
    if dtype in ("uint8", "uint16"):
        kind = "int"  # zero-extended: below 2^31, so signed 32-bit folds order them too
    table = {
        ("reduce_sum", "float"): "sum", ("reduce_max", "float"): "max",
        ("reduce_min", "float"): "min", ("reduce_max", "bool"): "max",
        ("reduce_min", "bool"): "min", ("reduce_and", "bool"): "min",
        ("reduce_or", "bool"): "max",
        ("reduce_sum", "int"): "isum", ("reduce_sum", "uint"): "isum",
        ("reduce_max", "int"): "imax", ("reduce_min", "int"): "imin",
        ("reduce_max", "uint"): "umax", ("reduce_min", "uint"): "umin",
        ("argmax", "float"): "argmax", ("argmin", "float"): "argmin",
        ("argmax", "int"): "iargmax", ("argmin", "int"): "iargmin",
        ("reduce_prod", "float"): "prod", ("reduce_prod", "int"): "iprod",
        ("reduce_prod", "uint"): "iprod",
        ("reduce_and", "int"): "iand", ("reduce_and", "uint"): "iand",
        ("reduce_or", "int"): "ior", ("reduce_or", "uint"): "ior",
        ("reduce_xor", "int"): "ixor", ("reduce_xor", "uint"): "ixor",
    }  # fmt: skip
    if (prim, kind) not in table:
        raise UnsupportedError(f"ark.persistent: {prim} over {dtype} values is not supported")
    return table[(prim, kind)]


def _reduce_identity(kind: str, out_dtype: str) -> float | int:
    ident = {
        "sum": 0.0, "max": -np.inf, "min": np.inf, "isum": 0, "imax": -(2**31),
        "imin": 2**31 - 1, "umax": 0, "umin": 2**32 - 1, "prod": 1.0, "iprod": 1,
        "iand": -1, "ior": 0, "ixor": 0,
    }[kind]  # fmt: skip
    if out_dtype == "bool":
        return 1.0 if kind == "min" else 0.0  # reduce_and of nothing is True, reduce_or False
    if out_dtype in NARROW_INT_DTYPES and kind in ("imax", "imin", "umax", "umin"):
        low, high = _int_range(out_dtype)  # a narrow register holds an in-range value
        return low if kind in ("imax", "umax") else high
    if kind == "iand" and _kind(out_dtype) == "uint":
        return _int_range(out_dtype)[1]  # all ones of the width
    return ident


_ELEMENTWISE_PRIMS = (
    set(_UNARY)
    | set(_BINARY)
    | set(_INT_TYPED)
    | {"erfc", "integer_pow", "convert_element_type", "select_n", "clamp"}
    | _COMPOSED
    | {"atan2", "lgamma", "digamma", "asin", "acos", "asinh", "acosh", "atanh", "nextafter"}
    | {"population_count", "clz", "mulhi"}
    | set(_TOTAL_ORDER_COMPARE)
    | _IDENTITY
)


def _translate(b: _Builder, jaxpr, consts: list, in_nodes: list[_Node]) -> list[_Node]:
    env: dict = {}
    counts = _use_counts(jaxpr)
    consumers = _consumers(jaxpr)
    defined_at = {o: i for i, e in enumerate(jaxpr.eqns) for o in e.outvars}

    def position(var) -> int:
        return defined_at.get(var, -1)

    def read(v) -> _Node:
        if _is_literal(v):
            return _const_node(b, v.val, v.aval.dtype)
        return env[v]

    def bind(v, node: _Node) -> None:
        # A value used more than once is computed once into memory rather than re-evaluated in
        # every consumer's program (and an accumulator cannot be the epilogue of two ops).
        if (
            counts.get(v, 0) > 1
            and isinstance(node, (_Ew, _Pending))
            and not _fuses_into_one(v, counts, consumers, position)
            # a function of the loop iteration (a counter) stays one: indices computed from it
            # are then known per iteration (_iteration_affine), and it costs a few instructions
            and _eval_iteration(node, np.zeros(1, np.int64)) is None
        ):
            node = b.materialize(node)
        env[v] = node

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        bind(v, _const_node(b, c))
    for v, n in zip(jaxpr.invars, in_nodes, strict=True):
        bind(v, n)

    outer = b.source
    for eqn in jaxpr.eqns:
        # Inside an inlined call (jnp.sort, jax.nn.*), jax may attribute no user frame to the
        # eqn: name the user's call site instead.
        b.source = _source(eqn) or outer
        if eqn.outvars and all(0 in getattr(v.aval, "shape", (1,)) for v in eqn.outvars):
            # Nothing to compute: every result is empty (an empty matrix's solve). A constant of
            # its shape stands for it, so no translation has to handle size 0.
            for v in eqn.outvars:
                bind(v, _Imm(tuple(v.aval.shape), _dtype_name(v.aval), value=0))
            continue
        outs = _translate_eqn(b, eqn, [read(v) for v in eqn.invars])
        for v, n in zip(eqn.outvars, outs, strict=True):
            if type(v).__name__ == "DropVar":
                continue
            bind(v, n)
    return [read(v) for v in jaxpr.outvars]


def _platform_branch(platforms, platform: str, where: str) -> int:
    """The branch lax.platform_dependent takes when lowered for the plan's platform."""
    name = "cuda" if platform == "gpu" else platform
    for i, names in enumerate(platforms):
        if names is not None and name in names:
            return i
    for i, names in enumerate(platforms):
        if names is None:
            return i
    raise UnsupportedError(f"ark.persistent: no platform_dependent branch for {name} at {where}")


def _linalg():
    """cholesky / triangular_solve / lu, planned from their algorithms in jax.numpy."""
    from jax_ark._persistent import _linalg as module

    return module


def _special():
    """Special functions: lgamma, inverse trigonometric, nextafter (a module of their own that
    builds on this one)."""
    from jax_ark._persistent import _special as module

    return module


def _conv():
    """The convolution / pooling translations (a module of their own that builds on this one)."""
    from jax_ark._persistent import _conv as module

    return module


def _translate_eqn(b: _Builder, eqn, args: list[_Node]) -> list[_Node]:
    prim = eqn.primitive.name
    b.eqn = eqn
    params = eqn.params
    for v in eqn.outvars:
        _check_dtype(v.aval, b.source)
    if not eqn.outvars:
        raise UnsupportedError(
            f"ark.persistent: {prim} at {b.source}: "
            + (
                "jax.debug.print / jax.debug.callback inside a loop body, a cond branch or a "
                "custom derivative rule: a kernel cannot print, so ark.persistent runs debug "
                "callbacks on the host after the call, only those at the top level of the "
                "function or of the jax.jit functions it calls (move it there, or return the "
                "value and print it outside)"
                if prim in HOST_DEBUG or _holds(eqn, HOST_DEBUG)
                else "an equation without results (a side effect) is not supported"
            )
        )
    out_aval = eqn.outvars[0].aval
    out_shape = tuple(out_aval.shape)
    out_dtype = _dtype_name(out_aval)

    if prim in _INT_TYPED or prim in _UNARY or prim in _BINARY or prim == "integer_pow":
        return [_typed_elementwise(b, prim, args, out_shape, out_dtype, params)]
    if prim in _COMPOSED and _kind(args[0].dtype) == "float":
        return [_composed(b, prim, args[0], out_dtype)]
    if prim in _special().UNARY | _special().BINARY and _kind(args[0].dtype) == "float":
        return [_special().translate_special(b, prim, args, out_shape, out_dtype)]
    if prim in _special().INTEGER and _kind(args[0].dtype) in ("int", "uint"):
        return [_special().translate_integer(b, prim, args, out_shape, out_dtype)]
    if prim == "atan2" and _kind(args[0].dtype) == "float":
        return [_atan2(b, args[0], args[1], out_shape, out_dtype)]
    if prim == "tile":
        return [_tile(b, args[0], tuple(int(r) for r in params["reps"]), out_shape)]
    if prim in _TOTAL_ORDER_COMPARE:  # jnp.searchsorted's comparisons
        keys = [
            _convert(b, a, "int32") if a.dtype == "bool" else _total_order_key(b, a) for a in args
        ]
        return [b.elementwise(_TOTAL_ORDER_COMPARE[prim], keys, out_shape, "bool")]
    if prim in ("floor", "ceil", "round") and _kind(args[0].dtype) == "float":
        method = int(params.get("rounding_method", 0))
        return [_round_to_integer(b, prim, args[0], method, out_dtype)]
    if prim == "is_finite":
        # |x| < inf: false for +-inf and for NaN (every comparison with NaN is), as XLA's.
        magnitude = b.elementwise("abs", args, args[0].shape, args[0].dtype)
        inf = _Imm((), args[0].dtype, value=float("inf"))
        return [b.elementwise("lt", [magnitude, inf], out_shape, out_dtype)]
    if prim == "bitcast_convert_type":
        return [_bitcast_convert(b, args[0], out_dtype)]
    if prim == "reduce":  # lax.reduce with a computation of its own (no reduce_sum & co.)
        closed = _prefix.tree_reduce_jaxpr(eqn)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    if prim == "reduce_precision":
        closed = _precision.jaxpr_of(eqn)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    if prim == "approx_top_k":  # approx_max_k / approx_min_k: the exact answer has recall 1
        if not params["aggregate_to_topk"]:
            raise UnsupportedError(
                f"ark.persistent: approx_max_k / approx_min_k with aggregate_to_topk=False at "
                f"{b.source} (its result is TPU-specific partial bins)"
            )
        closed = _radix.approx_top_k_jaxpr(args[0], params)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    if prim == "top_k":
        axis = int(params.get("axis", -1)) % len(args[0].shape)
        return _top_k(b, args[0], int(params["k"]), axis, out_shape)
    if prim == "erf_inv":
        return [_erf_inv(b, args[0], out_dtype)]
    if prim == "erfc":
        e = b.elementwise("erf", args, out_shape, out_dtype)
        one = _Imm(out_shape, out_dtype, value=1.0)
        return [b.elementwise("sub", [one, e], out_shape, out_dtype)]
    if prim == "convert_element_type":
        return [_convert(b, args[0], out_dtype)]
    if prim in _IDENTITY:
        if prim == "pvary":
            axes = frozenset(eqn.params.get("axes", ()))
            for v in eqn.outvars:
                b.uniform_over[v] = axes
        return list(args)
    if prim == "select_n":
        return [_select_n(b, args, out_shape, out_dtype)]
    if prim == "clamp":  # clamp(lo, x, hi) = min(max(x, lo), hi)
        lo, x, hi = args
        kind = _kind(x.dtype)
        mx, mn = {"int": ("imax", "imin"), "uint": ("umax", "umin")}.get(kind, ("max", "min"))
        t = b.elementwise(mx, [x, lo], out_shape, out_dtype)
        return [b.elementwise(mn, [t, hi], out_shape, out_dtype)]
    if prim == "iota":
        return [_iota(b, params, out_shape, out_dtype)]
    if prim in _INDEXING:
        return [_INDEXING[prim](b, args, params, out_shape, out_dtype)]
    if prim == "broadcast_in_dim":
        return [b.broadcast(args[0], out_shape, params["broadcast_dimensions"])]
    if prim in ("reshape", "squeeze", "expand_dims"):
        return [b.reshape(args[0], out_shape)]
    if prim == "transpose":
        swapped = _transposed_matmul(b, args[0], tuple(params["permutation"]))
        return [swapped or b.transpose(args[0], params["permutation"])]
    if prim == "slice":
        return [
            b.slice(args[0], params["start_indices"], params["limit_indices"], params["strides"])
        ]
    if prim == "split":  # jnp.split (a gated MLP's halves): consecutive slices along one axis
        return _split(b, args[0], int(params["axis"]), [int(n) for n in params["sizes"]])
    if prim == "dot_general":
        if all(_kind(a.dtype) != "float" for a in args):  # an integer (quantized) matmul
            return _integer_dot(b, params["dimension_numbers"], args, out_dtype)
        return [_dot_general(b, eqn, args, out_shape, out_dtype)]
    if prim == "reduce_xor" and args[0].dtype == "bool":  # parity: an int32 fold of the 0 / 1s
        bits = _convert(b, args[0], "int32")
        parity = _reduce(b, prim, bits, tuple(params["axes"]), out_shape, "int32")
        return [_convert(b, parity, "bool")]
    if prim in ("argmax", "argmin") and args[0].dtype == "bool":  # the first True / False
        bits = _convert(b, args[0], "int32")
        return [_reduce(b, prim, bits, tuple(params["axes"]), out_shape, out_dtype)]
    if prim in _REDUCE_KINDS or prim in ("argmax", "argmin"):
        return [_reduce(b, prim, args[0], tuple(params["axes"]), out_shape, out_dtype)]
    if prim in _CUMULATIVE:
        axis, reverse = int(params["axis"]), bool(params["reverse"])
        if _prefix.planned_here(args[0].shape, axis, MAX_RANK):  # O(L^2) planned directly
            closed = _prefix.jaxpr_of(eqn)
            return _translate(b, closed.jaxpr, list(closed.consts), args)
        return [_cumulative(b, prim, args[0], axis, reverse, out_dtype)]
    if prim == "conv_general_dilated":
        return [_conv().translate_conv(b, params, args, out_shape, out_dtype)]
    if prim in _conv().REDUCE_WINDOW:
        return [_conv().translate_reduce_window(b, prim, params, args, out_shape, out_dtype)]
    if prim == "sort":
        from jax_ark._persistent import _sort

        return _sort.translate_sort(b, params, args)
    if prim == "select_and_scatter_add":  # the gradient of max / min pooling
        return [_conv().translate_select_and_scatter_add(b, params, args, out_shape, out_dtype)]
    if prim == "scan":
        return _scan(b, eqn, args)
    if prim == "while":
        return _while(b, eqn, args)
    if prim == "cond":
        return _cond(b, eqn, args)
    if prim in COMM_PRIMITIVES:
        return translate_collective(b, eqn, args, UnsupportedError)
    if prim == "qr" and params["pivoting"]:
        raise UnsupportedError(f"ark.persistent: QR with column pivoting at {b.source}")
    if prim in ("eigh", "svd") and params.get("subset_by_index") is not None:
        whole = (0, min(args[0].shape[-2:]) if prim == "svd" else args[0].shape[-1])
        if tuple(params["subset_by_index"]) != whole:
            raise UnsupportedError(f"ark.persistent: {prim} of a subset by index at {b.source}")
    if prim in _linalg().PRIMITIVES:
        closed = _linalg().jaxpr_of(eqn)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    if prim == "custom_linear_solve":  # jnp.linalg.solve: forward, it is its `solve` function
        lengths = [int(n) for n in params["const_lengths"]]
        solve_at = sum(lengths[:2])  # the consts are matvec's, vecmat's, solve's, transpose's
        solve_consts = args[solve_at : solve_at + lengths[2]]
        closed = params["jaxprs"].solve
        return _translate(b, closed.jaxpr, list(closed.consts), solve_consts + args[sum(lengths) :])
    if prim == "empty2":  # an uninitialized scalar (cholesky's gradient): XLA lowers it as 0
        return [_Imm((), out_dtype, value=0)]
    if prim == "platform_index":  # lax.platform_dependent (jnp.linalg.det): the plan's platform
        return [
            _Imm((), "int32", value=_platform_branch(params["platforms"], b.platform, b.source))
        ]
    body = _call_body(eqn)
    if body is not None:
        return _translate(b, body[0], body[1], args)
    raise UnsupportedError(
        f"ark.persistent: primitive '{prim}' is not supported (at {b.source}"
        f"{_operand_names(b, args)}); supported: "
        "dot_general, elementwise arithmetic / exp / log / tanh / logistic / sqrt / rsqrt / erf / "
        "erf_inv / pow / rem, comparisons, integer arithmetic / bitwise ops / shifts / "
        "population_count / clz / mulhi, select_n, clamp, iota, "
        "reduce_sum / max / min / prod / and / or / xor, argmax / argmin, cumsum / cummax / "
        "cummin / cumprod / cumlogsumexp, top_k "
        "(k <= 32), conv_general_dilated, reduce_window_sum / max / min (pooling) and "
        "select_and_scatter_add (its gradient), sort by one key (axis <= 4096), cholesky / "
        "triangular_solve / lu (small matrices: their algorithms as loops), tile, exp2 / "
        "sinh / cosh / tan / cbrt / atan / atan2 / asin / acos / asinh / acosh / atanh / lgamma / "
        "digamma / nextafter (composed), eq_to / le_to / lt_to (searchsorted), "
        "bitcast_convert_type (32-bit, 16-bit), broadcast_in_dim, "
        "reshape, transpose, squeeze, expand_dims, slice, convert_element_type, gather, "
        "dynamic_slice, dynamic_update_slice, scatter / scatter-add / -sub / -mul / -min / -max, "
        "concatenate, stack, pad, rev, the "
        "collectives psum / pmax / pmin / pmean / all_gather / psum_scatter / all_to_all (jax.lax "
        "or jax_ark, inside jax.shard_map, also in loop bodies), and calls "
        f"({', '.join(sorted(_INLINE_CALLS))}), scan / fori_loop with a static trip count, "
        "cond / switch, while_loop (at top level, no loop inside); no shard_map"
    )


# ---- loops (plan v3): a scan body is planned once and its tasks re-run per iteration ------------
def _scan(b: _Builder, eqn, args: list[_Node]) -> list[_Node]:
    """jax.lax.scan (and fori_loop with a static trip count, which jax lowers to scan) as a plan
    loop. Per carry k the loop owns a tensor C_k that the body's last ops write each iteration;
    the body's first ops copy the carry in: X_k = (iteration == 0 ? init_k : C_k), so C_k of
    iteration i - 1 is read before iteration i overwrites it (a write-after-read dependency from
    the carry-in task to C_k's writers), and every tensor has exactly one writer op. xs are views
    whose offset moves by one slice per iteration (backwards for reverse=True); ys are written by
    stacked ops (slice T - 1 - i at iteration i when reversed). A scan inside a loop body is a
    nested loop (one level): views of the outer loop's xs move with the outer iteration there."""
    p = eqn.params
    source = b.source
    where = f"at {source}"
    if len(b.loop_stack) >= MAX_LOOP_DEPTH:
        raise UnsupportedError(
            f"ark.persistent: scan / fori_loop nested more than {MAX_LOOP_DEPTH} loops deep {where}"
        )
    reverse = bool(p.get("reverse"))
    T, nc, nk = int(p["length"]), int(p["num_consts"]), int(p["num_carry"])
    closed = p["jaxpr"]
    consts, init, xs = args[:nc], args[nc : nc + nk], args[nc + nk :]
    carry_avals = [v.aval for v in eqn.outvars[:nk]]
    ys_avals = [v.aval for v in eqn.outvars[nk:]]
    if T == 0:  # no iteration: the carries are the initial values, ys empty
        return list(init) + [
            _Imm(tuple(a.shape), _dtype_name(a), value=_zero(_dtype_name(a))) for a in ys_avals
        ]
    # Values from before the loop are computed before it (not re-run per iteration).
    consts = [c if isinstance(c, (_Load, _Imm)) else b.materialize(c) for c in consts]
    init = [b.strip_pendings(x) for x in init]
    xs = [x if isinstance(x, (_Load, _Imm)) else b.materialize(x) for x in xs]
    parent = b.loop_stack[-1] if b.loop_stack else -1
    if parent >= 0:
        # Inside the inner body, what moved with the outer loop's iteration moves per OUTER
        # iteration (outer_iter_stride); iter_stride is the inner loop's.
        consts, init, xs = ([_to_outer(x) for x in group] for group in (consts, init, xs))
    # State kept in place (a KV cache): carry k -> its tensor, ys q -> the tensor its xs slices
    # (which the body updates with window stores) belong to.
    # A value of the enclosing loop's iteration (a counter, below) must not reach the body
    # unevaluated: LOAD_ITER there would be this loop's iteration.
    init = [b.materialize(x) if _reads_iteration(x) else x for x in init]
    in_place, top_level = _in_place_state(b, eqn, init, xs)
    counters = _counters(closed.jaxpr, nc, init)
    xs = [b.load(in_place[q]) if q in in_place else x for q, x in _xs_to_ys(eqn, xs)]
    carry_tensors = [
        in_place[k]
        if k in in_place
        else b.new_tensor(tuple(a.shape), _dtype_name(a), name=f"carry{k}")
        for k, a in enumerate(carry_avals)
    ]
    # The loop's record is reserved now, so an outer loop precedes the loops nested in it.
    loop_id, first_op = len(b.loops), len(b.ops)
    b.loops.append(Loop(T, first_op, first_op, source=source, parent=parent))
    b.loop_stack.append(loop_id)
    try:
        iteration = _Ew((), "int32", op="load_iter")
        first = _Ew((), "bool", op="ieq", args=(iteration, _iconst(0)), _size=3)
        carries = []
        for k, x in enumerate(init):
            if k in counters:  # start + iteration: no carry tensor, no op per iteration
                carries.append(_iop(b, "iadd", iteration, counters[k]))
                continue
            prev = b.load(carry_tensors[k])
            if math.prod(x.shape) == 0 or k in in_place:  # in place: the body reads the state
                carries.append(prev)
                continue
            x = b.elementwise("select", [first, prev, x], x.shape, x.dtype)
            carries.append(b.materialize(x))
        slices: list[_Node] = []
        for x in xs:
            if isinstance(x, _Imm):
                slices.append(_Imm(x.shape[1:], x.dtype, value=x.value))
            else:
                # slice i is x[i] (x[T - 1 - i] reversed): the view walks the leading dim
                step = -x.strides[0] if reverse else x.strides[0]
                start = x.offset + (T - 1) * x.strides[0] if reverse else x.offset
                slices.append(
                    _Load(
                        x.shape[1:], x.dtype, x.tensor, start, x.strides[1:], step,
                        x.outer_iter_stride,
                    )
                )  # fmt: skip
        outs = _translate(b, closed.jaxpr, list(closed.consts), consts + carries + slices)
        for k, node in enumerate(outs[:nk]):
            if k in counters:
                continue
            if k in in_place:  # its window store wrote the state itself
                if not (isinstance(node, _Load) and node.tensor == in_place[k]):
                    raise AssertionError("internal error: in-place carry not updated in place")
                continue
            if isinstance(node, (_Load, _Imm)):  # a value passed through: copied into place
                move = "imov" if node.dtype in INT_DTYPES else "copy"
                node = _Ew(node.shape, node.dtype, op=move, args=(node,), _size=2)
            if node.dtype != b.tensors[carry_tensors[k]].dtype:
                node = _convert(b, node, b.tensors[carry_tensors[k]].dtype)
            b.materialize(node, into=carry_tensors[k])
        ys = []
        for q, (node, aval) in enumerate(zip(outs[nk:], ys_avals, strict=True), start=nk):
            if q in in_place:  # every slice was updated in place by the body's window stores
                if not (isinstance(node, _Load) and node.tensor == in_place[q]):
                    raise AssertionError("internal error: in-place ys not updated in place")
                ys.append(b.load(in_place[q]))
                continue
            if isinstance(node, (_Load, _Imm)):  # a value passed through: copied into place
                move = "imov" if node.dtype in INT_DTYPES else "copy"
                node = _Ew(node.shape, node.dtype, op=move, args=(node,), _size=2)
            emitted = len(b.ops)
            ys.append(b.materialize(node, stacked=T))
            if reverse and len(b.ops) > emitted:
                b.ops[-1].stack_reversed = True  # the stacked op is the last one emitted
            if tuple(ys[-1].shape) != tuple(aval.shape):
                raise AssertionError("internal error: stacked output shape")
    finally:
        b.loop_stack.pop()
    if top_level:  # the registrations of this loop's state (a shared body is not reused wrongly)
        b.loop_in_place.clear()
        b.scan_in_place.clear()
    end_op = len(b.ops)
    for op in b.ops[first_op:end_op]:
        if op.loop < 0:  # ops of a nested loop keep their (innermost) loop
            op.loop = loop_id
    if end_op == first_op:  # nothing runs per iteration (only empty carries)
        assert loop_id == len(b.loops) - 1, "an op-less loop holds no other loop"
        b.loops.pop()
    else:
        b.loops[loop_id].end_op = end_op
    finals = [
        _iconst(counters[k] + T) if k in counters else b.load(t)
        for k, t in enumerate(carry_tensors)
    ]
    return finals + ys


def _counters(body, nc: int, init: list[_Node]) -> dict[int, int]:
    """Carries that count iterations (fori_loop's index, a layer counter `l + 1`): an int32
    scalar starting at a constant c whose new value is the old one + 1. Its value at iteration i
    is c + i (LOAD_ITER), so it needs no carry tensor, and an index computed from it is a known
    function of the iteration (a dynamic_slice at it becomes a moving view). carry k -> c."""
    found = {}
    for k, x in enumerate(init):
        var_in, var_out = body.invars[nc + k], body.outvars[k]
        if not (
            isinstance(x, _Imm)
            and x.dtype == "int32"
            and x.shape == ()
            and not _is_literal(var_out)
            and var_in not in body.outvars
        ):
            continue
        (producer,) = [e for e in body.eqns if var_out in e.outvars] or [None]
        if producer is None or producer.primitive.name != "add":
            continue
        a, c = producer.invars
        one = [v for v in (a, c) if _is_literal(v) and int(v.val) == 1]
        if one and {id(a), id(c)} == {id(var_in), id(one[0])}:
            found[k] = int(x.value)
    return found


def _reads_iteration(node: _Node) -> bool:
    if isinstance(node, _Ew):
        return node.op == "load_iter" or any(_reads_iteration(a) for a in node.args)
    return False


_ITER_OPS = {
    "iadd": lambda a, b: a + b,
    "isub": lambda a, b: a - b,
    "imul": lambda a, b: a * b,
    "imin": np.minimum,
    "imax": np.maximum,
    "ilt": lambda a, b: (a < b).astype(np.int64),
    "ile": lambda a, b: (a <= b).astype(np.int64),
    "igt": lambda a, b: (a > b).astype(np.int64),
    "ige": lambda a, b: (a >= b).astype(np.int64),
    "ieq": lambda a, b: (a == b).astype(np.int64),
    "ine": lambda a, b: (a != b).astype(np.int64),
    "imov": lambda a: a,
}


def _eval_iteration(node: _Node, i: np.ndarray) -> np.ndarray | None:
    """node's value at each iteration i when it is computed from LOAD_ITER and integer constants
    only (then it is the same for every element); None otherwise."""
    if isinstance(node, _Imm):
        if node.dtype not in ("int32", "bool") or isinstance(node.value, float):
            return None
        return np.full(i.shape, int(node.value), np.int64)
    if not isinstance(node, _Ew) or node.dtype not in ("int32", "bool") or node.size > 64:
        return None  # (an index computation is short; a long int program is something else)
    if node.op == "load_iter":
        return i
    if node.op == "select":
        args = [_eval_iteration(a, i) for a in node.args]
        if any(a is None for a in args):
            return None
        return np.where(args[0] != 0, args[2], args[1])
    fn = _ITER_OPS.get(node.op)
    if fn is None:
        return None
    args = [_eval_iteration(a, i) for a in node.args]
    if any(a is None for a in args):
        return None
    out = fn(*args)
    return (out + 2**31) % 2**32 - 2**31  # int32 wrap-around, as the kernel computes


def _iteration_affine(b: _Builder, node: _Node) -> tuple[int, int] | None:
    """(s0, step) when the int32 value node equals s0 + step * LOAD_ITER at every iteration of
    the innermost loop (checked by evaluating it at all of them); None otherwise."""
    trips = b.loops[b.loop_stack[-1]].trip_count if b.loop_stack else 1
    i = np.arange(trips, dtype=np.int64)
    v = _eval_iteration(node, i)
    if v is None:
        return None
    s0 = int(v[0])
    step = int(v[1] - v[0]) if trips > 1 else 0
    if not np.array_equal(v, s0 + step * i):
        return None
    return s0, step


def _uses(body, var) -> list:
    return [e for e in body.eqns if any(v is var for v in e.invars if not _is_literal(v))]


def _state_flow(body, var) -> tuple[Any, list] | None:
    """How loop state `var` (a body input: a carry, or an xs slice) reaches a body output when
    every step can update it in place: each value before the last has ONE reader, either a
    dynamic_update_slice or window scatter of it (_is_window_update: the next value is the
    update's result) or a nested scan taking it as a carry (returned as that carry) or as xs
    (re-stacked as ys) whose body does the same recursively; the last value is returned once
    and may have any other readers (it stays in the tensor until the next iteration's update).
    Returns (end var, steps), steps being (update eqn, None, None) or (scan eqn, the carry / ys
    index q the state comes out as, the scan body's steps); None if an old value is read besides
    its update (it must then survive the update: no in-place update)."""
    steps: list = []
    cur = var
    while True:
        uses = _uses(body, cur)
        returned = sum(v is cur for v in body.outvars)
        if returned or len(uses) != 1:
            # the last value: read by anything (it is in the tensor until the next iteration's
            # update) and returned; no further update (its readers would need the old value)
            return (cur, steps) if returned == 1 else None
        (e,) = uses
        at = [i for i, v in enumerate(e.invars) if v is cur]
        if len(at) != 1:
            return None
        if _is_window_update(e) and at[0] == 0:
            steps.append((e, None, None))
            cur = e.outvars[0]
            continue
        if e.primitive.name != "scan":
            return None
        inner = _scan_state_step(e, at[0])
        if inner is None:
            return None
        steps.append((e, *inner))
        cur = e.outvars[inner[0]]


def _scan_state_step(eqn, i: int) -> tuple[int, list] | None:
    """The scan eqn's operand i (a carry or an xs) as in-place state: (the output index q it comes
    out as: the same carry, or a ys; the body's steps), or None (see _state_flow)."""
    p = eqn.params
    nc, nk = int(p["num_consts"]), int(p["num_carry"])
    if i < nc:  # a const is read by every iteration
        return None
    body = p["jaxpr"].jaxpr
    flow = _state_flow(body, body.invars[i])
    if flow is None:
        return None
    end, steps = flow
    (q,) = [q for q, v in enumerate(body.outvars) if v is end]
    if (i < nc + nk and q != i - nc) or (i >= nc + nk and q < nk):
        return None
    return q, steps


def _xs_to_ys(eqn, xs: list) -> list[tuple[int, Any]]:
    """(the ys index xs j is re-stacked as when it is in-place state, else -1; xs j)."""
    p = eqn.params
    nc, nk = int(p["num_consts"]), int(p["num_carry"])
    out = []
    for j, x in enumerate(xs):
        step = _scan_state_step(eqn, nc + nk + j)
        out.append((step[0] if step is not None else -1, x))
    return out


def _register_state(b: _Builder, steps: list, tensor: int) -> None:
    for e, q, inner in steps:
        if q is None:
            b.loop_in_place[id(e)] = tensor
        else:
            b.scan_in_place.setdefault(id(e), {})[q] = tensor
            _register_state(b, inner, tensor)


def _in_place_state(
    b: _Builder, eqn, init: list[_Node], xs: list[_Node]
) -> tuple[dict[int, int], bool]:
    """The state of a scan / fori_loop kept in place (a decode loop's KV cache), as {carry index
    k or ys index q: its tensor}, and whether this is the top-level loop that registered it.

    At top level: a carry, or an xs re-stacked as a ys (stacked caches through a layer scan),
    whose initial value is a user input nothing else reads, whose final value the function
    returns, and which the body only updates in place (_state_flow: dynamic_update_slice, or a
    nested scan doing so to its carry or to its xs slice). It lives in ONE tensor, the result
    aliased to that input (with donation no copy at all); each update is one window-store task
    writing only the update (into the iteration's slice of the stacked tensor for xs): no
    carry-in copy, no whole-cache write per iteration. Nested scans on the way were registered
    by the top-level loop (scan_in_place) and get the same tensor."""
    p = eqn.params
    nc, nk = int(p["num_consts"]), int(p["num_carry"])
    if b.loop_stack:
        found = dict(b.scan_in_place.get(id(eqn), {}))
        for q, tensor in list(found.items()):
            # the operand must really be (all of) the state tensor (a body jaxpr shared by two
            # scans could have been registered through the other one)
            x = init[q] if q < nk else dict((y, x) for y, x in _xs_to_ys(eqn, xs)).get(q)
            if not (
                isinstance(x, _Load)
                and x.tensor == tensor
                and _is_identity(x, b.tensors[tensor].shape)
                and not x.iter_stride
                and not x.outer_iter_stride
            ):
                del found[q]
        return found, False
    found: dict[int, int] = {}
    operands = [(nc + k, x) for k, x in enumerate(init)]
    operands += [(nc + nk + j, x) for j, x in enumerate(xs)]
    for i, x in operands:
        var_in = eqn.invars[i]
        step = _scan_state_step(eqn, i)
        if step is None:
            continue
        q, steps = step
        var_out = eqn.outvars[q]
        fill = _fill_state(b, x, var_in, var_out)
        if fill is not None:
            _register_state(b, steps, fill)
            found[q] = fill
            continue
        if (
            _is_literal(var_in)
            or not isinstance(x, _Load)
            or x.tensor not in b.args[: b.num_inputs]
            or not _is_identity(x, b.tensors[x.tensor].shape)
            or b.tensors[x.tensor].shape != tuple(var_in.aval.shape)
            or b.top_counts.get(var_in) != 1
            or var_out not in b.top_outputs
            or b.tensors[x.tensor].index in b.aliased
            or math.prod(x.shape) == 0
        ):
            continue
        src = b.tensors[x.tensor]
        b.aliased.add(src.index)
        out = b.new_tensor(src.shape, src.dtype, "result", b.top_outputs.pop(var_out))
        b.tensors[out].alias = src.index
        _register_state(b, steps, out)
        found[q] = out
    return found, True


# A constant-filled loop state is kept in place up to this size: the fill is a plan constant
# (part of the compiled program) copied into the result before each call.
_MAX_FILL_BYTES = 16 << 20


def _fill_state(b: _Builder, x: _Node, var_in, var_out) -> int | None:
    """A top-level loop state whose initial value is a constant fill (`jnp.zeros`, the output
    buffer of a ring matmul written with dynamic_update_slice per iteration) that nothing else
    reads, returned by the function: its result tensor, aliased to a new plan constant holding
    the fill, so that the loop updates it in place (one window store per iteration) like a
    donated cache instead of selecting over all of it per iteration. None when that does not
    apply."""
    if (
        not isinstance(x, _Imm)
        or _is_literal(var_in)
        or tuple(x.shape) != tuple(var_in.aval.shape)
        or b.top_counts.get(var_in) != 1
        or var_out not in b.top_outputs
        or math.prod(x.shape) == 0
        or math.prod(x.shape) * np.dtype(np_dtype(x.dtype)).itemsize > _MAX_FILL_BYTES
    ):
        return None
    const = b.new_tensor(x.shape, x.dtype, "arg", 0, name=f"const{len(b.constants)}")
    b.constants[const] = np.full(x.shape, x.value, np_dtype(x.dtype))
    out = b.new_tensor(x.shape, x.dtype, "result", b.top_outputs.pop(var_out))
    b.fill_alias[out] = const
    return out


def while_any(cond_fun, body_fun, init) -> list:
    """A while loop whose predicate holds per batch element (a vmapped while_loop: jax binds
    `while` with a batched predicate) as a plain jax.lax.while_loop, the way XLA lowers it: it
    runs while any element's predicate holds, and an element whose predicate is false keeps its
    carry (the predicate's dims lead every carry's). Used by the tracer and by the random
    rewrite (_random), which rebuilds loops through jax.lax."""
    jnp = jax.numpy

    def body(carry):
        new, keep = body_fun(carry), cond_fun(carry)
        return [
            jnp.where(jnp.reshape(keep, keep.shape + (1,) * (jnp.ndim(n) - keep.ndim)), n, c)
            for n, c in zip(new, carry, strict=True)
        ]

    return jax.lax.while_loop(lambda carry: jnp.any(cond_fun(carry)), body, list(init))


def _while(b: _Builder, eqn, args: list[_Node]) -> list[_Node]:
    """jax.lax.while_loop (and fori_loop with traced bounds) as a plan *while loop*: per iteration
    the head (carry-in X = (i == 0 ? init : C), then cond(X) into slot i of a stacked bool
    predicate tensor) runs, and every worker reads slot i to decide whether to run the body (the
    ops after the predicate, writing C) or leave the loop. The result is X of the iteration whose
    predicate was false. At most max_while_iterations body iterations: one more fails the call."""
    p = eqn.params
    if p["cond_jaxpr"].out_avals[0].shape:  # a vmapped while_loop: planned as XLA lowers it

        def unbatched(*invals):
            ncc, nbc = int(p["cond_nconsts"]), int(p["body_nconsts"])
            cond_consts, body_consts = invals[:ncc], invals[ncc : ncc + nbc]
            return while_any(
                lambda carry: jaxpr_as_fun(p["cond_jaxpr"])(*cond_consts, *carry)[0],
                lambda carry: jaxpr_as_fun(p["body_jaxpr"])(*body_consts, *carry),
                invals[ncc + nbc :],
            )

        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
        closed = jax.make_jaxpr(unbatched)(*avals)
        return _translate(b, closed.jaxpr, list(closed.consts), args)
    source = b.source
    where = f"at {source}"
    if b.loop_stack:
        raise UnsupportedError(
            f"ark.persistent: while_loop inside a loop body {where} (a while loop must be at top "
            "level; a scan / fori_loop with a static trip count may be nested)"
        )
    guard = b.max_while_iterations
    T = guard + 1  # head runs: the body's guard iterations and the final (false) check
    if T > MAX_TRIP_COUNT:
        raise UnsupportedError(
            f"ark.persistent: max_while_iterations {guard} > {MAX_TRIP_COUNT - 1} {where}"
        )
    ncc, nbc = int(p["cond_nconsts"]), int(p["body_nconsts"])
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    cond_consts, body_consts, init = args[:ncc], args[ncc : ncc + nbc], args[ncc + nbc :]
    avals = [v.aval for v in eqn.outvars]
    cond_consts = [c if isinstance(c, (_Load, _Imm)) else b.materialize(c) for c in cond_consts]
    body_consts = [c if isinstance(c, (_Load, _Imm)) else b.materialize(c) for c in body_consts]
    init = [b.strip_pendings(x) for x in init]
    carry_tensors = [
        b.new_tensor(tuple(a.shape), _dtype_name(a), name=f"carry{k}") for k, a in enumerate(avals)
    ]
    loop_id, first_op = len(b.loops), len(b.ops)
    b.loops.append(Loop(T, first_op, first_op, source=source))
    b.loop_stack.append(loop_id)
    try:
        iteration = _Ew((), "int32", op="load_iter")
        first = _Ew((), "bool", op="ieq", args=(iteration, _iconst(0)), _size=3)
        carries = []
        for k, x in enumerate(init):
            prev = b.load(carry_tensors[k])
            if math.prod(x.shape) == 0:
                carries.append(prev)
                continue
            x = b.elementwise("select", [first, prev, x], x.shape, x.dtype)
            carries.append(b.materialize(x))
        (pred,) = _translate(b, cond.jaxpr, list(cond.consts), cond_consts + carries)
        if pred.dtype != "bool":
            pred = _convert(b, pred, "bool")
        if b.branch_taken is not None:  # in an untaken cond branch: no iteration
            pred = b.elementwise("mul", [pred, b.branch_taken], (), "bool")
        if isinstance(pred, (_Load, _Imm)):
            pred = _Ew((), "bool", op="copy", args=(pred,), _size=2)
        b.materialize(pred, stacked=T)  # slot i: does iteration i run the body
        pred_op = len(b.ops) - 1
        outs = _translate(b, body.jaxpr, list(body.consts), body_consts + carries)
        for k, node in enumerate(outs):
            if math.prod(node.shape) == 0:
                continue
            if isinstance(node, (_Load, _Imm)):
                move = "imov" if node.dtype in INT_DTYPES else "copy"
                node = _Ew(node.shape, node.dtype, op=move, args=(node,), _size=2)
            if node.dtype != b.tensors[carry_tensors[k]].dtype:
                node = _convert(b, node, b.tensors[carry_tensors[k]].dtype)
            b.materialize(node, into=carry_tensors[k])
    finally:
        b.loop_stack.pop()
    end_op = len(b.ops)
    for op in b.ops[first_op:end_op]:
        if op.store_view >= 0 and not op.scatter_fold:
            raise UnsupportedError(f"ark.persistent: an in-place update inside a loop {where}")
        if op.loop >= 0:
            raise UnsupportedError(f"ark.persistent: a loop inside a while_loop body {where}")
        op.loop = loop_id
    _check_uniform_predicate(b, cond, b.ops[first_op:end_op], where)
    b.loops[loop_id].end_op = end_op
    b.loops[loop_id].pred_op = pred_op
    return carries


def _check_uniform_predicate(b: _Builder, cond, loop_ops: list[Op], where: str) -> None:
    """A while loop whose body communicates must leave the loop at the same iteration on every
    rank of the group: a rank that leaves early leaves its peers waiting for its puts (a timeout),
    and their puts of that iteration land in its workspace after its call returned. shard_map's
    check_vma typing says whether the predicate can differ between ranks: it varies over an axis
    when it is computed from a value that varies over it and no collective made it uniform (a
    psum / pmax of it does). Without check_vma the types say nothing, and the executors' bounded
    waits are the only guard."""
    if b.comm is None or not any(op.kind == "put" for op in loop_ops):
        return
    varying = varying_axes(cond.jaxpr.outvars[0].aval) & set(b.comm.axes)
    if varying:
        raise UnsupportedError(
            f"ark.persistent: the predicate of a while_loop {where} varies over mesh axes "
            f"{tuple(sorted(varying, key=str))} while its body communicates over "
            f"{b.comm.axes}: ranks would leave the loop at different iterations and wait "
            "forever for each other's puts. Make the predicate the same on every rank (compute "
            "it from a psum / pmax of the rank-local value), or use a fori_loop / scan with a "
            "static trip count"
        )


def _to_outer(node: _Node) -> _Node:
    """node with every view's iteration stride moved to the outer loop (entering a nested loop's
    body: the enclosing loop's xs slices move per outer iteration there)."""
    if isinstance(node, _Load) and node.iter_stride:
        if node.outer_iter_stride:
            raise AssertionError("internal error: a view moving with three loops")
        return dataclasses.replace(node, iter_stride=0, outer_iter_stride=node.iter_stride)
    if isinstance(node, _Ew) and node.args:
        return dataclasses.replace(node, args=tuple(_to_outer(a) for a in node.args))
    return node


def _holds(eqn, names) -> bool:
    """Whether an equation of a primitive in `names` is in eqn's sub-jaxprs (at any depth)."""
    for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns") and any(
                e.primitive.name in names or _holds(e, names) for e in inner.eqns
            ):
                return True
    return False


def _holds_while(jaxpr) -> bool:
    """Whether a while_loop is among jaxpr's equations or those of its sub-jaxprs."""
    return any(e.primitive.name == "while" or _holds(e, ("while",)) for e in jaxpr.eqns)


def _cond(b: _Builder, eqn, args: list[_Node]) -> list[_Node]:
    """cond / switch on a device predicate: every branch is planned, and the index (an int32
    device value, clamped into range as XLA clamps it) selects each output element. jax functions
    are pure, so this is exact (an untaken branch's inf / NaN never reaches the result); it costs
    every branch's work: the untaken branch's tasks are not skipped. Except while loops: one in a
    branch runs only while its branch is taken (b.branch_taken), else its carries, values the
    branch never sees, could loop until the guard fails the call."""
    branches = eqn.params["branches"]
    if len(branches) == 1:
        return _translate(b, branches[0].jaxpr, list(branches[0].consts), list(args[1:]))
    index = _clamp(b, _i32(b, args[0], ()), 0, len(branches) - 1)
    outs = []
    outer_taken = b.branch_taken
    for i, br in enumerate(branches):
        if _holds_while(br.jaxpr):
            taken = b.elementwise("ieq", [index, _iconst(i)], (), "bool")
            if outer_taken is not None:
                taken = b.elementwise("mul", [taken, outer_taken], (), "bool")
            b.branch_taken = b.materialize(taken)
        try:
            outs.append(_translate(b, br.jaxpr, list(br.consts), list(args[1:])))
        finally:
            b.branch_taken = outer_taken
    results = []
    for k, var in enumerate(eqn.outvars):
        shape, dtype = tuple(var.aval.shape), _dtype_name(var.aval)
        out = outs[0][k]
        for i, branch in enumerate(outs[1:], start=1):
            take = b.elementwise("ige", [index, _iconst(i)], shape, "bool")
            out = b.elementwise("select", [take, out, branch[k]], shape, dtype)
        results.append(out)
    return results


def _operand_names(b: _Builder, args: list[_Node]) -> str:
    """'; it reads argument x, cache['k']' for operands that are (views of) user arguments."""
    names: list[str] = []
    for a in args:
        if isinstance(a, _Load) and a.tensor in b.args[: b.num_inputs]:
            if b.tensors[a.tensor].name not in names:
                names.append(b.tensors[a.tensor].name)
    return f"; it reads argument {', '.join(names)}" if names else ""


def _operand_view(b: _Builder, node: _Node, groups: list[list[int]]) -> _Load:
    """A rank-3 view of node whose dims are the merged `groups` of node's dims."""
    if isinstance(node, _Load):
        merged = [_merge(node.shape, node.strides, g) for g in groups]
        if all(m is not None for m in merged):
            return _Load(
                tuple(m[0] for m in merged),
                node.dtype,
                node.tensor,
                node.offset,
                tuple(m[1] for m in merged),
                node.iter_stride,
                node.outer_iter_stride,
            )
    perm = [d for g in groups for d in g]
    if perm != sorted(perm) or not isinstance(node, _Load):
        node = b.transpose(node, perm)
    node = b.materialize(node)
    sizes, at = [], 0
    for g in groups:
        sizes.append(math.prod(node.shape[at : at + len(g)]))
        at += len(g)
    return _Load(tuple(sizes), node.dtype, node.tensor, 0, _row_major(tuple(sizes)))


def _integer_dot(b: _Builder, dimension_numbers, args, out_dtype: str) -> list[_Node]:
    """dot_general of integer operands: float32 matmuls of exact chunks (_linalg.integer_dot),
    for operands whose products float32 holds exactly (8-bit ones, bool)."""
    if _linalg().integer_dot_chunk(*(a.dtype for a in args)) < 1:
        raise UnsupportedError(
            f"ark.persistent: dot_general of {args[0].dtype} x {args[1].dtype} at {b.source}: "
            "integer matmuls are planned exactly for operands whose products float32 holds "
            "(int8 / uint8 / bool, or 8-bit x int16), not wider ones"
        )
    closed = _linalg().integer_dot_jaxpr(args, dimension_numbers, out_dtype)
    return _translate(b, closed.jaxpr, list(closed.consts), args)


def _dot_general(b: _Builder, eqn, args, out_shape, out_dtype) -> _Node:
    return matmul(b, args, eqn.params["dimension_numbers"], out_shape, out_dtype, "dot_general")


def matmul(b: _Builder, args, dimension_numbers, out_shape, out_dtype, what: str) -> _Node:
    """A MATMUL core for lax.dot_general's `dimension_numbers` (also a convolution's matmul,
    `what` naming the primitive in errors)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if _kind(args[0].dtype) != "float" or _kind(args[1].dtype) != "float":
        raise UnsupportedError(
            f"ark.persistent: {what} of {args[0].dtype} x {args[1].dtype} (only float "
            f"operands) at {b.source}"
        )
    K = math.prod(args[0].shape[d] for d in lc)
    if math.prod(out_shape) == 0 or K == 0:
        # Empty result, or an empty contraction: every element is the empty sum, 0.
        return _Imm(out_shape, out_dtype, value=0.0)
    # Operands live in memory; an operand still being computed (an elementwise chain, maybe over an
    # accumulator) is emitted now, fused into its producer's epilogue where possible.
    lhs, rhs = (a if isinstance(a, _Load) else b.materialize(a) for a in args)
    lfree = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
    a = _operand_view(b, lhs, [list(lb), lfree, list(lc)])
    bv = _operand_view(b, rhs, [list(rb), list(rc), rfree])
    B, M, K = a.shape
    _, K2, N = bv.shape
    assert K == K2, (K, K2)
    core = _Core("matmul", out_dtype, B, M, N, K, a=a, b=bv, source=b.source, name=what)
    core.out_shape = out_shape
    return _Pending(out_shape, out_dtype, core=core)


def _transposed_matmul(b: _Builder, node: _Node, perm: tuple[int, ...]) -> _Node | None:
    """The transpose of a 2-D matmul that nothing else reads, as the matmul of the swapped,
    transposed operands (out[n, m] = sum_k B[k, n] * A[m, k]: the same products, k ascending, so
    the same bits), which writes the transposed layout itself. Autodiff's weight gradients
    (`x.T @ dy` then a transpose) otherwise cost a strided copy of the whole gradient. None when
    the pattern does not apply."""
    eqn = b.eqn
    if (
        perm != (1, 0)
        or not isinstance(node, _Pending)
        or node.core is None
        or node.core.kind != "matmul"
        or node.core.emitted
        or node.core.B != 1
        or eqn is None
        or b.top_counts.get(eqn.invars[0]) != 1
    ):
        return None
    core = node.core
    a, bv = core.a, core.b
    swapped = _Core(
        "matmul",
        core.acc_dtype,
        1,
        core.N,
        core.M,
        core.K,
        a=_Load(
            (1, core.N, core.K),
            bv.dtype,
            bv.tensor,
            bv.offset,
            (bv.strides[0], bv.strides[2], bv.strides[1]),
            bv.iter_stride,
            bv.outer_iter_stride,
        ),
        b=_Load(
            (1, core.K, core.M),
            a.dtype,
            a.tensor,
            a.offset,
            (a.strides[0], a.strides[2], a.strides[1]),
            a.iter_stride,
            a.outer_iter_stride,
        ),
        source=core.source,
        name=core.name,
    )
    swapped.out_shape = (node.shape[1], node.shape[0])
    return _Pending(swapped.out_shape, node.dtype, core=swapped)


def _min_as_negated_max(b: _Builder, kind: str, node: _Node) -> tuple[str, _Node, bool]:
    """(kind, operand, negate) of a fold: a float min stays -max(-x) (the plan v1 kind, the
    result negated back); integer / bool kinds fold directly."""
    if kind != "min" or node.dtype == "bool":
        return kind, node, False
    return "max", b.elementwise("neg", [node], node.shape, node.dtype), True


def _reduce(b: _Builder, prim, node, axes, out_shape, out_dtype) -> _Node:
    kind = _reduce_kind(prim, node.dtype)
    K = math.prod(node.shape[d] for d in axes)
    if K == 0:
        # An empty reduced axis: every output is the fold's identity (jax.jit does the same).
        if kind in ARG_REDUCES:
            raise UnsupportedError(f"ark.persistent: {prim} over an empty axis at {b.source}")
        return _Imm(out_shape, out_dtype, value=_reduce_identity(kind, out_dtype))
    if math.prod(out_shape) == 0:
        return _Imm(out_shape, out_dtype, value=_zero(out_dtype))
    node = b.strip_pendings(node)
    kept = [d for d in range(len(node.shape)) if d not in axes]
    node = b.transpose(node, kept + list(axes))
    kind, node, negate = _min_as_negated_max(b, kind, node)
    M = math.prod(node.shape[: len(kept)])
    core = _Core(
        "reduce",
        out_dtype,
        1,
        M,
        1,
        K,
        prologue=node,
        iter_dims=node.shape,
        kept_rank=len(kept),
        reduce_kind=kind,
        negate=negate,
        source=b.source,
        name=prim,
    )
    core.out_shape = out_shape
    return _Pending(out_shape, out_dtype, core=core)


# A running fold along one axis and the reduction it repeats.
_CUMULATIVE = {
    "cumsum": "reduce_sum", "cummax": "reduce_max", "cummin": "reduce_min",
    "cumprod": "reduce_prod", "cumlogsumexp": None,
}  # fmt: skip


def _cumulative(
    b: _Builder, prim: str, node: _Node, axis: int, reverse: bool, out_dtype: str
) -> _Node:
    """cumsum / cummax / cummin / cumprod as a REDUCE over the whole axis whose prologue replaces
    the terms past each output position (r > j, or r < j reversed) by the fold's identity: O(L^2)
    work, exact for integers, r ascending for floats (float min as -max(-x), as reduce_min)."""
    shape = node.shape
    if math.prod(shape) == 0:
        return _Imm(shape, out_dtype, value=0)
    if prim == "cumlogsumexp":
        return _cumlogsumexp(b, node, axis, reverse, out_dtype)
    node = b.strip_pendings(node)
    kind, node, negate = _min_as_negated_max(b, _reduce_kind(_CUMULATIVE[prim], node.dtype), node)
    terms = _along_running_axis(b, node, axis)
    return _running_fold(b, kind, terms, axis, reverse, out_dtype, prim, negate)


def _along_running_axis(b: _Builder, node: _Node, axis: int) -> _Node:
    """node over a running fold's iteration space (the output's dims, then the folded position r
    along `axis`): the element at r, for every output position."""
    rank = len(node.shape)
    dims = tuple(rank if d == axis else d for d in range(rank))  # x's axis becomes r
    return b.broadcast(node, node.shape + (node.shape[axis],), dims)


def _running_fold(
    b: _Builder, kind: str, terms: _Node, axis: int, reverse: bool, out_dtype: str, name: str,
    negate: bool = False,
) -> _Node:  # fmt: skip
    """The REDUCE of a running fold over terms (its iteration space, _along_running_axis): output
    j folds the terms at r <= j (r >= j reversed); the others count as the fold's identity."""
    iter_shape = terms.shape
    shape, rank = iter_shape[:-1], len(iter_shape) - 1
    pos = _iota(b, {"dimension": axis, "shape": iter_shape}, iter_shape, "int32")
    r = _iota(b, {"dimension": rank, "shape": iter_shape}, iter_shape, "int32")
    keep = b.elementwise("ige" if reverse else "ile", [r, pos], iter_shape, "bool")
    identity = _Imm(iter_shape, terms.dtype, value=_reduce_identity(kind, terms.dtype))
    term = b.elementwise("select", [keep, identity, terms], iter_shape, terms.dtype)
    core = _Core(
        "reduce",
        out_dtype,
        1,
        math.prod(shape),
        1,
        iter_shape[-1],
        prologue=term,
        iter_dims=iter_shape,
        kept_rank=rank,
        reduce_kind=kind,
        negate=negate,
        source=b.source,
        name=name,
    )
    core.out_shape = shape
    return _Pending(shape, out_dtype, core=core)


def _cumlogsumexp(b: _Builder, x: _Node, axis: int, reverse: bool, out_dtype: str) -> _Node:
    """log(sum_{r <= j} e^x_r) as two running folds in float32: the running max m_j, then
    m_j + log(sum e^(x_r - m_j)) (no term above 1: no overflow, and the largest term is exact).
    An infinite m_j shifts by 0 instead, so all -inf so far gives -inf and any +inf gives +inf
    (not inf - inf = NaN), as XLA's running logaddexp."""
    x = b.strip_pendings(_convert(b, x, "float32"))
    shape, iter_shape = x.shape, x.shape + (x.shape[axis],)
    along = _along_running_axis(b, x, axis)
    top = b.materialize(_running_fold(b, "max", along, axis, reverse, "float32", "cumlogsumexp"))
    f, over_r = _Ops(b, shape), _Ops(b, iter_shape)
    shift = f.where(f.is_finite(top), top, f.const(0.0))
    spread = b.broadcast(shift, iter_shape, tuple(range(len(shape))))
    terms = over_r("exp", over_r("sub", along, spread))
    total = b.materialize(_running_fold(b, "sum", terms, axis, reverse, "float32", "cumlogsumexp"))
    return _convert(b, f("add", f("log", total), shift), out_dtype)


# jax.debug.print / jax.debug.callback: equations with no results that XLA runs on the host. A
# kernel cannot print: the persistent call computes their operands as extra results, after the
# function's own, and the call's wrapper binds them after it (_call.py).
HOST_DEBUG = frozenset({"debug_callback", "debug_print"})


def _inlined_call(eqn):
    """The closed jaxpr of a nested jax.jit call (pjit / closed_call) that holds a debug
    callback, which trace() inlines so the callback reaches the top level; None otherwise."""
    inner = eqn.params.get("jaxpr") if eqn.primitive.name in _CALLS else None
    if inner is None or not hasattr(inner, "consts") or not host_debug_eqns(inner.jaxpr):
        return None
    return inner


_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


def host_debug_eqns(jaxpr) -> list:
    """The debug callbacks of a jaxpr at its top level or inside nested jax.jit calls (inlined),
    in program order (a function called twice: its callbacks twice)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in HOST_DEBUG:
            found.append(eqn)
        elif eqn.primitive.name in _CALLS and hasattr(eqn.params.get("jaxpr"), "jaxpr"):
            found.extend(host_debug_eqns(eqn.params["jaxpr"].jaxpr))
    return found


def _host_debug_as_outputs(closed, avals):
    """closed without its debug callbacks (host_debug_eqns: nested jax.jit calls holding one are
    inlined), returning their operands after its results, in host_debug_eqns' order."""
    if not host_debug_eqns(closed.jaxpr):
        return closed
    operands: list = []

    def run(jaxpr, consts, args):
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if eqn.primitive.name in HOST_DEBUG:
                operands.extend(invals)
                continue
            inner = _inlined_call(eqn)
            outs = (
                bind_eqn(eqn, invals) if inner is None else run(inner.jaxpr, inner.consts, invals)
            )
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def without_callbacks(*args):
        operands.clear()
        return [*run(closed.jaxpr, closed.consts, list(args)), *operands]

    return jax.make_jaxpr(without_callbacks)(*avals)


def _without_dead_code(closed):
    """closed with the equations no output depends on removed, as jax.jit removes them before
    lowering: an unrolled ring's last ppermute (its chunk is never read) would otherwise be
    planned as a put every rank sends and waits for, and an unused intermediate as a task.
    Effectful equations stay. jax-internal (partial_eval.dce_jaxpr, run against jax 0.10.2; the
    same signature in jax's sources since 2022): a jax without it plans the jaxpr as traced."""
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr

        jaxpr, _ = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    except (ImportError, TypeError):  # pragma: no cover - a jax without it
        return closed
    return jax.extend.core.ClosedJaxpr(jaxpr, closed.consts)


def trace(
    fn,
    avals: list[jax.ShapeDtypeStruct],
    arg_names: list[str] | None = None,
    max_while_iterations: int = DEFAULT_MAX_WHILE_ITERATIONS,
    platform: str = "cpu",
) -> TraceResult:
    """Traces fn on avals (flat list) into ops; outputs are materialized into result tensors.

    arg_names: the user's name of each flat input (its pytree path, e.g. "cache['k']"), used in
    error messages and as the input tensors' names. max_while_iterations: the guard of every
    while_loop (more body iterations fail the call). platform: the executor planned for ("cpu" /
    "gpu"; it picks how collectives are split into puts).
    """
    names = arg_names or [f"input {i}" for i in range(len(avals))]
    for i, aval in enumerate(avals):
        _check_dtype(aval, f"argument {names[i]}")
    from jax_ark.collectives import as_lax_collectives

    with as_lax_collectives():  # jax_ark.psum & co. bind jax.lax's primitives, planned below
        # PRNG keys become their uint32 data, random draws plain integer code (_random.py).
        closed = without_keys(jax.make_jaxpr(fn)(*avals), avals)
        num_debug = sum(len(e.invars) for e in host_debug_eqns(closed.jaxpr))
        closed = _without_dead_code(_host_debug_as_outputs(closed, avals))
    b = _Builder(max_while_iterations=max_while_iterations, platform=platform)
    # The plan's one group (every mesh axis its collectives name), known before any is planned:
    # routing tables and axis_index programs depend on it (_comm.plan_group).
    b.comm = plan_group(closed.jaxpr, UnsupportedError)
    in_nodes = []
    for i, aval in enumerate(avals):
        dtype = _dtype_name(aval)
        t = b.new_tensor(tuple(aval.shape), dtype, "arg", i, name=names[i])
        b.args.append(t)
        in_nodes.append(b.load(t))
    b.source = "<unknown source>"
    b.num_inputs = len(avals)
    b.top_counts = _use_counts(closed.jaxpr)
    b.dus_chain_end = _dus_chains(closed.jaxpr, b.top_counts)
    for i, v in enumerate(closed.jaxpr.outvars):
        if not _is_literal(v) and v not in b.top_outputs:
            b.top_outputs[v] = i
    out_nodes = _translate(b, closed.jaxpr, list(closed.consts), in_nodes)
    outputs: list[int] = []
    for i, node in enumerate(out_nodes):
        b.source = f"output {i}"
        if node.dtype not in _SUPPORTED_DTYPES:
            raise UnsupportedError(f"ark.persistent: output {i} has dtype {node.dtype}")
        if (
            isinstance(node, _Load)
            and b.tensors[node.tensor].storage == "result"
            and b.tensors[node.tensor].index == i
            and node.tensor not in outputs
        ):
            outputs.append(node.tensor)  # updated in place (an aliased input's buffer)
            continue
        # A put's inbox stays in the workspace: peers write into it through the exchanged
        # workspace pointers (an all_to_all whose result is the inbox as is gets a copy).
        claimed = (
            isinstance(node, _Load)
            and b.tensors[node.tensor].storage == "workspace"
            and _is_identity(node, b.tensors[node.tensor].shape)
            and b.tensors[node.tensor].shape == node.shape
            and not any(op.kind == "put" and op.out == node.tensor for op in b.ops)
        )
        if claimed:
            # Already in memory: move that tensor into the result buffer instead of copying it.
            spec = b.tensors[node.tensor]
            spec.storage, spec.index = "result", i
            outputs.append(node.tensor)
            continue
        if isinstance(node, (_Load, _Imm)):  # integer bits move with imov, floats with copy
            move = "imov" if node.dtype in INT_DTYPES else "copy"
            node = _Ew(node.shape, node.dtype, op=move, args=(node,), _size=2)
        outputs.append(b.materialize(node, "result", i).tensor)
    # Constants become FFI operands after the user inputs.
    for t in b.constants:
        b.tensors[t].index = len(b.args)
        b.args.append(t)
    for out, const in b.fill_alias.items():
        b.tensors[out].alias = b.tensors[const].index
    for i, t in enumerate(outputs):
        b.tensors[t].name = f"out{i}"
        if i >= len(outputs) - num_debug:
            b.tensors[t].name += " (a jax.debug operand)"
        if b.tensors[t].alias >= 0:
            b.tensors[t].name += f" (in place: {b.tensors[b.args[b.tensors[t].alias]].name})"
    return TraceResult(
        b.tensors, b.views, b.ops, b.args, len(avals), outputs, b.constants, b.loops, comm=b.comm
    )
