"""The plan is untrusted input (issue 8, items 1-5): frozen plans, the runtime's own check of the
binary plan, validation of racy / garbage-reading / unbounded plans, PlanError with field paths,
bounded worker threads, and a chaos mode that catches a missing dependency."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close, random_args
from subprocess_env import TESTS_DIR, subprocess_env

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import REDUCE_CODES, Instr, TensorSpec, View
from jax_ark._persistent._reference import interpret

HEADER = {"tensors_at": 12, "views_at": 13, "ops_at": 14, "tasks_at": 15, "code_at": 21}


def _fn(x, w):
    return jnp.tanh(x @ w) * 2.0 + jnp.sum(x, axis=-1, keepdims=True) ** 3


@pytest.fixture
def setup(rng):
    args = random_args(rng, [(8, 16), (16, 12)])
    plan = ark.plan(_fn, *args, num_workers=2, tile_m=4, tile_n=8)
    return plan, args, np.asarray(jax.jit(_fn)(*args))


def _runtime_rejects(plan, args, words=None, match="ark_persistent: "):
    with pytest.raises(Exception, match=match) as e:
        jax.block_until_ready(run_plan(plan, args, timeout_ms=5000, words=words)[0])
    assert "INVALID_ARGUMENT" in str(e.value)


def _op_word(plan, words, op: int, field: int) -> int:
    return int(words[HEADER["ops_at"]]) + 40 * op + field


# ---- item 1: frozen plans, the runtime's own check ----------------------------------------------
def test_plan_edited_after_acceptance_does_not_run(setup):
    plan, args, want = setup
    fast = ark.persistent(_fn, plan=plan)
    v = next(i for i, v in enumerate(plan.views) if len(v.strides) == 3)
    plan.views[v] = View(plan.views[v].tensor, 0, (1 << 62, 1 << 62, 1 << 62))  # edit after
    plan.ops[0].B = 1 << 40
    plan.tasks[0].b1 = 1 << 30
    assert_close(fast(*args), want, 2e-5)
    got = fast.plan(*args)  # a copy: editing it does not reach the frozen plan either
    got.tasks.clear()
    assert_close(fast(*args), want, 2e-5)
    with pytest.raises(PlanError):
        ark.persistent(_fn, plan=plan)


def _matmul_op(plan) -> int:
    return next(i for i, op in enumerate(plan.ops) if op.kind == "matmul")


@pytest.mark.parametrize(
    "edit",
    [
        "stride_overflow",
        "bmn_overflow",
        "task_range",
        "workspace_offset_overflow",
        "queue_entry",
        "dependency_id",
        "program_length",
        "register_index",
        "opcode",
        "dtype",
        "integer_pow_exponent",
        "operand_too_small",
        "num_workers",
        "cycle",
    ],
)
def test_runtime_rejects_unchecked_plans(setup, edit):
    """Plans that skipped validate() (edited objects or raw words) are refused by the C++ check
    before anything runs: no SIGSEGV, no write past a buffer, no hang (these used to crash)."""
    plan, args, _ = setup
    p = plan.copy()
    words = None
    mm = _matmul_op(p)
    if edit == "stride_overflow":
        # A is (B, M, K) = (1, 8, 16): 7 * 2^60 + 15 * (7 * 2^60) = 7 * 2^64 wraps int64 to 0,
        # so an unchecked multiplication sees the largest element at offset 0
        assert (p.ops[mm].B, p.ops[mm].M, p.ops[mm].K) == (1, 8, 16)
        a = p.ops[mm].a_view
        p.views[a] = View(p.views[a].tensor, 0, (0, 1 << 60, 7 << 60))
    elif edit == "bmn_overflow":  # B*M*N wraps to the output's element count
        p.ops[mm].B = (1 << 62) + 1
        p.ops[mm].M *= 1
        p.tasks[next(t for t, k in enumerate(p.tasks) if k.op == mm)].b1 = (1 << 31) - 1
    elif edit == "task_range":
        p.tasks[0].n1 = (1 << 31) - 1
    elif edit == "workspace_offset_overflow":
        ws = next(t for t in p.tensors if t.storage == "workspace")
        ws.byte_offset = (1 << 63) - 256
    elif edit == "queue_entry":
        p.queues[0][0] = 1 << 20
    elif edit == "dependency_id":
        t = next(t for t in p.tasks if t.deps)
        t.deps[0] = -5
    elif edit == "cycle":
        first, last = p.queues[0][0], p.queues[0][-1]
        p.tasks[first].deps.append(last)
    elif edit == "num_workers":
        words = p.to_binary()
        words[4] = 5000
    else:
        words = p.to_binary()
        epi_at, epi_len = _op_word(p, words, mm, 10), _op_word(p, words, mm, 11)
        code = int(words[HEADER["code_at"]]) + 4 * int(words[epi_at])
        if edit == "program_length":
            words[epi_len] = 1000
        elif edit == "register_index":
            words[code + 4 * (int(words[epi_len]) - 1) + 1] = 63  # a later register
        elif edit == "opcode":
            words[code] = 99
        elif edit == "dtype":
            words[code] = (words[code] & 0xFFFF) | (10 << 16)  # past the last dtype (uint16 = 9)
        elif edit == "integer_pow_exponent":
            pow_op = next(
                (i, k)
                for i, op in enumerate(p.ops)
                for k, ins in enumerate(op.epilogue)
                if ins.op == "integer_pow"
            )
            p.ops[pow_op[0]].epilogue[pow_op[1]].b = (1 << 31) - 1  # a CPU time bomb
            words = None
            with pytest.raises(PlanError, match="integer_pow exponent"):
                p.validate()
        elif edit == "operand_too_small":
            t = p.args[0]
            words[int(words[HEADER["tensors_at"]]) + 24 * t + 8] *= 2  # dims[0] doubled
            words[int(words[HEADER["tensors_at"]]) + 24 * t + 6] *= 2  # num_elements
    _runtime_rejects(p, args, words)


# ---- item 2: validate() rejects racy, garbage-reading and unbounded plans ------------------------
def test_two_tensors_sharing_one_output_buffer_are_rejected(rng):
    args = random_args(rng, [(8, 16), (16, 12)])
    plan = ark.plan(lambda x, w: (jnp.tanh(x @ w), x @ w * 2.0), *args, num_workers=2)
    p = plan.copy()
    p.tensors[p.outputs[1]].index = 0
    p.outputs = [p.outputs[0]]
    with pytest.raises(PlanError, match="shares output buffer 0 with tensor"):
        p.validate()


def test_view_of_workspace_no_op_writes_is_rejected(setup):
    plan, args, _ = setup
    p = plan.copy()
    i, k, ins = next(
        (i, k, ins)
        for i, op in enumerate(p.ops)
        for k, ins in enumerate(op.epilogue)
        if ins.op == "load" and p.tensors[p.views[int(ins.a)].tensor].storage == "workspace"
    )
    src = p.views[int(ins.a)]
    spec = p.tensors[src.tensor]
    offset = -(-p.workspace_bytes // 256) * 256
    p.tensors.append(TensorSpec("ghost", spec.shape, spec.dtype, "workspace", 0, offset))
    p.workspace_bytes = offset + spec.nbytes
    p.views.append(View(len(p.tensors) - 1, src.offset, src.strides))
    p.ops[i].epilogue[k].a = len(p.views) - 1
    with pytest.raises(PlanError, match="is read by a view but no op writes it"):
        p.validate()
    _runtime_rejects(p, args, match="is read by a view but no op writes it")


def test_unbounded_work_is_rejected(rng):
    args = random_args(rng, [(4, 8)])
    plan = ark.plan(lambda x: jnp.sum(x * 2.0, axis=-1), *args, num_workers=1)
    p = plan.copy()
    red = next(op for op in p.ops if op.kind == "reduce")
    red.iter_dims, red.K = (red.iter_dims[0], (1 << 31) - 1), (1 << 31) - 1  # stride-0 reads
    k, ld = next((k, ins) for k, ins in enumerate(red.prologue) if ins.op == "load")
    p.views[int(ld.a)] = View(p.views[int(ld.a)].tensor, 0, (8, 0))
    red.prologue = red.prologue[: k + 1] + [Instr("integer_pow", "float32", k, 1 << 16)]
    with pytest.raises(PlanError, match="exceeds the bound 2\\^45"):
        p.validate()
    _runtime_rejects(p, args, match="exceeds the bound 2\\^45")


# ---- item 3: bad JSON always raises PlanError naming the field ----------------------------------
def _set(path):
    def edit(d, value):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value

    return edit


def _epilogue_op(d):
    return next(i for i, o in enumerate(d["ops"]) if len(o["epilogue"]) >= 3)


JSON_CASES = [
    ("not json", lambda d: None, "not valid JSON"),
    ("version missing", lambda d: d.pop("version"), "version: missing"),
    ("version 0", lambda d: d.update(version=0), "version: 0"),
    ("version -1", lambda d: d.update(version=-1), "version: -1"),
    ("version str", lambda d: d.update(version="1"), "version: expected an integer"),
    ("dtype float64", lambda d: d["tensors"][0].update(dtype="float64"), "tensors[0].dtype"),
    ("tensor not object", lambda d: d["tensors"].__setitem__(0, "x"), "tensors[0]: expected"),
    ("shape huge", lambda d: d["tensors"][0].update(shape=[2**70]), "tensors[0].shape[0]"),
    ("views null", lambda d: d.update(views=None), "views: expected a list"),
    ("task b1 2**70", lambda d: d["tasks"][0].update(b1=2**70), "tasks[0].b1"),
    ("task op missing", lambda d: d["tasks"][1].pop("op"), "tasks[1].op: missing"),
    ("dep float", lambda d: d["tasks"][-1].update(deps=[1.5]), "tasks[-1]"),
    ("num_workers 1025", lambda d: d.update(num_workers=1025), "num_workers: 1025"),
    ("outputs range", lambda d: d.update(outputs=[999]), "outputs[0]"),
    ("constants data", lambda d: d.update(constants={"0": {"data": "@@"}}), "constants['0']"),
    ("unknown field", lambda d: d["ops"][0].update(bogus=1), "ops[0]: unknown field"),
    ("plan is a list", lambda d: d.clear() or d.update(format="jax_ark.plan"), "version: missing"),
]


@pytest.mark.parametrize("case", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_raises_plan_error_with_the_path(setup, case):
    plan, _, _ = setup
    name, edit, path = case
    d = plan.to_dict()
    if name == "not json":
        text = plan.to_json()[:-7]
    else:
        edit(d)
        text = json.dumps(d)
    if name == "dep float":
        path = f"tasks[{len(d['tasks']) - 1}].deps[0]"
    with pytest.raises(PlanError, match=re.escape(path)):
        ark.Plan.from_json(text)


def test_bad_instruction_field_path(setup):
    plan, _, _ = setup
    d = plan.to_dict()
    i = _epilogue_op(d)
    d["ops"][i]["epilogue"][2][0] = "bogus"
    with pytest.raises(PlanError, match=re.escape(f"ops[{i}].epilogue[2].op")):
        ark.Plan.from_json(json.dumps(d))
    d["ops"][i]["epilogue"][2] = ["add", "float32", 0]
    with pytest.raises(PlanError, match=re.escape(f"ops[{i}].epilogue[2]: an instruction")):
        ark.Plan.from_json(d)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["ops"][0].update(out=999),
        lambda d: next(o for o in d["ops"] if o["kind"] == "matmul").update(a_view=999),
        lambda d: d["views"][0].update(tensor=999),
        lambda d: d["tasks"][0].update(op=999),
        lambda d: d["tasks"][-1].update(deps=[999]),
        lambda d: d["queues"][0].append(999),
        lambda d: d["tensors"][-1].update(shape=[2**62, 2**62]),
        lambda d: d["ops"][-1]["epilogue"][-1].__setitem__(2, 999),
    ],
)
def test_semantic_errors_are_plan_errors(setup, edit):
    """Indices past their tables and overflowing sizes: PlanError, never IndexError & co."""
    plan, _, _ = setup
    d = plan.to_dict()
    edit(d)
    p = ark.Plan.from_json(json.dumps(d))
    with pytest.raises(PlanError):
        p.validate()
    with pytest.raises(PlanError):
        ark.persistent(_fn, plan=p)


def test_num_workers_outside_the_runtime_range_is_rejected_in_python(setup):
    plan, args, _ = setup
    with pytest.raises(PlanError, match="num_workers must be in 1..1024"):
        ark.persistent(_fn, num_workers=1025)
    with pytest.raises(PlanError, match="num_workers must be in 1..1024"):
        ark.plan(_fn, *args, num_workers=1025)
    p = plan.copy()
    p.num_workers = 1025
    with pytest.raises(PlanError, match="num_workers"):
        p.validate()


# ---- item 4: worker threads ---------------------------------------------------------------------
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_worker_pool_is_bounded_and_released(rng):
    args = random_args(rng, [(8, 16), (16, 12)])
    want = np.asarray(jax.jit(_fn)(*args))
    jax.block_until_ready(ark.persistent(_fn, num_workers=2)(*args))
    before = _threads()
    assert_close(ark.persistent(_fn, num_workers=1000)(*args), want, 2e-5)
    after = _threads()
    assert after <= before + 128 + 4, (before, after)  # at most 128 parked helpers stay
    assert_close(ark.persistent(_fn, num_workers=1000)(*args), want, 2e-5)
    assert _threads() <= before + 128 + 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_worker_threads_are_shared_across_devices(mesh8, rng):
    """8 devices each running 64 workers at once borrow 8 x 63 threads, then give them back."""
    from jax.sharding import PartitionSpec as P

    x = random_args(rng, [(8 * 8, 16)])[0]
    w = random_args(rng, [(16, 12)])[0]
    sharded = jax.jit(
        jax.shard_map(
            ark.persistent(_fn, num_workers=64),
            mesh=mesh8,
            in_specs=(P("x"), P()),
            out_specs=P("x"),
        )
    )
    before = _threads()
    for _ in range(2):
        assert_close(sharded(x, w), jax.jit(_fn)(x, w), 2e-5)
    assert _threads() <= before + 128 + 4, (before, _threads())


_NO_THREADS = textwrap.dedent(
    """
    import resource, jax, jax.numpy as jnp, numpy as np
    import jax_ark as ark
    fn = lambda x, w: jnp.tanh(x @ w)
    x, w = np.ones((8, 16), np.float32), np.ones((16, 12), np.float32)
    small = ark.persistent(fn, num_workers=2)
    big = ark.persistent(fn, num_workers=1000)
    jax.block_until_ready(small(x, w))
    jax.eval_shape(big, x, w)
    jax.jit(big).lower(x, w).compile()
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
    # ulimit -v: room for the process as it is plus 1 GiB, not for 1000 thread stacks (8 MiB each)
    limit = (vm << 10) + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        jax.block_until_ready(big(x, w))
        print("RAN")
    except Exception as e:
        print("ERROR", e)
    np.testing.assert_allclose(small(x, w), np.tanh(x @ w), rtol=1e-5)
    print("SMALL OK")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_AS semantics of Linux")
