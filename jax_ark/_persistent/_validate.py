"""Validation of (possibly user-edited) plans: clear errors naming the offending task / op."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_ark._persistent._format import (
    ARG_REDUCES,
    BINARY_OPS,
    DTYPE_SIZES,
    INT32,
    INT_BINARY_OPS,
    INT_DTYPES,
    INT_OPERAND_OPS,
    INT_REDUCES,
    INT_UNARY_OPS,
    LOAD_OPS,
    MAX_GROUP_SIZE,
    MAX_INTEGER_POW_EXPONENT,
    MAX_MATMUL_PANEL,
    MAX_PROGRAM_LEN,
    MAX_RANK,
    MAX_TILING_CELLS,
    MAX_TRIP_COUNT,
    MAX_WORK,
    MAX_WORKERS,
    OPCODES,
    PLAN_VERSION,
    REDUCE_CODES,
    SCATTER_FOLD_KINDS,
    UNARY_OPS,
    WORKSPACE_ALIGN,
    Instr,
    Plan,
    PlanError,
    topological_order,
)

# validate() itself builds per-element arrays (exact cover, dependencies): it bounds their size.
MAX_VALIDATED_ELEMENTS = 1 << 30
INT64_MAX = (1 << 63) - 1


# Integer opcodes whose result is a bool / float register, not integer bits.
_INT_TO_FLOAT = frozenset(
    {"ieq", "ine", "ilt", "ile", "igt", "ige", "ult", "ule", "ugt", "uge", "i2f", "u2f"}
)


def _int_result(plan: Plan, op, ins) -> bool | None:
    """Whether instruction `ins` of `op` yields integer bits (None: either, a const). The
    executors keep a register's bits as its opcode wrote them and only round by dtype, so a
    dtype of the other kind would be reinterpreted there but converted by value elsewhere."""
    if ins.op == "const":
        return None
    if ins.op in LOAD_OPS:
        t = plan.views[int(ins.a)].tensor  # a view in range (checked first); its tensor later
        return plan.tensors[t].dtype in INT_DTYPES if 0 <= t < len(plan.tensors) else None
    if ins.op == "load_acc":
        return op.acc_dtype in INT_DTYPES
    if ins.op in ("load_iter", "load_rank"):
        return True
    if ins.op == "select":
        return None  # its operands' kind, checked in _check_program
    if ins.op == "bitcast":
        return ins.dtype in INT_DTYPES
    if ins.op in INT_BINARY_OPS or ins.op in INT_UNARY_OPS:
        return ins.op not in _INT_TO_FLOAT
    return False


def _check_program(plan: Plan, i: int, prog, rank: int, acc_ok: bool, what: str) -> None:
    where = f"op {i} '{plan.ops[i].name}' {what}"
    if not 1 <= len(prog) <= MAX_PROGRAM_LEN:
        raise PlanError(f"{where}: program length {len(prog)} not in 1..{MAX_PROGRAM_LEN}")
    for k, ins in enumerate(prog):
        w = f"{where} instruction {k} ({ins.op})"
        if ins.op not in OPCODES or ins.dtype not in DTYPE_SIZES:
            raise PlanError(f"{w}: unknown opcode or dtype {ins.dtype!r}")
        regs: list = []
        if ins.op == "load_acc" and not acc_ok:
            raise PlanError(f"{w}: load_acc in a map op")
        if ins.op == "load_iter" and plan.version < 3:
            raise PlanError(f"{w}: load_iter needs plan version 3 (loops)")
        if ins.op == "load_rank" and plan.comm is None:
            raise PlanError(f"{w}: load_rank in a plan without a communication group (comm)")
        if ins.op == "load_at":
            regs = [ins.b]  # the offset: an earlier integer register (checked below)
        if ins.op in LOAD_OPS:
            v = int(ins.a)
            if not 0 <= v < len(plan.views):
                raise PlanError(f"{w}: view {v} out of range")
            if len(plan.views[v].strides) != rank:
                raise PlanError(
                    f"{w}: view {v} has rank {len(plan.views[v].strides)}, expected {rank}"
                )
        elif ins.op in UNARY_OPS or ins.op in INT_UNARY_OPS:
            regs = [ins.a]
            if ins.op in ("integer_pow", "ipow") and abs(int(ins.b)) > MAX_INTEGER_POW_EXPONENT:
                raise PlanError(
                    f"{w}: integer_pow exponent {ins.b} outside +-{MAX_INTEGER_POW_EXPONENT} "
                    f"(|b| - 1 multiplications per element)"
                )
        elif ins.op in BINARY_OPS or ins.op in INT_BINARY_OPS:
            regs = [ins.a, ins.b]
        elif ins.op == "select":
            regs = [ins.a, ins.b, ins.c]
        for r in regs:
            if not 0 <= int(r) < k:
                raise PlanError(f"{w}: operand register {r} is not an earlier instruction")
        # Registers hold float32 values or integer bits (by the writer's dtype): an opcode must
        # read the kind it computes on (select moves either kind; its predicate is bool / float).
        operands = [] if ins.op == "select" else regs
        want_int = ins.op in INT_OPERAND_OPS or ins.op == "load_at"
        if ins.op == "bitcast":  # 32 bits of one register kind reinterpreted as the other
            want_int = ins.dtype not in INT_DTYPES
            widths = {ins.dtype, prog[int(ins.a)].dtype} - {"float32", "int32", "uint32"}
            if widths:
                raise PlanError(f"{w}: bitcast between 32-bit registers only, not {widths.pop()}")
        if ins.op == "select":
            for r in regs[1:]:
                if (prog[int(r)].dtype in INT_DTYPES) != (ins.dtype in INT_DTYPES):
                    raise PlanError(f"{w}: selects register {r} of another kind than {ins.dtype}")
        for r in operands:
            if (prog[int(r)].dtype in INT_DTYPES) != want_int:
                raise PlanError(
                    f"{w}: reads register {r} of dtype {prog[int(r)].dtype}, but {ins.op} takes "
                    f"{'integer' if want_int else 'float / bool'} operands"
                )
        if ins.op == "select" and prog[int(ins.a)].dtype in INT_DTYPES:
            raise PlanError(f"{w}: the predicate must be a bool / float register")


def _check_result_kinds(plan: Plan, i: int, prog, what: str) -> None:
    """After _check_program (operands first: their messages name the reading opcode)."""
    for k, ins in enumerate(prog):
        want = _int_result(plan, plan.ops[i], ins)
        if want is not None and want != (ins.dtype in INT_DTYPES):
            raise PlanError(
                f"op {i} '{plan.ops[i].name}' {what} instruction {k} ({ins.op}): yields "
                f"{'integer bits' if want else 'a float / bool value'}, its dtype {ins.dtype} "
                "says otherwise"
            )


def _program_cost(prog) -> int:
    """Element-operations per element (integer_pow / ipow: their multiplications)."""
    return sum(max(1, abs(int(i.b))) if i.op in ("integer_pow", "ipow") else 1 for i in prog)


def _view_in_bounds(plan: Plan, i: int, v: int, dims, reads: set[int]) -> None:
    """A view op i reads: inside its tensor, and not over bytes op i itself writes (its output,
    a workspace tensor overlapping it, or the operand its output aliases)."""
    _view_reach(plan, i, v, dims)
    view = plan.views[v]
    src, out = plan.tensors[view.tensor], plan.tensors[plan.ops[i].out]
    if (
        view.tensor == plan.ops[i].out
        or (
            src.storage == out.storage == "workspace"
            and src.byte_offset < out.byte_offset + out.nbytes
            and out.byte_offset < src.byte_offset + src.nbytes
        )
        or (src.storage == "arg" and out.storage == "result" and src.index == out.alias >= 0)
    ):
        raise PlanError(
            f"op {i} '{plan.ops[i].name}': view {v} reads tensor {view.tensor}, whose bytes the op "
            f"itself writes"
        )
    reads.add(view.tensor)


def _view_reach(plan: Plan, i: int, v: int, dims) -> None:
    """Every element view v reaches over `dims` is inside its tensor. A load_at / window store
    moves that element by a device offset, and the executors clamp the moved element into the
    tensor, so this bound is what keeps those inside too."""
    view = plan.views[v]
    if not 0 <= view.tensor < len(plan.tensors):
        raise PlanError(f"view {v}: tensor {view.tensor} out of range")
    if len(view.strides) != len(dims):
        raise PlanError(f"op {i}: view {v} has rank {len(view.strides)}, its space {len(dims)}")
    if view.offset < 0 or any(s < 0 for s in view.strides):
        raise PlanError(f"view {v}: negative offset or stride")
    hi = view.offset + sum((d - 1) * s for d, s in zip(dims, view.strides, strict=True))
    # v3 loops: the iterations move the view (backwards for a negative iteration stride)
    lo = view.offset
    chain = plan.loop_chain(i)
    for loop, stride in zip(chain[::-1], (view.iter_stride, view.outer_iter_stride), strict=False):
        far = (plan.loops[loop].trip_count - 1) * stride
        lo, hi = lo + min(far, 0), hi + max(far, 0)
    if lo < 0:
        raise PlanError(
            f"op {i} '{plan.ops[i].name}': view {v} reads element {lo} of tensor {view.tensor} "
            "at some iteration (a negative iteration stride moves it below 0)"
        )
    n = plan.tensors[view.tensor].num_elements
    if hi >= n:
        raise PlanError(
            f"op {i} '{plan.ops[i].name}': view {v} reads element {hi} of tensor {view.tensor} "
            f"which has {n} elements (shape mismatch)"
        )


def _check_comm_group(plan: Plan) -> None:
    """v3: a plan with put ops names its group (plan.comm), and only then."""
    has_put = any(op.kind == "put" for op in plan.ops)
    if plan.comm is None:
        if has_put:
            raise PlanError("comm: the plan has put ops but names no communication group")
        return
    if plan.version < 3:
        raise PlanError(f"comm: needs plan version 3, the plan is version {plan.version}")
    if not 1 <= plan.comm.group_size <= MAX_GROUP_SIZE:
        raise PlanError(f"comm.group_size: {plan.comm.group_size} not in 1..{MAX_GROUP_SIZE}")
    if plan.num_counters > INT32[1]:
        raise PlanError("comm: num_tasks * (1 + group_size) counters exceed int32")


def _check_put(plan: Plan, i: int, reads: set[int]) -> None:
    """A put op (v3): B = the group's size, a rank-3 source view over (peer, M, N) of its
    inbox's dtype, no programs, and an inbox in workspace bytes no other tensor uses (peers write
    it whenever they get to it, so no local dependency could order a reuse against them)."""
    op = plan.ops[i]
    where = f"op {i} '{op.name}'"
    out = plan.tensors[op.out]
    if plan.comm is None:
        raise PlanError(f"{where}: a put op in a plan without comm")
    n = plan.comm.group_size
    if op.recv_from is None:
        if op.B != n:
            raise PlanError(f"{where}: a put op's B must be the plan's comm.group_size")
        if op.send_row is not None:
            raise PlanError(f"{where}: send_row without recv_from")
    else:
        _check_route(op, where, n)
    if out.storage != "workspace":
        raise PlanError(f"{where}: a put op writes a workspace tensor (its symmetric inbox)")
    if op.prologue or op.epilogue:
        raise PlanError(f"{where}: a put op has no prologue / epilogue")
    if not 0 <= op.a_view < len(plan.views) or len(plan.views[op.a_view].strides) != 3:
        raise PlanError(f"{where}: source view {op.a_view} missing or not rank 3")
    _view_in_bounds(plan, i, op.a_view, (op.B, op.M, op.N), reads)
    if plan.tensors[plan.views[op.a_view].tensor].dtype != out.dtype:
        raise PlanError(f"{where}: its source and inbox dtypes differ")
    _alone_in_workspace(plan, op.out, f"{where}: its inbox")
    if op.read_in_place:
        _check_read_in_place(plan, i)


def _alone_in_workspace(plan: Plan, tensor: int, what: str) -> None:
    """No other workspace tensor shares `tensor`'s bytes (peers write an inbox, or read a
    read-in-place source, whenever they get to it: no local dependency orders a reuse)."""
    spec = plan.tensors[tensor]
    lo, hi = spec.byte_offset, spec.byte_offset + spec.nbytes
    for t, other in enumerate(plan.tensors):
        if t == tensor or other.storage != "workspace":
            continue
        if other.byte_offset < hi and lo < other.byte_offset + other.nbytes:
            raise PlanError(
                f"{what} (tensor {tensor}) shares workspace bytes with tensor {t} '{other.name}'"
            )


def read_in_place_problem(plan: Plan, i: int) -> str:
    """Why put op i cannot be read in place ("" when it can; docs/plan_format.md, "Puts read in
    place"): its readers then read each slot's tile in the source rank's source tensor, so that
    tensor must be a workspace tensor written once, outside loops, by one other op (the only
    writes peers may see; they wait for nothing else), its (m, n) tile rows contiguous, every
    slot must have a source rank, and only programs' loads may read the inbox (the read path
    that resolves slots to peers; not an operand view, a store view or load_at)."""
    op = plan.ops[i]
    if op.loop >= 0:
        return "it is in a loop"
    if op.recv_from is not None and any(v < 0 for row in op.recv_from for v in row):
        return "a slot has no source rank (zeros)"
    view = plan.views[op.a_view]
    src = view.tensor
    if plan.tensors[src].storage != "workspace":
        return f"its source (tensor {src}) is not a workspace tensor"
    if view.strides[2] != 1 or (op.M > 1 and view.strides[1] != op.N):
        return f"its source view's (m, n) tile is not contiguous (strides {list(view.strides)})"
    writers = [j for j, o in enumerate(plan.ops) if o.out == src]
    if len(writers) != 1:
        return f"its source (tensor {src}) is written by {len(writers)} ops, not one"
    w = plan.ops[writers[0]]
    if w.kind == "put" or w.store_view >= 0 or w.loop >= 0:
        return (
            f"its source (tensor {src}) is written by op {writers[0]} '{w.name}', a put, a "
            "window store or an op in a loop"
        )
    inbox = op.out
    for j, o in enumerate(plan.ops):
        for name in ("a_view", "b_view", "store_view"):
            v = getattr(o, name)
            if v >= 0 and plan.views[v].tensor == inbox:
                return f"op {j} '{o.name}' reads its inbox through its {name}"
        for ins in o.prologue + o.epilogue:
            if ins.op == "load_at" and plan.views[int(ins.a)].tensor == inbox:
                return f"op {j} '{o.name}' reads its inbox with load_at"
    return ""


def _check_read_in_place(plan: Plan, i: int) -> None:
    op = plan.ops[i]
    where = f"op {i} '{op.name}'"
    problem = read_in_place_problem(plan, i)
    if problem:
        raise PlanError(f"{where}: read_in_place, but {problem}")
    _alone_in_workspace(plan, plan.views[op.a_view].tensor, f"{where}: its read-in-place source")


def _check_route(op, where: str, n: int) -> None:
    """A routing table: [n][B] sources in -1..n-1 and source rows in 0..B-1 (B in 1..n)."""
    if not 1 <= op.B <= n:
        raise PlanError(f"{where}: a routed put op's B must be in 1..comm.group_size ({n})")
    for name, table, lo, hi in (
        ("recv_from", op.recv_from, -1, n - 1),
        ("send_row", op.send_row, 0, op.B - 1),
    ):
        if table is None or len(table) != n or any(len(row) != op.B for row in table):
            raise PlanError(f"{where}: {name} must be [{n}][{op.B}] (ranks x inbox slots)")
        for q, row in enumerate(table):
            for b, v in enumerate(row):
                if not lo <= v <= hi:
                    raise PlanError(f"{where}: {name}[{q}][{b}] = {v} not in {lo}..{hi}")


def freeze(plan: Plan) -> Plan:
    """A validated deep copy: later edits of `plan` cannot reach what runs."""
    frozen = plan.copy()
    _validate(frozen)
    return frozen


def validate(plan: Plan) -> None:
    """Raises PlanError naming the offending field / task / op / tensor."""
    _validate(plan.copy())  # the strict parser first: types, ranges, field paths


def _validate(plan: Plan) -> None:
    if not 1 <= plan.version <= PLAN_VERSION:
        raise PlanError(f"plan version {plan.version} is not in 1..{PLAN_VERSION}")
    if not 1 <= plan.num_workers <= MAX_WORKERS:
        raise PlanError(f"num_workers must be in 1..{MAX_WORKERS}, got {plan.num_workers}")
    _check_comm_group(plan)
    # tensors
    for t, spec in enumerate(plan.tensors):
        if (
            spec.dtype not in DTYPE_SIZES
            or len(spec.shape) > MAX_RANK
            or min(spec.shape, default=1) < 0
        ):
            raise PlanError(
                f"tensor {t} '{spec.name}': bad dtype {spec.dtype} or shape {spec.shape}"
            )
        if spec.nbytes > INT64_MAX:
            raise PlanError(f"tensor {t} '{spec.name}': size {spec.shape} overflows int64")
        if spec.storage == "workspace":
            if (
                spec.byte_offset < 0
                or spec.byte_offset % WORKSPACE_ALIGN
                or spec.byte_offset + spec.nbytes > plan.workspace_bytes
            ):
                raise PlanError(
                    f"tensor {t} '{spec.name}': bytes [{spec.byte_offset}, +{spec.nbytes}) are not "
                    f"a {WORKSPACE_ALIGN}-aligned range of the {plan.workspace_bytes} B workspace"
                )
        elif spec.storage not in ("arg", "result"):
            raise PlanError(f"tensor {t} '{spec.name}': bad storage {spec.storage!r}")
        elif spec.byte_offset != 0:
            raise PlanError(
                f"tensor {t} '{spec.name}': byte_offset must be 0 outside the workspace"
            )
    if sorted(plan.tensors[a].index for a in plan.args) != list(range(len(plan.args))):
        raise PlanError("args: operand indices are not 0..n-1")
    for t in plan.args:
        if plan.tensors[t].storage != "arg":
            raise PlanError(f"args: tensor {t} is not an operand")
    result_of: dict[int, int] = {}
    for t, spec in enumerate(plan.tensors):
        if spec.storage == "arg":
            if not 0 <= spec.index < len(plan.args):
                raise PlanError(
                    f"tensor {t} '{spec.name}': operand index {spec.index} out of range"
                )
            a = plan.tensors[plan.args[spec.index]]
            if (a.nbytes, a.dtype) != (spec.nbytes, spec.dtype):
                raise PlanError(
                    f"tensor {t} '{spec.name}': {spec.dtype}{list(spec.shape)} does not fit "
                    f"operand {spec.index} ({a.dtype}{list(a.shape)})"
                )
        elif spec.storage == "result":
            if not 0 <= spec.index < len(plan.outputs):
                raise PlanError(f"tensor {t} '{spec.name}': result index {spec.index} out of range")
            if spec.index in result_of:
                raise PlanError(
                    f"tensor {t} '{spec.name}': shares output buffer {spec.index} with tensor "
                    f"{result_of[spec.index]} (two tensors in one output: racy, wrong results)"
                )
            result_of[spec.index] = t
    for i, t in enumerate(plan.outputs):
        if plan.tensors[t].storage != "result" or plan.tensors[t].index != i:
            raise PlanError(f"output {i}: tensor {t} is not result {i}")
    operand = {plan.tensors[a].index: plan.tensors[a] for a in plan.args}
    aliased: dict[int, int] = {}
    for t, spec in enumerate(plan.tensors):
        if spec.alias < 0:
            continue
        src = operand.get(spec.alias)
        if spec.storage != "result" or src is None or src.num_elements != spec.num_elements:
            raise PlanError(
                f"tensor {t} '{spec.name}': alias {spec.alias} must name an operand of its size, "
                "and only a result may alias one"
            )
        if src.dtype != spec.dtype:
            raise PlanError(f"tensor {t} '{spec.name}': aliases an operand of another dtype")
        if spec.alias in aliased:
            raise PlanError(
                f"tensor {t} '{spec.name}': operand {spec.alias} is already aliased by tensor "
                f"{aliased[spec.alias]} (one buffer cannot be two results)"
            )
        aliased[spec.alias] = t
    _validate_loops(plan)
    # ops
    writer: dict[int, int] = {}
    reads: set[int] = set()
    work = 0
    for i, op in enumerate(plan.ops):
        where = f"op {i} '{op.name}'"
        if not 0 <= op.out < len(plan.tensors):
            raise PlanError(f"{where}: output tensor {op.out} out of range")
        out = plan.tensors[op.out]
        if out.storage == "arg":
            raise PlanError(f"{where}: writes operand tensor {op.out}")
        window = op.store_view >= 0
        fold = op.scatter_fold  # its tensor's one writer; its epilogue walks the whole output
        if op.out in writer and not (
            window
            and not fold
            and plan.ops[writer[op.out]].store_view >= 0
            and not plan.ops[writer[op.out]].scatter_fold
            and _outside_loops(plan, i)
            and _outside_loops(plan, writer[op.out])
        ):
            raise PlanError(
                f"{where}: tensor {op.out} is also written by op {writer[op.out]} (only window "
                "stores outside loops may write one tensor in turn)"
            )
        writer[op.out] = i
        space = tuple(op.iter_dims) if window and not fold else out.shape
        if op.stacked:  # one slice of its output per iteration
            space = out.shape[1:]
        if fold:
            _check_scatter_fold(plan, i)
        elif window:
            if op.kind not in ("map", "matmul") or out.storage != "result" or out.alias < 0:
                raise PlanError(
                    f"{where}: a window store must be a map or matmul op writing an aliased "
                    "result (the elements it does not write keep the aliased operand's content)"
                )
            _check_store_view(plan, i, op.epilogue, "epilogue")
            if op.kind == "map" and sum(1 for task in plan.tasks if task.op == i) != 1:
                raise PlanError(f"{where}: a map's window store must be exactly one task")
        elif op.store_at != -1:
            raise PlanError(f"{where}: store_at {op.store_at} without a store view")
        if (
            min(op.B, op.M, op.N) < 1
            or max(op.B, op.M, op.N) > INT32[1]
            or op.B * op.M * op.N != math.prod(space)
        ):
            raise PlanError(
                f"{where}: B*M*N = {op.B}*{op.M}*{op.N} != {math.prod(space)} elements of its "
                f"{'window' if window else 'output'} {list(space)} (shape mismatch; each of B, M, "
                "N in 1..2^31-1)"
            )
        if op.kind in ("map", "reduce") and (op.B != 1 or (op.kind == "reduce" and op.N != 1)):
            raise PlanError(f"{where}: a reduce op has B = N = 1, a map op B = 1")
        if op.kind in ("matmul", "reduce") and not 1 <= op.K <= INT32[1]:
            raise PlanError(f"{where}: K = {op.K} not in 1..2^31-1")
        if op.kind == "matmul":
            for v in (op.a_view, op.b_view):
                if not 0 <= v < len(plan.views) or len(plan.views[v].strides) != 3:
                    raise PlanError(f"{where}: operand view {v} missing or not rank 3")
                src = plan.views[v].tensor
                if 0 <= src < len(plan.tensors) and plan.tensors[src].dtype in INT_DTYPES:
                    raise PlanError(f"{where}: a matmul operand must be float / bool, not integer")
            if op.acc_dtype in INT_DTYPES:
                raise PlanError(f"{where}: a matmul accumulates floats, not {op.acc_dtype}")
            if op.K < 1:
                raise PlanError(f"{where}: K must be >= 1")
            _view_in_bounds(plan, i, op.a_view, (op.B, op.M, op.K), reads)
            _view_in_bounds(plan, i, op.b_view, (op.B, op.K, op.N), reads)
            inner = op.K
        elif op.kind == "reduce":
            if not 0 <= op.kept_rank <= len(op.iter_dims) or min(op.iter_dims, default=1) < 1:
                raise PlanError(f"{where}: bad iteration space {op.iter_dims} / kept_rank")
            kept, red = op.iter_dims[: op.kept_rank], op.iter_dims[op.kept_rank :]
            if (not fold and math.prod(kept) != op.M) or math.prod(red) != op.K or op.K < 1:
                raise PlanError(f"{where}: iteration space {op.iter_dims} != M x K")
            if op.reduce_kind not in REDUCE_CODES or (op.reduce_kind == "last" and not fold):
                raise PlanError(f"{where}: bad reduce kind {op.reduce_kind!r}")
            _check_program(plan, i, op.prologue, len(op.iter_dims), False, "prologue")
            _check_result_kinds(plan, i, op.prologue, "prologue")
            folds_int = op.reduce_kind in INT_REDUCES
            if op.reduce_kind == "last":  # moves values of the output's kind
                folds_int = out.dtype in INT_DTYPES
            if (op.prologue[-1].dtype in INT_DTYPES) != folds_int:
                raise PlanError(
                    f"{where}: reduce kind {op.reduce_kind} folds "
                    f"{'integer' if folds_int else 'float'} values, its prologue yields "
                    f"{op.prologue[-1].dtype}"
                )
            if not fold and (op.acc_dtype in INT_DTYPES) != (
                folds_int or op.reduce_kind in ARG_REDUCES
            ):
                raise PlanError(
                    f"{where}: acc_dtype {op.acc_dtype} is not what {op.reduce_kind} yields"
                )
            for ins in op.prologue:
                if ins.op in LOAD_OPS:
                    _view_in_bounds(plan, i, int(ins.a), op.iter_dims, reads)
            inner = op.K * (_program_cost(op.prologue) + 1)
            if fold:  # the prologue runs once per iteration element, not per output element
                work += plan.trip_count(i) * inner
                inner = 0
        elif op.kind == "map":
            inner = 0
        elif op.kind == "put":
            _check_put(plan, i, reads)
            work += math.prod(space) * op.B
            continue
        else:
            raise PlanError(f"{where}: unknown kind {op.kind!r}")
        _check_program(plan, i, op.epilogue, len(space), op.kind != "map" and not fold, "epilogue")
        _check_result_kinds(plan, i, op.epilogue, "epilogue")
        if (op.epilogue[-1].dtype in INT_DTYPES) != (out.dtype in INT_DTYPES):
            raise PlanError(
                f"{where}: the epilogue yields {op.epilogue[-1].dtype}, its output is {out.dtype} "
                "(integer bits and float values do not mix)"
            )
        for ins in op.epilogue:
            if ins.op in LOAD_OPS:
                _view_in_bounds(plan, i, int(ins.a), space, reads)
        work += plan.trip_count(i) * math.prod(space) * (inner + _program_cost(op.epilogue))
    used = max(
        (s.byte_offset + s.nbytes for s in plan.tensors if s.storage == "workspace"), default=0
    )
    if plan.workspace_bytes > -(-used // WORKSPACE_ALIGN) * WORKSPACE_ALIGN:
        raise PlanError(
            f"workspace_bytes {plan.workspace_bytes} exceeds what its tensors use ({used}, "
            f"rounded up to {WORKSPACE_ALIGN})"
        )
    if work > MAX_WORK:
        raise PlanError(f"the plan's work ({work} element-operations) exceeds the bound 2^45")
    for i, t in enumerate(plan.outputs):
        if t not in writer and plan.tensors[t].num_elements > 0:
            raise PlanError(f"output {i} (tensor {t}) is never written")
    _validate_store_chains(plan)
    for t in sorted(reads):
        if plan.tensors[t].storage != "arg" and t not in writer:
            raise PlanError(
                f"tensor {t} '{plan.tensors[t].name}' ({plan.tensors[t].storage}) is read by a "
                f"view but no op writes it (it would read uninitialized memory)"
            )
    if plan.loops:
        _validate_carried_reads(plan)
        _validate_stacked_reads(plan)
        _validate_aliased_reads_in_loops(plan)
    if sum(plan.tensors[op.out].num_elements for op in plan.ops) > MAX_VALIDATED_ELEMENTS:
        raise PlanError("plan writes more than 2^30 elements: too large to validate")
    # tasks cover their op exactly once
    coverage = {i: np.zeros(op.B * op.M * op.N, np.int32) for i, op in enumerate(plan.ops)}
    from jax_ark._persistent._schedule import required_dependencies, tile_linear

    for t, task in enumerate(plan.tasks):
        if not 0 <= task.op < len(plan.ops):
            raise PlanError(f"task {t}: op {task.op} out of range")
        op = plan.ops[task.op]
        if not (
            0 <= task.b0 < task.b1 <= op.B
            and 0 <= task.m0 < task.m1 <= op.M
            and 0 <= task.n0 < task.n1 <= op.N
        ):
            raise PlanError(
                f"{plan.task_name(t)}: tile outside op space B={op.B} M={op.M} N={op.N}"
            )
        if op.kind == "matmul" and op.K * (task.n1 - task.n0) > MAX_MATMUL_PANEL:
            raise PlanError(f"{plan.task_name(t)}: K x tile columns exceeds 2^28 elements")
        coverage[task.op][tile_linear(op, task)] += 1
        for d in task.deps:
            if not 0 <= d < len(plan.tasks) or d == t:
                raise PlanError(f"{plan.task_name(t)}: bad dependency {d}")
    for i, op in enumerate(plan.ops):
        cells = 1
        for dim, lo, hi in ((op.B, "b0", "b1"), (op.M, "m0", "m1"), (op.N, "n0", "n1")):
            cuts = {0, dim}
            for task in plan.tasks:
                if task.op == i:
                    cuts.update((getattr(task, lo), getattr(task, hi)))
            cells *= len(cuts) - 1
        if cells > MAX_TILING_CELLS:
            raise PlanError(f"op {i} '{op.name}': its tiles do not form a grid of <= 2^24 cells")
    for i, cov in coverage.items():
        if cov.size and (cov.min() != 1 or cov.max() != 1):
            bad = "missing" if cov.min() == 0 else "computed twice"
            raise PlanError(
                f"op {i} '{plan.ops[i].name}': output elements {bad} "
                f"(first at flat index {int(np.argmax(cov != 1))}): a task is missing or duplicated"
            )
    # queues
    if len(plan.queues) != plan.num_workers:
        raise PlanError(f"{len(plan.queues)} queues for {plan.num_workers} workers")
    where_queued: dict[int, int] = {}
    for w, q in enumerate(plan.queues):
        for t in q:
            if not 0 <= t < len(plan.tasks):
                raise PlanError(f"worker {w}: queues unknown task {t}")
            if t in where_queued:
                raise PlanError(
                    f"{plan.task_name(t)} is queued twice (workers {where_queued[t]} and {w})"
                )
            where_queued[t] = w
    for t in range(len(plan.tasks)):
        if t not in where_queued:
            raise PlanError(f"{plan.task_name(t)} is in no worker's queue")
    if plan.loops:
        return _validate_loop_schedule(plan, where_queued)
    # runnable: dependency + queue-order edges acyclic
    preds: list[list[int]] = [list(task.deps) for task in plan.tasks]
    for q in plan.queues:
        for a, b in zip(q, q[1:], strict=False):
            preds[b].append(a)
    order, stuck = topological_order(preds)
    if stuck is not None:
        raise PlanError(
            f"dependency cycle (dependencies + queue order) through {plan.task_name(stuck)} on "
            f"worker {where_queued[stuck]}: the plan would deadlock"
        )
    # complete: every task that must precede t does (dependency or queue order, transitively)
    ancestors = _ancestor_masks(order, preds)
    for t, need in enumerate(required_dependencies(plan)):
        task = plan.tasks[t]
        have = ancestors[t]
        if plan.ops[task.op].kind == "put":
            # Eager sends: a put's copies may be made as soon as its own dependencies are done,
            # before its turn in its queue, so its queue predecessors do not order what it reads.
            # Once a dependency d is done, so is everything before d (d ran after them).
            have = 0
            for d in task.deps:
                have |= ancestors[d] | (1 << d)
        for d in need:
            if not (have >> d) & 1:
                raise PlanError(
                    f"{plan.task_name(t)} reads or overwrites data of {plan.task_name(d)} but "
                    f"does not depend on it (missing dependency"
                    + (
                        "; a put task's copies may be sent before its turn in its queue, so "
                        "queue order does not count)"
                        if have != ancestors[t]
                        else ")"
                    )
                )


def _ancestor_masks(order: list[int], preds: list[list[int]]) -> list[int]:
    """Bit p of masks[t] is set when task p precedes t through `preds`, transitively (`order` is
    a topological order of `preds`)."""
    masks = [0] * len(preds)
    for t in order:
        acc = 0
        for p in preds[t]:
            acc |= masks[p] | (1 << p)
        masks[t] = acc
    return masks


# ---- loops (plan v3) ----------------------------------------
def _validate_loops(plan: Plan) -> None:
    """The loop section and the loop fields of ops and views (before the ops are checked): loops
    ordered by first op, a nested loop inside its parent's ops (at most two levels), loops of one
    parent disjoint, each op's loop the innermost loop holding it."""
    last_child: dict[int, int] = {}
    for k, loop in enumerate(plan.loops):
        where = f"loops[{k}]"
        if not 1 <= loop.trip_count <= MAX_TRIP_COUNT:
            raise PlanError(f"{where}: trip_count {loop.trip_count} not in 1..{MAX_TRIP_COUNT}")
        if not 0 <= loop.first_op < loop.end_op <= len(plan.ops):
            raise PlanError(f"{where}: ops {loop.first_op}..{loop.end_op} not a range of ops")
        if not -1 <= loop.parent < k:
            raise PlanError(f"{where}: parent {loop.parent} is not an earlier loop")
        if loop.parent >= 0:
            outer = plan.loops[loop.parent]
            if outer.parent >= 0:
                raise PlanError(f"{where}: loops nest at most two levels deep")
            if not outer.first_op <= loop.first_op < loop.end_op <= outer.end_op:
                raise PlanError(f"{where}: not inside the ops of its parent loop {loop.parent}")
            if loop.trip_count * outer.trip_count > MAX_TRIP_COUNT:
                raise PlanError(
                    f"{where}: {loop.trip_count * outer.trip_count} runs in all (its trip count "
                    f"times its parent's), more than {MAX_TRIP_COUNT}"
                )
        prev = last_child.get(loop.parent)
        if (prev is not None and plan.loops[prev].end_op > loop.first_op) or (
            k and plan.loops[k - 1].first_op > loop.first_op
        ):
            raise PlanError(f"{where}: loops must be disjoint (or nested) and in op order")
        last_child[loop.parent] = k
    for k, loop in enumerate(plan.loops):  # while loops (docs/plan_format.md, "While loops")
        if loop.pred_op < 0:
            continue
        where = f"loops[{k}] (a while loop)"
        if not loop.first_op <= loop.pred_op < loop.end_op:
            raise PlanError(f"{where}: pred_op {loop.pred_op} is not an op of the loop")
        if loop.parent >= 0 or any(other.parent == k for other in plan.loops):
            raise PlanError(f"{where}: a while loop is a top-level loop with no loop inside")
        pred = plan.ops[loop.pred_op]
        out = plan.tensors[pred.out] if 0 <= pred.out < len(plan.tensors) else None
        if (
            not pred.stacked
            or pred.stack_reversed
            or out is None
            or out.dtype != "bool"
            or tuple(out.shape) != (loop.trip_count,)
        ):
            raise PlanError(
                f"{where}: its predicate op {loop.pred_op} must write a stacked bool "
                f"({loop.trip_count},) tensor"
            )
    innermost = [-1] * len(plan.ops)
    for k, loop in enumerate(plan.loops):  # parents first: the innermost loop is written last
        for i in range(loop.first_op, loop.end_op):
            innermost[i] = k
    for i, op in enumerate(plan.ops):
        where = f"op {i} '{op.name}'"
        if op.loop != innermost[i]:
            raise PlanError(
                f"{where}: loop {op.loop}, but the loop section puts it in "
                f"{innermost[i] if innermost[i] >= 0 else 'no loop'}"
            )
        if op.stacked and op.store_view >= 0:
            raise PlanError(f"{where}: a window store cannot be stacked")
        if op.stack_reversed and not op.stacked:
            raise PlanError(f"{where}: stack_reversed without stacked")
        if op.kind == "put" and op.loop >= 0 and (not op.stacked or op.stack_reversed):
            # forward: the body reads slice k at run k, which a reversed put would fill only at
            # the mirrored run
            raise PlanError(
                f"{where}: a put op in a loop must be stacked forward (one inbox slice per "
                "run of its loops, slice k at run k)"
            )
        if op.stacked:
            shape = plan.tensors[op.out].shape if 0 <= op.out < len(plan.tensors) else ()
            slices = 0  # a put's inbox: a slice per run of all its loops; else per iteration
            if op.loop >= 0:
                put = op.kind == "put"
                slices = plan.runs_per_call(i) if put else plan.loops[op.loop].trip_count
            if not slices or not shape or shape[0] != slices:
                raise PlanError(
                    f"{where}: a stacked op is in a loop and its output's first dim is the "
                    "loop's trip count (a put's: its runs per call, over all its loops)"
                )


