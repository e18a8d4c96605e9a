"""Seeded plan fuzzer: >= 500 mutations of real plans (JSON and binary), each in a worker process,
and mutations of communication plans (routing tables, subgroups, stacked inboxes in loops,
axis_index) run on all 8 ranks of their group (tests/plan_fuzz_comm.py).

Every mutation must be rejected (PlanError from Python; for raw binary words the runtime's own
check) or run and equal the reference interpreter on the same plan: no crash (a worker process
dying), no hang (a case over its deadline), no wrong result, no other exception. Bounded time: two
worker processes, a per-case deadline and a total budget. JAX_ARK_FUZZ_SEED / JAX_ARK_FUZZ_CASES /
JAX_ARK_FUZZ_COMM_CASES override the seed and the numbers of cases (e.g. for a longer local run).
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocess_env import subprocess_env

SEED = int(os.environ.get("JAX_ARK_FUZZ_SEED", "20261204"))
CASES = int(os.environ.get("JAX_ARK_FUZZ_CASES", "600"))
# A comm case runs its plan on 8 ranks (~40 ms measured under load, most of it jit); every wait
# in it is bounded by plan_fuzz_comm.COMM_TIMEOUT_MS, so a deadlock is a failed case, not a hang.
COMM_CASES = int(os.environ.get("JAX_ARK_FUZZ_COMM_CASES", "300"))
LOAD_RANK_CASES = 20  # LOAD_RANK in plans without a group
WORKERS = 2
CASE_DEADLINE_S = 30.0
TOTAL_BUDGET_S = 300.0  # a safety net; the run takes ~40-80 s on 2 cores


class _Worker:
    def __init__(self) -> None:
        here = Path(__file__).parent
        env = subprocess_env()
        # 8 CPU devices: a comm plan runs on every rank of its group
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        env.pop("JAX_ARK_PERSISTENT_CHAOS", None)
        env["JAX_PLATFORMS"] = "cpu"
        self.proc = subprocess.Popen(
            [sys.executable, str(here / "plan_fuzz_worker.py"), str(SEED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.case: tuple[str, int] | None = None
        self.since = 0.0
        self.ready = False

    def send(self, case: tuple[str, int]) -> None:
        self.case, self.since = case, time.monotonic()
        self.proc.stdin.write(f"{case[0]} {case[1]}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_plan_fuzzer():
    todo = collections.deque(
        [("plain", i) for i in range(CASES)]
        + [("comm", i) for i in range(COMM_CASES)]
        + [("load_rank", i) for i in range(LOAD_RANK_CASES)]
    )
    total = len(todo)
    outcomes: collections.Counter = collections.Counter()
    failures: list[dict] = []
    workers = [_Worker() for _ in range(WORKERS)]
    sel = selectors.DefaultSelector()
    for w in workers:
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
    start = time.monotonic()
    done = 0
    try:
        while done < total:
            assert time.monotonic() - start < TOTAL_BUDGET_S, f"fuzzer over budget at {done} cases"
            for w in list(workers):
                if w.ready and w.case is None and todo:
                    w.send(todo.popleft())
            for key, _ in sel.select(timeout=1.0):
                w = key.data
                line = w.proc.stdout.readline()
                if not line:  # the worker died: the case it ran crashed the process
                    rc = w.proc.wait()
                    if w.case is None:
                        raise AssertionError(f"fuzz worker died at startup (exit {rc})")
                    failures.append({"case": w.case, "outcome": "crash", "exit": rc})
                    outcomes["crash"] += 1
                    done += 1
                    sel.unregister(w.proc.stdout)
                    workers.remove(w)
                    fresh = _Worker()
                    workers.append(fresh)
                    sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
                    continue
                msg = json.loads(line)
                if msg.get("ready"):
                    w.ready = True
                    continue
                prefix = "" if msg["kind"] == "plain" else f"{msg['kind']}:"
                outcomes[f"{prefix}{msg['mode']}:{msg['outcome']}"] += 1
                if msg["outcome"] in ("wrong", "error"):
                    failures.append(msg)
                w.case = None
                done += 1
            now = time.monotonic()
            for w in list(workers):
                if w.case is not None and now - w.since > CASE_DEADLINE_S:  # a hang
                    failures.append({"case": w.case, "outcome": "hang"})
                    outcomes["hang"] += 1
                    done += 1
                    sel.unregister(w.proc.stdout)
                    w.kill()
                    workers.remove(w)
                    fresh = _Worker()
                    workers.append(fresh)
                    sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
    finally:
        for w in workers:
            w.kill()
    elapsed = time.monotonic() - start
    summary = dict(sorted(outcomes.items()))
    print(f"plan fuzzer: seed {SEED}, {total} cases in {elapsed:.1f} s: {summary}")
    assert not failures, json.dumps(failures[:10], indent=1)
    # the mutations reach both layers and some still run (a fuzzer that only breaks JSON is useless)
    assert outcomes["json:python_rejected"] > 50 and outcomes["binary:runtime_rejected"] > 50
    assert outcomes["json:ran_ok"] > 20 and outcomes["binary:ran_ok"] > 10
    assert sum(v for k, v in outcomes.items() if k.endswith("ran_denormal")) <= CASES // 50
    if COMM_CASES >= 300:  # the comm mutations reach both layers too, and some run on all ranks
        assert outcomes["comm:json:python_rejected"] > 40
        assert outcomes["comm:binary:runtime_rejected"] > 40
        assert outcomes["comm:json:ran_ok"] > 20 and outcomes["comm:binary:ran_ok"] > 5
    assert (
        outcomes["load_rank:json:python_rejected"] + outcomes["load_rank:binary:runtime_rejected"]
        == LOAD_RANK_CASES
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