def test_failed_thread_start_is_an_error_not_a_hang():
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _NO_THREADS],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=TESTS_DIR,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"ERROR .*could not start 999 worker threads", out), out
    assert "SMALL OK" in out, out


# ---- item 5: chaos mode catches a missing dependency --------------------------------------------
def _deleted_dependency_plan(plan):
    """A copy with one cross-worker dependency deleted that validate() reports as missing."""
    worker = {t: w for w, q in enumerate(plan.queues) for t in q}
    for t, task in enumerate(plan.tasks):
        for d in task.deps:
            if worker[d] == worker[t]:
                continue
            p = plan.copy()
            p.tasks[t].deps.remove(d)
            try:
                p.validate()
            except PlanError as e:
                if "missing dependency" in str(e):
                    return p
    raise AssertionError("no removable cross-worker dependency")


def test_chaos_mode_catches_a_deleted_dependency(rng, monkeypatch):
    args = random_args(rng, [(16, 32), (32, 32), (32, 16)])

    def fn(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    plan = ark.plan(fn, *args, num_workers=3, tile_m=8, tile_n=8)
    broken = _deleted_dependency_plan(plan)
    want = np.asarray(jax.jit(fn)(*args))
    runs, wrong, races = 20, 0, 0
    for seed in range(1, runs + 1):
        monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", str(seed))
        good = np.asarray(run_plan(plan, args)[0][0])
        np.testing.assert_allclose(good, want, rtol=2e-5, atol=2e-5)  # intact: always right
        try:
            bad = np.asarray(run_plan(broken, args)[0][0])
        except Exception as e:  # noqa: BLE001
            assert "the plan has a race (a missing dependency?)" in str(e), str(e)
            races += 1
        else:
            wrong += not np.allclose(bad, want, rtol=2e-5, atol=2e-5)
    caught = wrong + races
    assert caught >= runs * 3 // 4, f"caught in {caught}/{runs} runs ({races} as race errors)"
    monkeypatch.delenv("JAX_ARK_PERSISTENT_CHAOS")
    normal_wrong = sum(
        not np.allclose(np.asarray(run_plan(broken, args)[0][0]), want, rtol=2e-5, atol=2e-5)
        for _ in range(5)
    )
    print(
        f"chaos caught {caught}/{runs} ({races} race errors, {wrong} wrong results); "
        f"normal runs wrong: {normal_wrong}/5"
    )
    assert_close(interpret(plan, *args)[0], want, 2e-5)


# ---- plan v2: integer registers, LOAD_AT, in-place (aliased) results -----------------------------
def _v2(table, ids, cache, row, pos):
    emb = table[ids]  # a gather: LOAD_AT at a device index
    new = jax.lax.dynamic_update_slice(cache, row * 2.0 + emb[:1], (pos, 0))  # a window store
    return new, ids**3 + pos, jnp.argmax(emb, axis=-1)


@pytest.fixture
def v2_setup(rng):
    args = [
        rng.standard_normal((7, 5)).astype(np.float32),
        np.array([3, -2, 6, 9], np.int32),
        rng.standard_normal((6, 5)).astype(np.float32),
        rng.standard_normal((1, 5)).astype(np.float32),
        np.int32(4),
    ]
    plan = ark.plan(_v2, *args, num_workers=2, tile_m=2, tile_n=4)
    return plan, args, [np.asarray(x) for x in jax.jit(_v2)(*args)]


def _code_word(words, op_record: int, k: int) -> int:
    """Word 0 of epilogue instruction k of the op whose record starts at op_record."""
    return int(words[HEADER["code_at"]]) + 4 * (int(words[op_record + 10]) + k)


def _find(plan, pred):
    return next(
        (i, k, ins)
        for i, op in enumerate(plan.ops)
        for k, ins in enumerate(op.epilogue)
        if pred(ins)
    )


def test_v2_plan_runs_and_round_trips(v2_setup):
    plan, args, want = v2_setup
    assert any(op.store_view >= 0 for op in plan.ops)
    assert plan.tensors[plan.outputs[0]].alias == 2
    again = ark.Plan.from_json(plan.to_json())
    np.testing.assert_array_equal(again.to_binary(), plan.to_binary())
    got = jax.jit(ark.persistent(_v2, plan=again))(*args)
    assert_close(got[0], want[0], 1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)  # integers: exact


@pytest.mark.parametrize(
    "edit",
    [
        "load_at_offset_float",
        "load_at_offset_later",
        "load_at_reach",
        "alias_undeclared",
        "alias_other_operand",
        "store_reads_its_operand",
        "store_view_outside",
        "store_at_float",
        "ipow_exponent",
        "reduce_kind",
    ],
)
def test_runtime_rejects_unchecked_v2_plans(v2_setup, edit):
    """The C++ check knows plan v2: a LOAD_AT offset is an earlier integer register and the
    view's unmoved reach is inside the tensor (the executors clamp the moved element into it), an
    aliased result is exactly the buffer XLA aliased and its writer never reads that operand, a
    window store writes inside its output."""
    plan, args, _ = v2_setup
    p = plan.copy()
    words = p.to_binary()
    ops_at = int(words[HEADER["ops_at"]])
    tensors_at = int(words[HEADER["tensors_at"]])
    match = "ark_persistent: invalid plan"
    python_match = None
    if edit.startswith("load_at"):
        i, k, ins = _find(p, lambda ins: ins.op == "load_at")
        code = _code_word(words, ops_at + 40 * i, k)
        if edit == "load_at_offset_float":
            c = next(j for j, x in enumerate(p.ops[i].epilogue[:k]) if x.op == "const")
            p.ops[i].epilogue[c].dtype = "float32"  # now a float register
            p.ops[i].epilogue[k].b = c
            words = p.to_binary()
            match = "LOAD_AT offset register"
            python_match = "takes integer operands"
        elif edit == "load_at_offset_later":
            words[code + 2] = k
            match = "LOAD_AT offset register"
        else:
            view = int(ins.a)
            at = int(words[HEADER["views_at"]]) + 16 * view + 2
            words[at] = p.tensors[p.views[view].tensor].num_elements  # offset past the end
            match = "reads outside tensor"
            p.views[view] = View(p.views[view].tensor, words[at], p.views[view].strides)
            python_match = "reads element"
    elif edit.startswith("alias"):
        t = p.outputs[0]
        if edit == "alias_undeclared":
            words[tensors_at + 24 * t + 20] = 0  # the call still aliases it (run_plan uses p)
            match = "is operand 2's buffer"
        else:
            words[tensors_at + 24 * t + 20] = 1  # 1 + operand 0: table, of another shape
            match = "aliases operand 0 of another size"
            q = p.copy()
            q.tensors[t].alias = 0
            with pytest.raises(PlanError, match="alias 0 must name an operand of its size"):
                q.validate()
    elif edit.startswith("store"):
        i = next(i for i, op in enumerate(p.ops) if op.store_view >= 0)
        op = p.ops[i]
        if edit == "store_reads_its_operand":
            k, ins = next(
                (k, x) for k, x in enumerate(op.epilogue) if x.op == "load" and x.dtype == "float32"
            )
            view = p.views[int(ins.a)]
            cache = p.args[2]
            p.views.append(View(cache, 0, view.strides))
            op.epilogue[k].a = len(p.views) - 1
            words = None  # the edited plan, encoded without a Python check
            match = "whose bytes the op itself writes"
            python_match = "whose bytes the op itself writes"
        elif edit == "store_view_outside":
            at = int(words[HEADER["views_at"]]) + 16 * op.store_view + 2
            words[at] = p.tensors[op.out].num_elements
            match = "store view reaches outside its output"
        else:
            f = next(k for k, x in enumerate(op.epilogue) if x.dtype == "float32")
            words[ops_at + 40 * i + 37] = f + 1
            match = "store_at is not an integer register"
    elif edit == "ipow_exponent":
        i, k, _ = _find(p, lambda ins: ins.op == "ipow")
        words[_code_word(words, ops_at + 40 * i, k) + 2] = (1 << 31) - 1  # a CPU time bomb
        match = "integer_pow exponent"
        p.ops[i].epilogue[k].b = (1 << 31) - 1
        python_match = "integer_pow exponent"
    elif edit == "reduce_kind":
        i = next(i for i, op in enumerate(p.ops) if op.kind == "reduce")
        words[ops_at + 40 * i + 3] = len(REDUCE_CODES)  # kNumReduceKinds: the first unknown kind
        match = "unknown reduce kind"
    _runtime_rejects(p, args, words, match=match)
    if python_match is not None:
        with pytest.raises(PlanError, match=python_match):
            p.validate()


def test_chaos_mode_keeps_an_in_place_result(v2_setup, monkeypatch):
    """Chaos mode poisons outputs before each of its runs; an aliased result instead restarts
    from its operand's content (the rows the window store does not write are the cache's)."""
    plan, args, want = v2_setup
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "7")
    got = run_plan(plan, args)[0]
    assert_close(got[0], want[0], 1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])