def _validate_loop_schedule(plan: Plan, where_queued: dict[int, int]) -> None:
    """Runnable and complete, with loops (docs/plan_format.md, "Loops"): dependencies and queues
    never go back to an earlier stage; dependencies within one iteration plus queue order are
    acyclic; every required dependency holds through a chain that waits for the right
    iteration (a carried one may go through one earlier iteration, the others through none)."""
    from jax_ark._persistent._schedule import required_dependencies, stage_of

    n = len(plan.tasks)
    stage = [stage_of(plan, task.op) for task in plan.tasks]
    for t, task in enumerate(plan.tasks):
        for d in task.deps:
            if stage[d] > stage[t] and not plan.carried(t, d):
                raise PlanError(
                    f"{plan.task_name(t)} depends on {plan.task_name(d)}, which comes after it "
                    "(a later loop or the ops after a loop)"
                )
    for w, q in enumerate(plan.queues):
        for a, b in zip(q, q[1:], strict=False):
            if stage[a] > stage[b]:
                raise PlanError(
                    f"worker {w}: queues {plan.task_name(b)} after {plan.task_name(a)} of a later "
                    "stage (a worker runs the tasks before a loop, the loop's, then those after)"
                )
    same: list[list[int]] = [
        [d for d in task.deps if not plan.carried(t, d)] for t, task in enumerate(plan.tasks)
    ]
    prev: list[list[int]] = [
        [d for d in task.deps if plan.carried(t, d)] for t, task in enumerate(plan.tasks)
    ]
    preds = [list(p) for p in same]
    for q in plan.queues:
        for a, b in zip(q, q[1:], strict=False):
            preds[b].append(a)
        # a loop's segment wraps around: its first task's next iteration follows its last task
        for k in range(len(plan.loops)):
            seg = [t for t in q if k in plan.loop_chain(plan.tasks[t].op)]
            if len(seg) > 1:
                prev[seg[0]].append(seg[-1])
    order, stuck = topological_order(preds)
    if stuck is not None:
        raise PlanError(
            f"dependency cycle (dependencies within an iteration + queue order) through "
            f"{plan.task_name(stuck)} on worker {where_queued[stuck]}: the plan would deadlock"
        )
    if any(loop.parent >= 0 for loop in plan.loops):
        _validate_nested_dependencies(plan, required_dependencies(plan))
        return
    # anc0: ancestors through same-iteration edges; anc1: through at most one carried edge
    anc0 = _ancestor_masks(order, preds)
    anc1 = [0] * n
    for t in order:
        acc = anc0[t]
        for p in preds[t]:
            acc |= anc1[p]
        for p in prev[t]:
            acc |= anc0[p] | (1 << p)
        anc1[t] = acc
    for t, need in enumerate(required_dependencies(plan)):
        for d in need:
            ok = anc1[t] if plan.carried(t, d) else anc0[t]
            if not (ok >> d) & 1:
                raise PlanError(
                    f"{plan.task_name(t)} reads or overwrites data of {plan.task_name(d)} "
                    f"{'(of the previous iteration) ' if plan.carried(t, d) else ''}but does not "
                    "depend on it (missing dependency)"
                )


