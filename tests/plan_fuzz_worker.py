"""Worker process of the plan fuzzer (tests/test_plan_fuzz.py): runs fuzz cases by index.

Reads case indices (one per line) on stdin and answers one JSON line per case on stdout. Case i
is derived from (seed, i) alone, so the parent can name a case that crashed or hung this process.
A case mutates a real plan either as JSON (then goes through the public path: Plan.from_json,
persistent(fn, plan=p)) or as binary words sent straight to the runtime (its own C++ check is the
last line of defence), and reports one outcome:
  python_rejected   PlanError from parsing / validation (binary: of the decoded words; the raw
                    words still went to the runtime, which must not crash or hang on them)
  runtime_rejected  binary words both Python and the runtime's check refuse
  ran_ok            it ran and equals the reference interpreter on the same (decoded) plan
  ran_denormal      it ran, differs, and has a denormal constant (see _denormal_const)
  wrong             it ran and differs from the reference interpreter      (a fuzzer failure)
  error             anything else escaped (a fuzzer failure)
"""

from __future__ import annotations

import copy
import json
import struct
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import (
    DTYPE_CODES,
    OP_KIND_CODES,
    OPCODES,
    REDUCE_CODES,
    STORAGE_CODES,
    CommGroup,
    Instr,
    Loop,
    Op,
    Plan,
    Task,
    TensorSpec,
    View,
)
from jax_ark._persistent._reference import interpret
from jax_ark._persistent._validate import freeze

_INTERESTING = [
    -1, 0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, 1 << 32,
    1 << 62, (1 << 63) - 1, -(1 << 63), -(1 << 31),
]  # fmt: skip


def _f0(x, w):
    return jnp.tanh(x @ w) * 2.0 + jnp.sum(x, axis=-1, keepdims=True) ** 3


def _f1(x, g, w1, w2):
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g
    return x + jax.nn.silu(h @ w1) @ w2


def _f2(x, wq, wk):
    q, k = x @ wq, x @ wk
    return jax.nn.softmax(q @ k.T, axis=-1), jnp.max(q, axis=0)


_RAMP = np.linspace(-1.0, 2.0, 12, dtype=np.float32).reshape(3, 4)  # a constant operand of the plan


def _f3(x):
    return jnp.maximum(x * _RAMP, 0.5).T


def _f4(table, ids, cache, row, pos):
    """Plan v2: a gather (LOAD_AT at a device index), a dynamic_update_slice of an input nothing
    else reads (a window store into its buffer, aliased to the output), integer / uint32 math and
    an argmax."""
    emb = table[ids]
    new = jax.lax.dynamic_update_slice(cache, row * 2.0 + emb[:1], (pos, 0))
    return new, (ids * 3 + pos) % 5, ids.astype(jnp.uint32) >> 1, jnp.argmax(emb, axis=-1)


def _f5(x, ws, bs):
    """Plan v3: a scan over stacked weights (views with an iteration stride), a carry, a stacked
    output and a loop counter used as a device index."""

    def body(c, wb):
        h, i = c
        w, b = wb
        h = jnp.tanh(h @ w + b) + jax.lax.dynamic_slice(bs, (i, 0), (1, 4))
        return (h, i + 1), jnp.sum(h, axis=-1)

    (h, _), ys = jax.lax.scan(body, (x, jnp.int32(0)), (ws, bs))
    return h, ys


def _f6(x, w, cache):
    """Plan v3 loop extensions: a reversed scan nested in a fori_loop (parent loop, negative and
    outer iteration strides, a reversed stacked output) and an in-place carry (a window store in
    a loop, aliased to the cache input)."""

    def outer(i, c):
        h, cache = c
        h2, ys = jax.lax.scan(lambda g, wl: (jnp.tanh(g @ wl), g[0]), h, w, reverse=True)
        cache = jax.lax.dynamic_update_slice(cache, ys[:1] + h2[:1], (i, 0))
        return h2 * 0.5, cache

    return jax.lax.fori_loop(0, 3, outer, (x, cache))