def test_reading_an_operand_updated_in_place_in_the_same_loop_is_refused(rng):
    """Found by the plan fuzzer (seed 20261204, case 2238 once a base case was added): a loop op's
    view retargeted to the cache operand that the loop's window store updates in place passed
    validate, and about 6% of runs read an earlier iteration's update instead of the operand."""

    def fn(x, cache):
        def body(i, c):
            h, cache = c
            cache = jax.lax.dynamic_update_slice(cache, h[:1], (i, 0))
            return jnp.tanh(h) * 0.5, cache

        return jax.lax.fori_loop(0, 3, body, (x, cache))

    x, cache = random_args(rng, [(2, 4), (3, 4)])
    plan = ark.plan(fn, x, cache, num_workers=2)
    store = next(i for i, op in enumerate(plan.ops) if op.store_view >= 0)
    cache_arg = next(t for t in plan.args if plan.tensors[t].index == 1)
    assert plan.tensors[plan.ops[store].out].alias == 1 and plan.ops[store].loop >= 0
    reader = next(
        i
        for i, op in enumerate(plan.ops)
        if i != store
        and op.loop == plan.ops[store].loop
        and any(ins.op == "load" for ins in op.epilogue)
    )
    view = next(int(ins.a) for ins in plan.ops[reader].epilogue if ins.op == "load")
    bad = plan.copy()
    bad.views[view] = dataclasses.replace(bad.views[view], tensor=cache_arg)
    with pytest.raises(PlanError, match="updates in place .* in the same loop"):
        bad.validate()
    got = jax.jit(ark.persistent(fn, plan=plan))(x, cache)
    for g, w in zip(got, jax.jit(fn)(x, cache), strict=True):
        assert_close(g, w, 1e-6)