def _operand_registers(ins: Instr) -> list[int]:
    if ins.op == "load_at":
        return [int(ins.b)]
    if ins.op in UNARY_OPS or ins.op in INT_UNARY_OPS:
        return [int(ins.a)]
    if ins.op in BINARY_OPS or ins.op in INT_BINARY_OPS:
        return [int(ins.a), int(ins.b)]
    if ins.op == "select":
        return [int(ins.a), int(ins.b), int(ins.c)]
    return []


def _is_first_iteration(prog: list[Instr], r: int) -> bool:
    """Register r is `load_iter == 0` (either operand order)."""
    ins = prog[r]
    if ins.op != "ieq":
        return False
    a, b = prog[int(ins.a)], prog[int(ins.b)]
    return {a.op, b.op} == {"load_iter", "const"} and (a if a.op == "const" else b).a == 0


def _validate_carried_reads(plan: Plan) -> None:
    """A read of the PREVIOUS iteration's value (a tensor written in a loop the reader is in too,
    by an op not before the reader) finds nothing written yet at the loop's first iteration. Plans
    only do that in the carry-in form `select(load_iter == 0, that value, init)`, which discards
    it there; anything else would read whatever the buffer held (different per executor)."""
    writer = {op.out: i for i, op in enumerate(plan.ops)}

    def carried(i: int, v: int) -> bool:
        w = writer.get(plan.views[v].tensor)
        return w is not None and w >= i and plan.common_depth(i, w) > 0

    for i, op in enumerate(plan.ops):
        if op.loop < 0:
            continue
        where = f"op {i} '{op.name}'"
        for v in (op.a_view, op.b_view) if op.kind == "matmul" else ():
            if carried(i, v):
                raise PlanError(
                    f"{where}: a matmul operand (view {v}) is the previous iteration's value, "
                    "which the first iteration has not written"
                )
        for name, prog in (("prologue", op.prologue), ("epilogue", op.epilogue)):
            for r, ins in enumerate(prog):
                if ins.op not in ("load", "load_at") or not carried(i, int(ins.a)):
                    continue
                uses = [x for x in prog[r + 1 :] if r in _operand_registers(x)]
                guarded = (
                    r != len(prog) - 1
                    and bool(uses)
                    and all(
                        x.op == "select"
                        and int(x.b) == r
                        and int(x.a) != r
                        and int(x.c) != r
                        and _is_first_iteration(prog, int(x.a))
                        for x in uses
                    )
                )
                if not guarded:
                    raise PlanError(
                        f"{where} {name} instruction {r}: reads view {int(ins.a)}, the previous "
                        "iteration's value, outside the carry-in form select(load_iter == 0, "
                        "it, init) (the first iteration would read a tensor not yet written)"
                    )