def _f7(a):
    """Plan v3 while loop: a device predicate (stacked bool slots) and a step counter."""

    def cond(c):
        return (jnp.max(jnp.abs(c[0] - c[1])) > 1e-3) & (c[2] < 20)

    return jax.lax.while_loop(cond, lambda c: (0.5 * (c[0] + a / c[0]), c[0], c[2] + 1),
                              (a + 1.0, a * 0.0, jnp.int32(0)))  # fmt: skip


def _f8(parts, i, j, buf):
    """Chains of window stores into one tensor: from a zero fill (overlapping run-time windows,
    each store ordered after the one before; a one-point scatter whose store is dropped when
    the point is out of range) and from an input nothing else reads (a two-point scatter)."""
    out = jnp.zeros((6, 4), jnp.float32)
    out = jax.lax.dynamic_update_slice(out, jnp.tanh(parts[:2]), (i, 0))
    out = out.at[j + 4].set(parts[0] - 1.0)  # j = 2: out of range, dropped
    out = jax.lax.dynamic_update_slice(out, parts[2:5] * 2.0, (j, 0))
    buf = jax.lax.dynamic_update_slice(buf, jnp.sin(parts[:1]) @ parts[1:5], (j, 0))
    buf = buf.at[jnp.stack([i, j + 9])].set(parts[1:3])  # two points, the second dropped
    return out, jax.lax.dynamic_update_slice(buf, parts[4:], (i, 0))


