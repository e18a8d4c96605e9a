"""Communication seeds and mutations of the plan fuzzer (tests/test_plan_fuzz.py, run by
tests/plan_fuzz_worker.py): plans with put ops (default routing, routing tables of ppermute rings,
partial perms and dp x tp subgroups, stacked inboxes of collectives in loop bodies) and axis_index
(LOAD_RANK), mutated as JSON or binary words and run on EVERY rank of their group (8 CPU devices
in one process), each rank given the same mutated words. Outcomes as in plan_fuzz_worker: refused
(PlanError / the runtime's INVALID_ARGUMENT), or run and equal to interpret_group on the same plan;
a put or entry wait that times out (a hang, bounded by COMM_TIMEOUT_MS) is a failure.
"""

from __future__ import annotations

import copy
import json
import traceback
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from plan_fuzz_worker import (
    _INTERESTING,
    _denormal_const,
    _runtime_rejection,
    _same,
    _same_buffers,
    decode,
    mutate_binary,
    mutate_json,
    rounding_tolerance,
)

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import (
    BINARY_OPS,
    INT_BINARY_OPS,
    INT_UNARY_OPS,
    UNARY_OPS,
    Plan,
)
from jax_ark._persistent._reference import interpret, interpret_group
from jax_ark._persistent._validate import freeze

N = 8  # ranks of every seed's group
COMM_TIMEOUT_MS = 5_000  # every put / entry wait: a deadlock is a bounded failure, not a stuck CI
RING = [(i, (i + 1) % N) for i in range(N)]
PARTIAL = [(0, 3), (3, 5), (5, 0), (6, 6), (1, 2)]  # ranks 1, 4, 7 receive nothing: zeros


# ---- seeds: functions run inside jax.shard_map (local shapes) -----------------------------
def _ring(x):
    """ppermute in a ring: a routing table of one slot, every rank sending and receiving."""
    return jax.lax.ppermute(x * 2.0 + 1.0, "x", RING) - x


def _partial_perm(x, w):
    """A partial perm (three ranks get zeros) of a matmul's tiles, then more compute."""
    return jnp.tanh(jax.lax.ppermute(x @ w, "x", PARTIAL)) + x[:, :1]


def _dp_tp(x, w1, w2):
    """2x4 mesh: a TP psum over "y" (routed over 4 slots), a dp pmean over "x" (2 slots) and a
    ppermute within each "y" row; one group over both axes."""
    y = jax.lax.psum(jnp.tanh(x @ w1) @ w2, "y")
    return jax.lax.pmean(y, "x"), jax.lax.ppermute(y * 0.5, "y", [(0, 1), (1, 3), (3, 0)])


def _axis_index(v, ids):
    """axis_index (LOAD_RANK, no put op) over one axis, both axes, and in integer math."""
    i = jax.lax.axis_index("x")
    k = jax.lax.axis_index(("y", "x"))
    return v * (1 + i).astype(jnp.float32) + 10.0 * k, (ids * 3 + k) % 5


def _all_gather_scatter(x, w):
    """Default routing: all_gather -> matmul -> psum_scatter (B = group_size puts)."""
    g = jax.lax.all_gather(x, "x", tiled=True)
    return jax.lax.psum_scatter(jnp.tanh(g @ w), "x", scatter_dimension=0, tiled=True)


def _scan_psum(x, w1s, w2s):
    """A psum per layer of a scan over stacked weights: a stacked inbox, signals counting
    iterations."""

    def layer(h, ws):
        w1, w2 = ws
        return jax.lax.psum(jnp.tanh(h @ w1) @ w2, "x") + h, jnp.sum(h, axis=-1)

    return jax.lax.scan(layer, x, (w1s, w2s))


def _scan_psum_rows(x, ws):
    """A psum of part of a loop-written tensor (the put's source view covers rows 0..1 of 4,
    written by two row tiles): a source view moved by the iteration reaches other producers."""

    def layer(h, w):
        y = jnp.tanh(h @ w)
        return h + jax.lax.psum(y[:2], "x").sum(), jnp.max(y, axis=0)

    return jax.lax.scan(layer, x, ws)