def _validate_aliased_reads_in_loops(plan: Plan) -> None:
    """An operand aliased by a result shares its buffer: once an op writes the result, the
    operand's bytes change. required_dependencies orders every writer after the operand's
    readers, which a loop cannot honour when both are in it (iteration k + 1 reads what iteration
    k wrote, where the plan means the operand as passed): refused."""
    from jax_ark._persistent._schedule import writer_ops

    writers = writer_ops(plan)
    read_by = [{plan.views[v].tensor for v, _ in _view_uses(plan, op)} for op in plan.ops]
    for r, spec in enumerate(plan.tensors):
        if spec.storage != "result" or spec.alias < 0:
            continue
        sources = {a for a in plan.args if plan.tensors[a].index == spec.alias}
        for j, op in enumerate(plan.ops):
            if not read_by[j] & sources:
                continue
            for i in writers.get(r, []):
                if plan.common_depth(i, j) > 0:
                    raise PlanError(
                        f"op {j} '{op.name}' reads operand {spec.alias}, which op {i} "
                        f"'{plan.ops[i].name}' updates in place (result tensor {r}) in the same "
                        "loop: a later iteration would read the updated buffer"
                    )


def _outside_loops(plan: Plan, i: int) -> bool:
    return not plan.loop_chain(i)