def base_cases() -> list[tuple[Any, list[np.ndarray], Plan]]:
    rng = np.random.default_rng(1234)

    def arr(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    cases = [
        (_f0, [arr(8, 16), arr(16, 12)], dict(num_workers=2, tile_m=4, tile_n=8)),
        (
            _f1,
            [arr(6, 16), arr(16), arr(16, 24), arr(24, 16)],
            dict(num_workers=3, tile_m=4, tile_n=8),
        ),
        (_f2, [arr(8, 8), arr(8, 8), arr(8, 8)], dict(num_workers=2, tile_m=4, tile_n=4)),
        (_f3, [arr(3, 4)], dict(num_workers=2, tile_m=2, tile_n=2)),
        (
            _f4,
            [arr(7, 5), np.array([3, -2, 6, 9], np.int32), arr(6, 5), arr(1, 5), np.int32(4)],
            dict(num_workers=2, tile_m=2, tile_n=4),
        ),
        (_f5, [arr(3, 4), arr(5, 4, 4), arr(5, 4)], dict(num_workers=3, tile_m=2, tile_n=2)),
        (_f6, [arr(2, 4), arr(3, 4, 4), arr(3, 4)], dict(num_workers=3, tile_m=2, tile_n=2)),
        (
            _f7,
            [np.abs(arr(2, 4)) + 0.5],
            dict(num_workers=2, tile_m=2, tile_n=2, max_while_iterations=30),
        ),
        (
            _f8,
            [arr(5, 4), np.int32(1), np.int32(2), arr(5, 4)],
            dict(num_workers=3, tile_m=2, tile_n=2),
        ),
    ]
    return [(fn, args, ark.plan(fn, *args, **kw)) for fn, args, kw in cases]


# ---- JSON mutations ------------------------------------------------------------------------------
def _value(rng: np.random.Generator, orig: Any) -> Any:
    r = rng.random()
    if r < 0.1:  # type confusion
        return [None, "x", 1.5, [], {}, True, float("nan"), 2**70][rng.integers(8)]
    if isinstance(orig, int) and not isinstance(orig, bool) and r < 0.45:
        return orig + int(rng.choice([-2, -1, 1, 2, orig if orig else 1]))
    return _INTERESTING[rng.integers(len(_INTERESTING))]


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every leaf / list path of the plan dict except constants' base64 data."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("format", "source", "name") or (prefix[:1] == ("constants",) and k == "data"):
                continue
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        out.append(prefix)
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    else:
        out.append(prefix)
    return out


def mutate_json(d: dict, rng: np.random.Generator) -> tuple[dict, str]:
    d = copy.deepcopy(d)
    paths = [p for p in _paths(d) if p]
    kind = rng.random()
    if kind < 0.15:  # structural edits of dependencies and queues
        t = int(rng.integers(len(d["tasks"])))
        deps = d["tasks"][t]["deps"]
        choice = rng.integers(5)
        if choice == 0 and deps:
            deps.pop(int(rng.integers(len(deps))))
            what = f"tasks[{t}].deps: delete one"
        elif choice == 1:
            deps.append(int(rng.integers(len(d["tasks"]))))
            what = f"tasks[{t}].deps: add one"
        else:
            q = d["queues"][int(rng.integers(len(d["queues"])))]
            if len(q) >= 2:
                i, j = rng.choice(len(q), 2, replace=False)
                q[i], q[j] = q[j], q[i]
            what = "queues: swap two entries"
        return d, what
    if kind < 0.25:  # programs: replace an opcode / dtype name, truncate or extend
        with_code = [o for o in d["ops"] if o["epilogue"] or o["prologue"]]  # not put ops
        op = with_code[int(rng.integers(len(with_code)))]
        prog = op["epilogue"] if rng.random() < 0.7 or not op["prologue"] else op["prologue"]
        k = int(rng.integers(len(prog)))
        c = rng.integers(4)
        if c == 0:
            prog[k][0] = list(OPCODES)[rng.integers(len(OPCODES))]
        elif c == 1:
            prog[k][1] = list(DTYPE_CODES)[rng.integers(len(DTYPE_CODES))]
        elif c == 2:
            del prog[k:]
        else:
            prog.append(["add", "float32", k, max(k - 1, 0), 0])
        return d, f"{op['name']} program edit {c} at {k}"
    path = paths[rng.integers(len(paths))]
    target = d
    for key in path[:-1]:
        target = target[key]
    orig = target[path[-1]]
    if isinstance(orig, list):
        target[path[-1]] = [] if rng.random() < 0.5 else orig + [_value(rng, 0)]
    else:
        target[path[-1]] = _value(rng, orig)
    return d, f"{'.'.join(map(str, path))}: {orig!r:.30} -> {target[path[-1]]!r:.30}"


# ---- binary mutations ----------------------------------------------------------------------------
_HEADER_FIELDS = 32


def mutate_binary(words: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One word (or an int64 pair) of a section set to an interesting value. Dependency, dependency
    offset and queue words only get values no valid plan has (out of range, self, ...): a
    in-range rewrite there can drop a needed dependency, a race the runtime does not promise to
    catch (Plan.validate() does)."""
    w = words.copy()
    h = words[:32]
    ntasks, nworkers, nedges = int(h[5]), int(h[4]), int(h[18])
    sections = {
        "header": (0, _HEADER_FIELDS),
        "tensors": (int(h[12]), 24 * int(h[7])),
        "views": (int(h[13]), 16 * int(h[8])),
        "ops": (int(h[14]), 40 * int(h[6])),
        "tasks": (int(h[15]), 8 * ntasks),
        "dep_offsets": (int(h[16]), ntasks + 1),
        "deps": (int(h[17]), nedges),
        "queue_offsets": (int(h[19]), nworkers + 1),
        "queues": (int(h[20]), ntasks),
        "code": (int(h[21]), int(h[22])),
    }
    if h[30]:  # v3 loop section: [num_loops, 0], loop records, op records, iteration strides
        sections["loops"] = (int(h[30]), 2 + 8 * int(words[h[30]]) + 2 * int(h[6]) + 2 * int(h[8]))
    if h[27]:  # v3 route section: [route_words, 0], routing tables
        sections["routes"] = (int(h[27]), 2 + int(words[h[27]]))
    names = [k for k, (_, n) in sections.items() if n > 0]
    name = names[rng.integers(len(names))]
    at, n = sections[name]
    i = at + int(rng.integers(n))
    if name == "deps":
        owner = (
            int(np.searchsorted(words[int(h[16]) : int(h[16]) + ntasks + 1], i - at, "right")) - 1
        )
        value = int(rng.choice([-1, ntasks, ntasks + 5, (1 << 31) - 1, -(1 << 31), owner]))
    elif name == "dep_offsets":
        value = int(rng.choice([-1, nedges + 1, (1 << 31) - 1, -(1 << 31)]))
    elif name == "queues":
        value = int(rng.choice([-1, ntasks, (1 << 31) - 1, int(words[at + (i - at + 1) % n])]))
    else:
        value = _INTERESTING[rng.integers(len(_INTERESTING))]
        if rng.random() < 0.3:
            value = int(words[i]) + int(rng.choice([-1, 1, 2]))
    if name in ("tensors", "views", "ops", "header") and (i - at) % 2 == 0 and rng.random() < 0.5:
        lo, hi = struct.unpack(
            "<ii", struct.pack("<q", value if -(1 << 63) <= value < 1 << 63 else -1)
        )
        w[i] = lo
        if i + 1 < len(w):
            w[i + 1] = hi
        return w, f"{name} word {i - at}: int64 {value}"
    w[i] = np.int32(np.int64(value).astype(np.int32)) if -(1 << 63) <= value < 1 << 63 else -1
    return w, f"{name} word {i - at}: {int(words[i])} -> {int(w[i])}"


def _rev(table: dict[str, int], code: int, what: str) -> str:
    for k, v in table.items():
        if v == code:
            return k
    raise PlanError(f"decode: unknown {what} code {code}")


def decode(words: np.ndarray, base: Plan) -> Plan:
    """The Plan the binary words describe (constants, num_inputs and names from `base`); the
    runtime accepted these words, so offsets and counts are in range."""
    w = np.asarray(words, dtype=np.int32)
    h = [int(x) for x in w[:32]]

    def i64(k: int) -> int:
        return struct.unpack("<q", struct.pack("<ii", int(w[k]), int(w[k + 1])))[0]

    tensors = []
    for t in range(h[7]):
        r = h[12] + 24 * t
        rank = int(w[r + 1])
        shape = tuple(i64(r + 8 + 2 * d) for d in range(rank))
        tensors.append(
            TensorSpec(
                f"t{t}",
                shape,
                _rev(DTYPE_CODES, int(w[r]), "dtype"),
                _rev(STORAGE_CODES, int(w[r + 2]), "storage"),
                int(w[r + 3]),
                i64(r + 4),
                alias=int(w[r + 20]) - 1,
            )
        )
    # v3 loop section (header word 30)
    num_loops = int(w[h[30]]) if h[30] else 0
    loop_rec = h[30] + 2
    op_rec = loop_rec + 8 * num_loops
    stride_rec = op_rec + 2 * h[6]
    outer_rec = stride_rec + 2 * h[8] if num_loops and int(w[h[30] + 1]) & 1 else 0
    loops = [
        Loop(
            i64(loop_rec + 8 * k),
            int(w[loop_rec + 8 * k + 2]),
            int(w[loop_rec + 8 * k + 3]),
            parent=int(w[loop_rec + 8 * k + 4]) - 1,
            pred_op=int(w[loop_rec + 8 * k + 5]) - 1,
        )
        for k in range(num_loops)
    ]
    views = []
    for v in range(h[8]):
        r = h[13] + 16 * v
        views.append(
            View(
                int(w[r]),
                i64(r + 2),
                tuple(i64(r + 4 + 2 * d) for d in range(int(w[r + 1]))),
                i64(stride_rec + 2 * v) if num_loops else 0,
                i64(outer_rec + 2 * v) if outer_rec else 0,
            )
        )

    def program(at: int, n: int) -> list[Instr]:
        out = []
        for k in range(n):
            c = h[21] + 4 * (at + k)
            word0, a, b, cc = (int(x) for x in w[c : c + 4])
            op = _rev(OPCODES, word0 & 0xFFFF, "opcode")
            dtype = _rev(DTYPE_CODES, (word0 >> 16) & 0xFF, "dtype")
            val: float | int = a
            if op == "const" and dtype not in ("int32", "uint32"):
                val = struct.unpack("<f", struct.pack("<i", a))[0]
            out.append(Instr(op, dtype, val, b, cc))
        return out

    # v3 communication: the group (its size from word 31, its axes the call's) and the routing
    # tables of put ops (route section at word 27: [route_words, 0], then each op's recv_from and
    # send_row, [group_size][B] each)
    group = h[31]
    comm = None
    if group:
        if base.comm is None:
            raise PlanError("decode: a communication group, the call has none")
        comm = CommGroup(base.comm.axes, group, base.comm.axis_sizes)

    def route_tables(at: int, slots: int) -> dict:
        if at < 0:
            return {}
        if not h[27] or not 1 <= slots <= group:
            raise PlanError("decode: a routing table without a route section or slots")
        cells = group * slots
        first = h[27] + 2 + at
        if at + 2 * cells > int(w[h[27]]):
            raise PlanError("decode: a routing table outside the route section")
        table = w[first : first + 2 * cells].reshape(2, group, slots).tolist()
        return {"recv_from": table[0], "send_row": table[1]}

    ops = []
    for i in range(h[6]):
        r = h[14] + 40 * i
        f = [int(x) for x in w[r : r + 16]]
        kind = _rev(OP_KIND_CODES, f[0], "op kind")
        store_view, store_at = int(w[r + 36]) - 1, int(w[r + 37]) - 1
        spaced = kind == "reduce" or store_view >= 0  # iter_dims: a reduce's or a window's
        ops.append(
            Op(
                name=base.ops[i].name if i < len(base.ops) else f"op{i}",
                kind=kind,
                out=f[1],
                B=i64(r + 16),
                M=i64(r + 18),
                N=i64(r + 20),
                K=i64(r + 22),
                acc_dtype=_rev(DTYPE_CODES, f[2], "dtype"),
                reduce_kind=_rev(REDUCE_CODES, f[3], "reduce") if kind == "reduce" else "sum",
                a_view=f[4],
                b_view=f[5],
                iter_dims=tuple(i64(r + 24 + 2 * d) for d in range(f[6])) if spaced else (),
                kept_rank=f[7] if kind == "reduce" else 0,
                prologue=program(f[8], f[9]) if kind == "reduce" else [],
                epilogue=program(f[10], f[11]),
                tile_m=f[14],
                tile_n=f[15],
                store_view=store_view,
                store_at=store_at,
                loop=int(w[op_rec + 2 * i]) if num_loops else -1,
                stacked=bool(w[op_rec + 2 * i + 1]) if num_loops else False,
                stack_reversed=int(w[op_rec + 2 * i + 1]) == 2 if num_loops else False,
                **route_tables(int(w[r + 38]) - 1, i64(r + 16)),
            )
        )
    offs = [int(x) for x in w[h[16] : h[16] + h[5] + 1]]
    deps = [int(x) for x in w[h[17] : h[17] + h[18]]]
    tasks = []
    for t in range(h[5]):
        r = h[15] + 8 * t
        f = [int(x) for x in w[r : r + 8]]
        tasks.append(Task(f[0], f[2], f[3], f[4], f[5], f[6], f[7], deps[offs[t] : offs[t + 1]]))
    qoffs = [int(x) for x in w[h[19] : h[19] + h[4] + 1]]
    qs = [int(x) for x in w[h[20] : h[20] + h[5]]]
    queues = [qs[qoffs[k] : qoffs[k + 1]] for k in range(h[4])]
    by_index = {}
    for t, s in enumerate(tensors):
        by_index.setdefault((s.storage, s.index), t)
    args = [by_index[("arg", k)] for k in range(h[9])]
    outputs = [by_index[("result", k)] for k in range(h[10])]
    constants = {
        t: base.constants[b] for t, b in zip(args, base.args, strict=True) if b in base.constants
    }
    plan = Plan(
        num_workers=h[4],
        tensors=tensors,
        views=views,
        ops=ops,
        tasks=tasks,
        queues=queues,
        num_inputs=base.num_inputs,
        args=args,
        outputs=outputs,
        constants=constants,
        workspace_bytes=i64(28),
        version=h[1],
        loops=loops,
        comm=comm,
    )
    # Fields the Plan has no place for (reserved words, num_elements, unused dims...) must be what
    # the encoder writes: words that are not the encoding of any plan are not a plan.
    again = plan.to_binary()
    if again.shape != w.shape or not np.array_equal(again, w):
        raise PlanError("decode: the words are not the encoding of any plan")
    return plan


def _same_buffers(p: Plan, base: Plan) -> None:
    """The call's buffers are the base plan's (what persistent() checks against the arguments)."""
    have = p.comm.group_size if p.comm else 0
    want = base.comm.group_size if base.comm else 0
    if have != want:  # the call's comm operand (and counters) are for the base plan's group
        raise PlanError(f"a group of {have} ranks is not the call's {want}")
    if max(p.workspace_bytes, 1) != max(base.workspace_bytes, 1):
        raise PlanError(f"workspace of {p.workspace_bytes} bytes is not the call's")
    for a, b in zip(p.args + p.outputs, base.args + base.outputs, strict=True):
        ta, tb = p.tensors[a], base.tensors[b]
        if (ta.shape, ta.dtype) != (tb.shape, tb.dtype):
            raise PlanError(
                f"tensor {a}: {ta.dtype}{ta.shape} is not the call's {tb.dtype}{tb.shape}"
            )
        if ta.alias != tb.alias:  # the call aliases (input_output_aliases) as the base plan says
            raise PlanError(f"tensor {a}: alias {ta.alias} is not the call's {tb.alias}")


# ---- running a case ------------------------------------------------------------------------------
def rounding_tolerance(p: Plan) -> float:
    """Relative tolerance of a comparison with the reference: float32's, or one ulp of a 16-bit
    dtype the plan rounds to. The executor's libm transcendentals and numpy's differ by an ulp of
    float32 on many inputs (tanh: a third of them, measured), and rounding such a value to float16
    / bfloat16 near a tie moves it by one ulp of that dtype (tanh then float16: 3 in 65536)."""
    dtypes = {ins.dtype for op in p.ops for ins in op.prologue + op.epilogue}
    dtypes |= {t.dtype for t in p.tensors} | {op.acc_dtype for op in p.ops}
    if "bfloat16" in dtypes:
        return 1.6e-2  # 2 ulp of bfloat16 (8 bits of mantissa)
    if "float16" in dtypes:
        return 2e-3  # 2 ulp of float16 (11 bits)
    return 1e-4


def _same(got: list, want: list, tol: float = 1e-4) -> bool:
    if len(got) != len(want):
        return False
    for g, r in zip(got, want, strict=True):
        g, r = np.asarray(g), np.asarray(r)
        if np.issubdtype(g.dtype, np.integer) or np.issubdtype(r.dtype, np.integer):
            if g.shape != r.shape or g.dtype != r.dtype or not np.array_equal(g, r):
                return False  # integers are exact
            continue
        g = np.asarray(g).astype(np.float32)
        r = np.asarray(r).astype(np.float32)
        if g.shape != r.shape:
            return False
        # a 16-bit rounding error is relative to the values rounded, which a sum may exceed
        finite = np.abs(r[np.isfinite(r)])
        atol = 1e-5 if tol <= 1e-4 else tol * max(1.0, float(finite.max(initial=0.0)))
        if not np.allclose(g, r, rtol=tol, atol=atol, equal_nan=True):
            return False
    return True


def _denormal_const(p: Plan) -> bool:
    """A nonzero float32 denormal constant: the executor runs in the caller's (XLA's) floating-point
    mode, which treats denormal inputs as zero like jax.jit does (rsqrt(1e-45) = inf), while the
    numpy reference keeps them. Such a case ran (no crash, no hang) but is not compared."""
    tiny = np.finfo(np.float32).tiny
    return any(
        ins.op == "const" and 0 < abs(float(ins.a)) < tiny
        for op in p.ops
        for ins in op.prologue + op.epilogue
    )


def _runtime_rejection(e: Exception) -> bool:
    return "INVALID_ARGUMENT" in str(e) and "ark_persistent" in str(e)


def guard_agrees(e: Exception, plan: Plan | None, reference) -> bool:
    """The executor stopped a while loop at its guard (RESOURCE_EXHAUSTED, "did not end within":
    a bounded, documented error for a loop whose predicate stays true), and the reference
    interpreter stops the same plan at its guard too (an edited predicate that never turns
    false). `reference()` interprets the plan; plan None: Python refused the words, which the
    runtime may still run into the guard."""
    if "RESOURCE_EXHAUSTED" not in str(e) or "did not end within" not in str(e):
        return False
    if plan is None:
        return True
    try:
        reference()
    except PlanError as ref:
        return "did not end within" in str(ref)
    return False


def run_case(seed: int, index: int, bases) -> dict:
    rng = np.random.default_rng([seed, index])
    fn, args, plan = bases[index % len(bases)]
    binary = rng.random() < 0.4
    result: dict[str, Any] = {"case": index, "mode": "binary" if binary else "json"}
    checked: Plan | None = None  # the plan Python accepted, once known
    try:
        if binary:
            # Both layers judge the same words: Python (decode + validate, as for any plan it
            # accepts) and the runtime's own check (the words go to it directly, no Python check).
            words, what = mutate_binary(plan.to_binary(), rng)
            result["what"] = what
            try:
                decoded = freeze(decode(words, plan))
                _same_buffers(decoded, plan)
            except PlanError as e:
                decoded, result["python"] = None, f"rejected: {str(e)[:160]}"
            except Exception as e:  # noqa: BLE001  (garbage the test decoder cannot read)
                decoded, result["python"] = None, f"undecodable: {type(e).__name__}"
            checked = decoded
            try:
                outs = jax.block_until_ready(
                    run_plan(plan, args, timeout_ms=10_000, words=words)[0]
                )
            except Exception as e:  # noqa: BLE001
                if not _runtime_rejection(e):
                    raise
                # a plan Python accepts must run: the runtime refusing it is a bug too
                result["outcome"] = "runtime_rejected" if decoded is None else "error"
                result["detail"] = str(e)[:300]
                return result
            if decoded is None:  # ran safely (no crash / hang); Python rejects it: PlanError
                result["outcome"] = "python_rejected"
                return result
            want = interpret(decoded, *args)
        else:
            mutated, what = mutate_json(plan.to_dict(), rng)
            result["what"] = what
            try:
                text = json.dumps(mutated)
            except (TypeError, ValueError):
                text = "{" + json.dumps(what)
            try:
                p = Plan.from_json(text)
                fast = ark.persistent(fn, plan=p, timeout_ms=10_000)
                checked = freeze(p)
                outs = jax.tree_util.tree_leaves(jax.block_until_ready(fast(*args)))
            except PlanError:
                result["outcome"] = "python_rejected"
                return result
            want = interpret(fast.plan(*args), *args)
        if _same(outs, want, rounding_tolerance(decoded if binary else fast.plan(*args))):
            result["outcome"] = "ran_ok"
        elif _denormal_const(decoded if binary else fast.plan(*args)):
            result["outcome"] = "ran_denormal"  # see _denormal_const
        else:
            result["outcome"] = "wrong"
    except Exception as e:  # noqa: BLE001
        if guard_agrees(e, checked, lambda: interpret(checked, *args)):
            result["outcome"] = "guard_exceeded"
            return result
        result["outcome"] = "error"
        result["detail"] = "".join(traceback.format_exception_only(type(e), e))[-400:]
    return result


def main() -> None:
    """Lines `plain <i>` (a plan without communication), `comm <i>` (a communication plan run on
    all 8 ranks of its group, tests/plan_fuzz_comm.py) or `load_rank <i>`."""
    seed = int(sys.argv[1])
    bases = base_cases()
    comm_seeds = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, index = line.split()
        if kind == "plain":
            result = run_case(seed, int(index), bases)
        else:
            import plan_fuzz_comm

            if kind == "load_rank":
                result = plan_fuzz_comm.run_load_rank_case(seed, int(index), bases)
            else:
                if comm_seeds is None:  # planned once per worker process, when first needed
                    comm_seeds = plan_fuzz_comm.comm_seeds()
                result = plan_fuzz_comm.run_comm_case(seed, int(index), comm_seeds)
        result.setdefault("kind", kind)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