def _fori_ring(v):
    """A ring ppermute of the carry in a fori_loop (a routed put in a loop)."""
    return jax.lax.fori_loop(
        0, 3, lambda i, c: jax.lax.ppermute(c, "x", RING) * 0.5 + i.astype(jnp.float32), v
    )


@dataclass
class CommSeed:
    fn: Any
    mesh: Mesh
    axes: tuple  # the mesh axes whose row-major index is the rank (the seed's group)
    per_rank: list[list[np.ndarray]]  # rank r's local inputs
    plan: Plan

    def run(self, body) -> list[list[np.ndarray]]:
        """Runs body(*local inputs) -> list of local outputs on every rank; returns each rank's."""
        n_in = len(self.per_rank[0])
        stacked = [np.stack([args[k] for args in self.per_rank]) for k in range(n_in)]

        def local(*g):
            return [o[None] for o in body(*[a[0] for a in g])]

        spec = P(self.axes)
        f = jax.shard_map(local, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False)
        outs = [np.asarray(o) for o in jax.block_until_ready(jax.jit(f)(*stacked))]
        return [[o[r] for o in outs] for r in range(N)]


def comm_seeds() -> list[CommSeed]:
    devices = np.array(jax.devices("cpu")[:N])
    line = Mesh(devices, ("x",))
    grid = Mesh(devices.reshape(2, 4), ("x", "y"))
    rng = np.random.default_rng(4321)

    def arr(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    def ranks(make):
        return [make() for _ in range(N)]

    specs = [
        (_ring, line, ("x",), ranks(lambda: [arr(4, 6)]), dict(num_workers=2, tile_m=2, tile_n=4)),
        (
            _partial_perm,
            line,
            ("x",),
            ranks(lambda: [arr(4, 8), arr(8, 4)]),
            dict(num_workers=2, tile_m=2, tile_n=2),
        ),
        (
            _dp_tp,
            grid,
            ("x", "y"),
            ranks(lambda: [arr(4, 6), arr(6, 4), arr(4, 6)]),
            dict(num_workers=2, tile_m=2, tile_n=4),
        ),
        (
            _axis_index,
            grid,
            ("x", "y"),
            ranks(lambda: [arr(3, 4), rng.integers(-9, 9, (3, 4)).astype(np.int32)]),
            dict(num_workers=2, tile_m=2, tile_n=2),
        ),
        (
            _all_gather_scatter,
            line,
            ("x",),
            ranks(lambda: [arr(2, 4), arr(4, 8)]),
            dict(num_workers=3, tile_m=2, tile_n=4),
        ),
        (
            _scan_psum,
            line,
            ("x",),
            ranks(lambda: [arr(2, 4), arr(3, 4, 4) * 0.5, arr(3, 4, 4) * 0.5]),
            dict(num_workers=2, tile_m=2, tile_n=2),
        ),
        (_fori_ring, line, ("x",), ranks(lambda: [arr(2, 4)]), dict(num_workers=2)),
        (
            _scan_psum_rows,
            line,
            ("x",),
            ranks(lambda: [arr(4, 4), arr(2, 4, 4) * 0.5]),
            dict(num_workers=2, tile_m=2, tile_n=4),
        ),
    ]
    seeds = []
    for fn, mesh, axes, per_rank, kw in specs:
        box: list[Plan] = []
        pf = ark.persistent(fn, **kw)

        def plan_it(*local, pf=pf, box=box):
            box.append(pf.plan(*local))
            return jax.tree_util.tree_leaves(pf(*local))

        seeds.append(_planned(CommSeed(fn, mesh, axes, per_rank, None), plan_it, box))
    return seeds


def _planned(seed: CommSeed, plan_it, box) -> CommSeed:
    """The seed with the plan persistent(fn) makes inside its shard_map (tracing only)."""
    n_in = len(seed.per_rank[0])
    stacked = [np.stack([args[k] for args in seed.per_rank]) for k in range(n_in)]

    def local(*g):
        return [o[None] for o in plan_it(*[a[0] for a in g])]

    spec = P(seed.axes)
    jax.make_jaxpr(
        jax.shard_map(local, mesh=seed.mesh, in_specs=spec, out_specs=spec, check_vma=False)
    )(*stacked)
    seed.plan = box[0]
    return seed


# ---- mutations aimed at the communication fields -----------------------------------------------
def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _route_value(rng: np.random.Generator, lo: int, hi: int, row: list) -> Any:
    """A routing table cell: in range (a valid plan), just outside, a duplicate of a neighbour,
    or garbage."""
    r = rng.random()
    if r < 0.45:
        return int(rng.integers(lo, hi + 1))
    if r < 0.6 and row:
        return row[int(rng.integers(len(row)))]
    return _pick(rng, [lo - 1, hi + 1, -(1 << 31), (1 << 31) - 1, 1 << 40, None, "x", 1.5, []])


def mutate_comm_json(d: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """One edit of a communication field of a plan dict (falls back to mutate_json when the
    chosen field does not exist in this plan)."""
    d = copy.deepcopy(d)
    n = d["comm"]["group_size"]
    ops = d["ops"]
    puts = [i for i, o in enumerate(ops) if o["kind"] == "put"]
    routed = [i for i in puts if "recv_from" in ops[i]]
    workspace = [t for t, s in enumerate(d["tensors"]) if s["storage"] == "workspace"]
    kind = int(rng.integers(13))
    if kind == 0 and routed:  # one routing table cell
        i = _pick(rng, routed)
        name = _pick(rng, ["recv_from", "send_row"])
        q = int(rng.integers(n))
        row = ops[i][name][q]
        b = int(rng.integers(len(row)))
        lo, hi = (-1, n - 1) if name == "recv_from" else (0, ops[i]["B"] - 1)
        row[b] = _route_value(rng, lo, hi, row)
        return d, f"ops[{i}].{name}[{q}][{b}] -> {row[b]!r}"
    if kind == 1 and routed:  # duplicates: one rank's row copied to another's, or a whole
        # column of no writer (-1), or a table of the wrong shape
        i = _pick(rng, routed)
        table = ops[i]["recv_from"]
        c = int(rng.integers(4))
        if c == 0:
            q, q2 = (int(x) for x in rng.integers(n, size=2))
            table[q] = list(table[q2])
            return d, f"ops[{i}].recv_from[{q}] = recv_from[{q2}]"
        if c == 1:
            b = int(rng.integers(len(table[0])))
            for row in table:
                row[b] = -1
            return d, f"ops[{i}].recv_from[*][{b}] = -1 (no writer)"
        if c == 2:
            table.pop(int(rng.integers(len(table))))
            return d, f"ops[{i}].recv_from: a rank's row dropped"
        table[int(rng.integers(len(table)))].append(0)
        return d, f"ops[{i}].recv_from: a row one slot longer"
    if kind == 2 and puts:  # a whole random routing table in range: a valid plan that must run
        i = _pick(rng, puts)
        B = ops[i]["B"]
        ops[i]["recv_from"] = rng.integers(-1, n, (n, B)).tolist()
        ops[i]["send_row"] = rng.integers(0, B, (n, B)).tolist()
        return d, f"ops[{i}]: a random routing table in range"
    if kind == 3 and puts:  # routing tables removed / on the wrong op / half of one
        i = _pick(rng, puts)
        c = int(rng.integers(3))
        if c == 0:
            ops[i].pop("recv_from", None)
            ops[i].pop("send_row", None)
            return d, f"ops[{i}]: routing table removed (default routing)"
        if c == 1 and "recv_from" in ops[i]:
            ops[i].pop("send_row")
            return d, f"ops[{i}]: send_row removed"
        j = int(rng.integers(len(ops)))
        ops[j]["recv_from"] = [[0] * max(1, ops[i]["B"])] * n
        ops[j]["send_row"] = [[0] * max(1, ops[i]["B"])] * n
        return d, f"ops[{j}] ({ops[j]['kind']}): a routing table"
    if kind == 4:  # the group
        c = int(rng.integers(4))
        if c == 0:
            d["comm"]["group_size"] = _pick(rng, [n - 1, n + 1, 1, 2 * n, 0, 4097])
            return d, f"comm.group_size -> {d['comm']['group_size']}"
        if c == 1:
            d["comm"]["axes"] = _pick(rng, [["y", "x"], ["x"], ["y"], ["z"], [], ["x", "x"]])
            return d, f"comm.axes -> {d['comm']['axes']}"
        if c == 2:
            d["comm"]["axis_sizes"] = _pick(rng, [[4, 2], [8], [2, 4], [n, 1], [1, n], []])
            return d, f"comm.axis_sizes -> {d['comm']['axis_sizes']}"
        del d["comm"]
        return d, "comm removed"
    if kind == 5 and puts:  # B, M, N of a put
        i = _pick(rng, puts)
        key = _pick(rng, ["B", "B", "M", "N"])
        ops[i][key] = _pick(rng, [ops[i][key] + 1, ops[i][key] - 1, 1, n, n + 1, 0])
        return d, f"ops[{i}].{key} -> {ops[i][key]}"
    if kind == 6 and puts:  # the stacked flags of a put (in a loop or not)
        i = _pick(rng, puts)
        c = int(rng.integers(3))
        if c == 0:
            ops[i]["stacked"] = not ops[i].get("stacked", False)
            return d, f"ops[{i}].stacked -> {ops[i]['stacked']}"
        if c == 1:
            ops[i]["stack_reversed"] = True
            return d, f"ops[{i}].stack_reversed -> True"
        ops[i]["loop"] = _pick(rng, [-1, 0, 1])
        return d, f"ops[{i}].loop -> {ops[i]['loop']}"
    if kind == 7 and puts:  # the inbox: shape, offset (overlapping another workspace tensor)
        i = _pick(rng, puts)
        inbox = d["tensors"][ops[i]["out"]]
        c = int(rng.integers(3))
        if c == 0 and len(workspace) > 1:
            other = d["tensors"][_pick(rng, [t for t in workspace if t != ops[i]["out"]])]
            inbox["byte_offset"] = other["byte_offset"] + _pick(rng, [0, 0, 256])
            return d, f"inbox of ops[{i}] at byte {inbox['byte_offset']} (another tensor's)"
        if c == 1:
            inbox["byte_offset"] = max(0, inbox["byte_offset"] + _pick(rng, [-256, 256, 512]))
            return d, f"inbox of ops[{i}] moved to byte {inbox['byte_offset']}"
        shape = inbox["shape"]
        k = int(rng.integers(len(shape)))
        shape[k] = _pick(rng, [shape[k] + 1, shape[k] - 1, 1, 2 * shape[k]])
        return d, f"inbox of ops[{i}] shape -> {shape}"
    if kind == 8 and len(puts) > 1:  # two put ops writing one inbox
        i, j = (int(x) for x in rng.choice(puts, 2, replace=False))
        ops[i]["out"] = ops[j]["out"]
        return d, f"ops[{i}] writes ops[{j}]'s inbox"
    if kind == 9 and puts:  # a put task's slot range: a slot with two tasks or none
        tasks = [t for t, x in enumerate(d["tasks"]) if x["op"] in puts]
        t = _pick(rng, tasks)
        key = _pick(rng, ["b0", "b1"])
        d["tasks"][t][key] += _pick(rng, [-1, 1])
        return d, f"tasks[{t}].{key} -> {d['tasks'][t][key]}"
    if kind == 11 and puts:  # a view of an inbox or a put's source moved by slices / rows
        inboxes = {ops[i]["out"] for i in puts}
        readers = [v for v, x in enumerate(d["views"]) if x["tensor"] in inboxes]
        readers += [ops[i]["a_view"] for i in puts]
        if readers:
            v = _pick(rng, readers)
            view = d["views"][v]
            shape = d["tensors"][view["tensor"]]["shape"]
            step = int(np.prod(shape[1:])) if shape else 1
            key = _pick(rng, ["offset", "offset", "iter_stride"])
            view[key] = max(0, view.get(key, 0) + _pick(rng, [-step, step, 2 * step, -1, 1]))
            if rng.random() < 0.3:
                view["iter_stride"] = _pick(rng, [0, step, -step])
            return d, f"views[{v}] (of an inbox) {key} -> {view[key]}"
    if kind == 10:  # LOAD_RANK in some epilogue (in a plan with a group: valid)
        what = insert_load_rank(d, rng)
        if what:
            return d, what
    return mutate_json(d, rng)


def _shifted(ins: list) -> list:
    """A JSON instruction with its register operands moved up by one (an instruction inserted
    before them)."""
    op = ins[0]
    regs = []
    if op == "load_at":
        regs = [3]
    elif op in UNARY_OPS or op in INT_UNARY_OPS:
        regs = [2]
    elif op in BINARY_OPS or op in INT_BINARY_OPS:
        regs = [2, 3]
    elif op == "select":
        regs = [2, 3, 4]
    return [v + 1 if k in regs and isinstance(v, int) else v for k, v in enumerate(ins)]


def insert_load_rank(d: dict, rng: np.random.Generator) -> str:
    """A LOAD_RANK as the first instruction of some op's epilogue (registers renumbered, so the
    program computes what it did); '' when no op has an epilogue."""
    progs = [(i, o) for i, o in enumerate(d["ops"]) if o.get("epilogue")]
    if not progs:
        return ""
    i, o = _pick(rng, progs)
    o["epilogue"] = [["load_rank", "int32", 0, 0, 0]] + [_shifted(x) for x in o["epilogue"]]
    if o.get("store_at", -1) >= 0:
        o["store_at"] += 1
    return f"ops[{i}].epilogue: load_rank inserted"


def _word(words: np.ndarray, at: int, value: int) -> None:
    words[at] = np.int64(value).astype(np.int32)


def mutate_comm_binary(words: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One or two words of a communication field set (falls back to mutate_binary)."""
    w = words.copy()
    h = [int(x) for x in words[:32]]
    ntasks, nops = h[5], h[6]
    put_ops = [i for i in range(nops) if int(words[h[14] + 40 * i]) == 4]
    kind = int(rng.integers(9))
    value = _pick(rng, _INTERESTING)
    if kind == 0:  # header: routes_at, num_counters, group_size (alone or with num_counters)
        c = int(rng.integers(4))
        if c == 0:
            v = _pick(rng, [0, h[27] - 2, h[27] + 2, h[23], h[30], value]) if h[27] else value
            _word(w, 27, v)
            return w, f"header.routes_at -> {int(w[27])}"
        if c == 1:
            _word(w, 25, _pick(rng, [ntasks, h[25] + 1, h[25] - 1, value]))
            return w, f"header.num_counters -> {int(w[25])}"
        g = _pick(rng, [0, h[31] - 1, h[31] + 1, 1, 4096, 4097, value])
        _word(w, 31, g)
        if c == 3:  # consistent with num_counters: only the call's buffers can tell
            _word(w, 25, ntasks * (1 + max(g, 0)) if -1 < g < 4097 else g)
        return w, f"header.group_size -> {g}" + (" with num_counters" if c == 3 else "")
    if kind == 1 and h[27]:  # the route section's own words and its table cells
        size = int(words[h[27]])
        c = int(rng.integers(3))
        if c == 0:
            _word(w, h[27], _pick(rng, [size - 1, size + 1, 0, -1, value]))
            return w, f"routes: length {size} -> {int(w[h[27]])}"
        if c == 1:
            _word(w, h[27] + 1, _pick(rng, [1, -1, value]))
            return w, f"routes: reserved word -> {int(w[h[27] + 1])}"
        at = h[27] + 2 + int(rng.integers(max(size, 1)))
        g = h[31]
        v = int(rng.integers(-1, g)) if rng.random() < 0.5 else _pick(rng, [-2, g, value])
        _word(w, at, v)
        return w, f"routes: word {at - h[27] - 2} -> {v}"
    if kind in (2, 3) and put_ops:  # a put op's B / M / N / route_plus1 / out / a_view
        i = _pick(rng, put_ops)
        r = h[14] + 40 * i
        field, off = _pick(rng, [("B", 16), ("B", 16), ("M", 18), ("N", 20), ("route_plus1", 38),
                                 ("route_plus1", 38), ("out", 1), ("a_view", 4)])  # fmt: skip
        old = int(words[r + off])
        v = _pick(rng, [old + 1, old - 1, 0, 1, h[31], value])
        _word(w, r + off, v)
        return w, f"op {i} (put).{field}: {old} -> {v}"
    if kind == 4:  # route_plus1 on an op that is not a put
        others = [i for i in range(nops) if i not in put_ops]
        if others:
            i = _pick(rng, others)
            _word(w, h[14] + 40 * i + 38, _pick(rng, [1, 2, value]))
            return w, f"op {i} (not a put).route_plus1 -> {int(w[h[14] + 40 * i + 38])}"
    if kind == 5 and put_ops and h[30]:  # the stacked word of a put in the loop section
        i = _pick(rng, put_ops)
        at = h[30] + 2 + 8 * int(words[h[30]]) + 2 * i
        c = _pick(rng, [(at + 1, 0), (at + 1, 2), (at + 1, 3), (at, -1), (at, 1)])
        _word(w, c[0], c[1])
        return w, f"op {i} (put) loop record word {c[0] - at} -> {c[1]}"
    if kind == 6 and put_ops:  # the inbox's tensor record: offset, first dim, element count
        i = _pick(rng, put_ops)
        t = int(words[h[14] + 40 * i + 1])
        r = h[12] + 24 * t
        ws = [k for k in range(h[7]) if int(words[h[12] + 24 * k + 2]) == 2 and k != t]
        c = int(rng.integers(3))
        if c == 0:
            other = int(words[h[12] + 24 * _pick(rng, ws) + 4]) if ws else 0
            v = _pick(rng, [other, other + 256, int(words[r + 4]) + 256, int(words[r + 4]) - 256])
            _word(w, r + 4, v)
            return w, f"inbox tensor {t} byte_offset -> {v}"
        if c == 1:
            _word(w, r + 8, int(words[r + 8]) + _pick(rng, [-1, 1]))
            return w, f"inbox tensor {t} dims[0] -> {int(w[r + 8])}"
        _word(w, r + 6, int(words[r + 6]) + _pick(rng, [-1, 1, int(words[r + 6])]))
        return w, f"inbox tensor {t} num_elements -> {int(w[r + 6])}"
    if kind == 7 and h[22]:  # an instruction becomes LOAD_RANK (int32)
        k = int(rng.integers(h[22] // 4))
        _word(w, h[21] + 4 * k, 5 | (4 << 16))
        return w, f"code: instruction {k} -> load_rank"
    return mutate_binary(words, rng)


# ---- running a case on every rank --------------------------------------------------------------
def run_comm_case(seed: int, index: int, seeds: list[CommSeed]) -> dict:
    rng = np.random.default_rng([seed, 7, index])
    s = seeds[index % len(seeds)]
    binary = rng.random() < 0.45
    targeted = rng.random() < 0.7
    result: dict[str, Any] = {"case": index, "kind": "comm", "mode": "binary" if binary else "json"}
    try:
        if binary:
            mutate = mutate_comm_binary if targeted else mutate_binary
            words, what = mutate(s.plan.to_binary(), rng)
            result["what"] = what
            try:
                decoded = freeze(decode(words, s.plan))
                _same_buffers(decoded, s.plan)
            except PlanError as e:
                decoded, result["python"] = None, f"rejected: {str(e)[:160]}"
            except Exception as e:  # noqa: BLE001  (garbage the test decoder cannot read)
                decoded, result["python"] = None, f"undecodable: {type(e).__name__}"

            def body(*local, words=words):
                return run_plan(s.plan, list(local), words=words, timeout_ms=COMM_TIMEOUT_MS)[0]

            try:
                got = s.run(body)
            except Exception as e:  # noqa: BLE001
                if not _runtime_rejection(e):
                    raise
                result["outcome"] = "runtime_rejected" if decoded is None else "error"
                result["detail"] = str(e)[:300]
                return result
            if decoded is None:  # ran on every rank, no crash / hang; Python rejects it
                result["outcome"] = "python_rejected"
                return result
            p = decoded
        else:
            mutate = mutate_comm_json if targeted else mutate_json
            mutated, what = mutate(s.plan.to_dict(), rng)
            result["what"] = what
            try:
                text = json.dumps(mutated)
            except (TypeError, ValueError):
                text = "{" + json.dumps(what)
            try:
                p = freeze(Plan.from_json(text))
                pf = ark.persistent(s.fn, plan=p, timeout_ms=COMM_TIMEOUT_MS)
                got = s.run(lambda *local: jax.tree_util.tree_leaves(pf(*local)))
            except PlanError:
                result["outcome"] = "python_rejected"
                return result
        if p.comm is None:  # no group (axis_index's comm removed and nothing else needs it)
            want = [interpret(p, *args) for args in s.per_rank]
        else:
            want = interpret_group(p, s.per_rank)
        tol = rounding_tolerance(p)
        if all(_same(g, r, tol) for g, r in zip(got, want, strict=True)):
            result["outcome"] = "ran_ok"
        elif _denormal_const(p):
            result["outcome"] = "ran_denormal"
        else:
            bad = [r for r in range(N) if not _same(got[r], want[r], tol)]
            result["outcome"], result["detail"] = "wrong", f"ranks {bad} differ"
    except Exception as e:  # noqa: BLE001
        result["outcome"] = "error"
        result["detail"] = "".join(traceback.format_exception_only(type(e), e))[-400:]
    return result


def run_load_rank_case(seed: int, index: int, bases) -> dict:
    """A plan without a group given LOAD_RANK (JSON: an inserted instruction; binary: an opcode
    rewritten): Python and the runtime must both refuse it."""
    rng = np.random.default_rng([seed, 8, index])
    fn, args, plan = bases[index % len(bases)]
    binary = rng.random() < 0.5
    result: dict[str, Any] = {
        "case": index,
        "kind": "load_rank",
        "mode": "binary" if binary else "json",
    }
    try:
        if binary:
            words = plan.to_binary()
            h = [int(x) for x in words[:32]]
            k = int(rng.integers(h[22] // 4))
            _word(words, h[21] + 4 * k, 5 | (4 << 16))
            result["what"] = f"code: instruction {k} -> load_rank"
            try:
                freeze(decode(words, plan))
                result["python"] = "accepted"
            except PlanError:
                pass
            try:
                jax.block_until_ready(run_plan(plan, args, timeout_ms=10_000, words=words)[0])
            except Exception as e:  # noqa: BLE001
                if not _runtime_rejection(e):
                    raise
                accepted = "python" in result
                result["outcome"] = "error" if accepted else "runtime_rejected"
                result["detail"] = str(e)[:300]
                return result
            result["outcome"], result["detail"] = (
                "error",
                "the runtime ran LOAD_RANK without a group",
            )
            return result
        d = plan.to_dict()
        result["what"] = insert_load_rank(d, rng)
        try:
            p = Plan.from_json(json.dumps(d))
            ark.persistent(fn, plan=p)
        except PlanError:
            result["outcome"] = "python_rejected"
            return result
        result["outcome"], result["detail"] = "error", "Python accepted LOAD_RANK without a group"
    except Exception as e:  # noqa: BLE001
        result["outcome"] = "error"
        result["detail"] = "".join(traceback.format_exception_only(type(e), e))[-400:]
    return result