def _validate_store_chains(plan: Plan) -> None:
    """A tensor written by several window stores (a chain of updates of one buffer, stored in
    program order: required_dependencies orders each store after the one before; the op checks
    allow several writers only so) is read by no op until its last store: a read in between
    could not say which update it wants."""
    from jax_ark._persistent._schedule import writer_ops

    for t, ops in writer_ops(plan).items():
        if len(ops) < 2:
            continue
        for j, op in enumerate(plan.ops[: ops[-1] + 1]):
            if any(plan.views[v].tensor == t for v, _ in _view_uses(plan, op)):
                raise PlanError(
                    f"op {j} '{op.name}' reads tensor {t} '{plan.tensors[t].name}' before its "
                    f"last window store (op {ops[-1]}): only a read after the last store is "
                    "ordered"
                )


def _view_uses(plan: Plan, op) -> list[tuple[int, tuple[int, ...] | None]]:
    """(view, the iteration space it is read over; None = any element: LOAD_AT) of an op."""
    from jax_ark._persistent._schedule import epilogue_shape

    if op.kind == "matmul":
        return [(op.a_view, (op.B, op.M, op.K)), (op.b_view, (op.B, op.K, op.N))]
    if op.kind == "put":
        return [(op.a_view, (op.B, op.M, op.N))]
    walks_window = op.store_view >= 0 and not op.scatter_fold
    out_shape = tuple(op.iter_dims) if walks_window else epilogue_shape(plan, op)
    uses: list[tuple[int, tuple[int, ...] | None]] = []
    for prog, dims in ((op.prologue, tuple(op.iter_dims)), (op.epilogue, out_shape)):
        for ins in prog:
            if ins.op == "load":
                uses.append((int(ins.a), dims))
            elif ins.op == "load_at":
                uses.append((int(ins.a), None))
    return uses


