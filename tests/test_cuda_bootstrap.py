"""The CUDA bootstrap's IPC-handle exchange through a real jax.distributed key-value store, on CPU.

Two processes with two CPU devices each build one 2x2 mesh (mesh order != device order) and
bootstrap communicators over each axis combination with the CUDA module replaced by a recorder
(tests/cuda_bootstrap_worker.py). Every rank must be connected to every peer of its group with
the peer's own handle, as "self", "local" (same process) or "ipc" (the other process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from two_processes import run_two_workers

WORKER = Path(__file__).with_name("cuda_bootstrap_worker.py")


def _run_workers() -> list[dict]:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    # The workers import jax_ark as this process does (installed package, or PYTHONPATH in a
    # developer build); putting the checkout first would shadow an installed package's modules.
    run = run_two_workers(WORKER, env, deadline_s=90)
    assert not run.timed_out, f"workers did not finish within 90 s\n{run.report()}"
    for pid, rc in enumerate(run.returncodes):
        assert rc == 0, f"process {pid} failed:\n{run.report()}"
    return [json.loads(out.strip().splitlines()[-1]) for out in run.outputs]


def test_handles_reach_every_peer_of_each_group():
    results = _run_workers()
    layout = np.array(results[0]["layout"])  # [x][y] -> (process, local id)
    assert results[0]["ids"] == results[1]["ids"], "processes disagree on communicator ids"
    for me, result in enumerate(results):
        calls = result["calls"]
        assert result["again"] == result["ids"]["x"]
        plan_id = result["ids"]["plan"]
        assert result["plan_again"] == plan_id
        assert len({plan_id, result["other_site"], result["ids"]["x,y"]}) == 3
        # A plan site's communicator: the smallest collective scratch plus the plan's region.
        assert result["sizes"][str(plan_id)] == [1, 16, 4, 12288]
        assert result["sizes"][str(result["ids"]["x"])][3] == 0
        for axes, comm_id in result["ids"].items():
            axes = "x,y" if axes == "plan" else axes  # the same group as the x,y collectives
            axes = axes.split(",")
            # Groups as rows, rank = row-major index over `axes` (lax.axis_index), by hand.
            order = [("x", "y").index(a) for a in axes]
            other = [d for d in (0, 1) if d not in order]
            groups = np.transpose(layout, [*other, *order, 2]).reshape(-1, 2 ** len(axes), 2)
            creates = {c[2]: c for c in calls if c[0] == "create" and c[1] == comm_id}
            connects = {c[2]: c[3] for c in calls if c[0] == "connect" and c[1] == comm_id}
            local = {int(dev): r for group in groups for r, (p, dev) in enumerate(group) if p == me}
            assert sorted(creates) == sorted(connects) == sorted(local), (axes, calls)
            for group in groups:
                for r, (p, dev) in enumerate(group):
                    if p != me:
                        continue
                    assert creates[dev][3:] == [r, len(group)]
                    want = [
                        [
                            "self" if j == r else "local" if pj == me else "ipc",
                            int(dj),
                            f"p{pj}r{j}",
                        ]
                        for j, (pj, dj) in enumerate(group)
                    ]
                    assert connects[dev] == want, (axes, r)