def _check_store_view(plan: Plan, i: int, program: list[Instr], part: str) -> None:
    """Where op i's values go (a window store's epilogue values, a scatter fold's prologue
    values): its store view is a view of its output over iter_dims (each >= 1) that stays inside
    it, and store_at an integer register of that program."""
    op, where = plan.ops[i], f"op {i} '{plan.ops[i].name}'"
    space = tuple(op.iter_dims)
    if not 0 <= op.store_view < len(plan.views):
        raise PlanError(f"{where}: store view {op.store_view} out of range")
    if plan.views[op.store_view].tensor != op.out:
        raise PlanError(f"{where}: store view {op.store_view} is not a view of its output")
    if len(plan.views[op.store_view].strides) != len(space):
        raise PlanError(f"{where}: store view rank != len(iter_dims)")
    if min(space, default=1) < 1:
        raise PlanError(f"{where}: window iter_dims {list(space)} must be >= 1")
    _view_reach(plan, i, op.store_view, space)
    if not 0 <= op.store_at < len(program) or program[op.store_at].dtype not in INT_DTYPES:
        raise PlanError(f"{where}: store_at {op.store_at} is not an integer register of its {part}")


def _check_scatter_fold(plan: Plan, i: int) -> None:
    """A scatter fold (docs/plan_format.md, "Scatter folds"): a reduce op with kept_rank 0 whose
    store view (over iter_dims, inside its output) and prologue register store_at (int32) name
    the element each value folds into; one task, in no stacked slice; a combining kind whose
    values are of the output's kind."""
    op, where = plan.ops[i], f"op {i} '{plan.ops[i].name}'"
    out = plan.tensors[op.out]
    if op.kept_rank != 0 or op.reduce_kind not in SCATTER_FOLD_KINDS:
        raise PlanError(
            f"{where}: a scatter fold has kept_rank 0 and a combining kind, not "
            f"{op.reduce_kind!r} (arg kinds pick an index, not a value)"
        )
    if op.stacked:
        raise PlanError(f"{where}: a scatter fold cannot be stacked")
    _check_store_view(plan, i, op.prologue, "prologue")
    value_int = (op.reduce_kind in INT_REDUCES) or (
        op.reduce_kind == "last" and out.dtype in INT_DTYPES
    )
    if value_int != (out.dtype in INT_DTYPES):
        raise PlanError(
            f"{where}: a {op.reduce_kind} fold into {out.dtype} mixes integer bits and float values"
        )
    if sum(1 for task in plan.tasks if task.op == i) != 1:
        raise PlanError(f"{where}: a scatter fold must be exactly one task")
    for ins in op.prologue + op.epilogue:
        if ins.op in LOAD_OPS and plan.views[int(ins.a)].tensor == op.out:
            raise PlanError(
                f"{where}: a scatter fold's programs read its own output (the executors evaluate "
                "values in batches, so what they would see differs)"
            )


def _validate_stacked_reads(plan: Plan) -> None:
    """A stacked op of loop L writes slice k (forward; trip_count - 1 - k reversed) at L's
    iteration k. An op of L (or of a loop nested in L) reading that tensor at iteration k must
    read only slices written by then: those of iterations <= k when the writer comes first in
    the body, <= k - 1 when it reads the previous iteration's (from k = 1: the carry-in form
    discards k = 0). Otherwise it reads a slice no run has written yet (whatever the buffer
    holds: a stacked inbox's slice no peer has put, different per executor); dependencies cannot
    catch that, a stacked op's tasks write every slice. The bounds are affine in the
    iterations, so checking the corners of the iteration box suffices."""
    writer = {op.out: i for i, op in enumerate(plan.ops)}
    for r, op in enumerate(plan.ops):
        if op.loop < 0:
            continue
        chain = plan.loop_chain(r)
        for v, dims in _view_uses(plan, op):
            view = plan.views[v]
            w = writer.get(view.tensor)
            if w is None or not plan.ops[w].stacked or plan.ops[w].loop not in chain:
                continue
            wop, out = plan.ops[w], plan.tensors[view.tensor]
            trips = plan.loops[wop.loop].trip_count
            size = out.num_elements // trips  # elements of one slice
            if size == 0:
                continue
            span = 0
            if dims is not None:
                span = sum((d - 1) * s for d, s in zip(dims, view.strides, strict=False))
            # iteration variables: i of op's innermost loop (iter_stride), j of the one around
            # it (outer_iter_stride); k, L's iteration, is i when L is op's loop, else j
            inner = plan.loops[op.loop]
            ti = inner.trip_count
            tj = plan.loops[inner.parent].trip_count if inner.parent >= 0 else 1
            k_is_i = wop.loop == op.loop
            carried = w >= r
            i_min = 1 if carried and k_is_i else 0
            j_min = 1 if carried and not k_is_i else 0
            if i_min > ti - 1 or j_min > tj - 1:
                continue  # a one-iteration loop's previous iteration: the carry-in discards it
            for i, j in sorted({(a, b) for a in (i_min, ti - 1) for b in (j_min, tj - 1)}):
                k = i if k_is_i else j
                if dims is None:  # LOAD_AT: any element (clamped into the tensor)
                    lo, hi = 0, out.num_elements - 1
                else:
                    lo = view.offset + i * view.iter_stride + j * view.outer_iter_stride
                    hi = lo + span
                last = k - 1 if carried else k  # the last iteration whose slice is written
                if wop.stack_reversed:
                    ok = lo >= (trips - 1 - last) * size
                else:
                    ok = hi < (last + 1) * size
                if not ok:
                    raise PlanError(
                        f"op {r} '{op.name}': reads view {v} of tensor {view.tensor}, the "
                        f"stacked output of op {w} '{wop.name}', at slices its loop has not "
                        f"written yet at iteration {k} (elements {lo}..{hi}; slices of "
                        f"{size} elements)"
                    )


_UNROLL = 3  # iterations per loop the nested-loop dependency check unrolls


def _validate_nested_dependencies(plan: Plan, need: list[set[int]]) -> None:
    """Complete dependencies with nested loops: a carried dependency of an inner loop and one of
    the outer loop reach back different distances, so the "at most one carried edge" closure of
    flat loops would accept chains through the wrong loop. Instead the plan is unrolled to
    min(trip_count, 3) iterations per loop (every dependency reaches back at most one iteration
    of one loop, so three iterations hold every pattern: the first, one after a first and one
    after a generic one) into runs (task, iterations) with the executors' edges: each dependency's
    target run, the task's own previous run, and each worker's run order (its queue walked as the
    executors' cursors walk it). Every required dependency's target run must precede the run."""
    from jax_ark._persistent._reference import _Cursor

    small = dataclasses.replace(
        plan,
        loops=[
            dataclasses.replace(lp, trip_count=min(lp.trip_count, _UNROLL)) for lp in plan.loops
        ],
    )
    runs: dict[tuple[int, int], int] = {}  # (task, run index) -> node
    its_of: list[tuple[int, tuple[int, ...]]] = []
    preds: list[list[int]] = []
    for q in small.queues:
        cursor, last = _Cursor(small, q), -1
        while not cursor.done:
            if cursor.pending_check:  # a while loop: unrolled as if its predicate held
                cursor.resolve_check(True)
                continue
            t, its = cursor.current()
            node = len(preds)
            runs[(t, small.run_index(small.tasks[t].op, its))] = node
            its_of.append((t, its))
            preds.append([last] if last >= 0 else [])
            last = node
            cursor.advance()
    for node, (t, its) in enumerate(its_of):
        r = small.run_index(small.tasks[t].op, its)
        if r:
            preds[node].append(runs[(t, r - 1)])
        for d in small.tasks[t].deps:
            target = small.dependency_target(t, d, its)
            if target:
                preds[node].append(runs[(d, target - 1)])
    order, stuck = topological_order(preds)
    if stuck is not None:
        t, its = its_of[stuck]
        raise PlanError(
            f"dependency cycle through {plan.task_name(t)} at iterations {its}: the plan would "
            "deadlock"
        )
    anc = _ancestor_masks(order, preds)
    for node, (t, its) in enumerate(its_of):
        for d in need[t]:
            target = small.dependency_target(t, d, its)
            if target and not (anc[node] >> runs[(d, target - 1)]) & 1:
                raise PlanError(
                    f"{plan.task_name(t)} reads or overwrites data of {plan.task_name(d)} "
                    f"(run {target - 1} of it, before its own iterations {its}) but does not "
                    "depend on it (missing dependency)"
                )
