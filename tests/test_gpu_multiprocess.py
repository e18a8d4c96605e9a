"""Two JAX processes sharing one GPU run jax_ark collectives over CUDA IPC (see the worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from two_processes import run_two_workers

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("gpu_multiprocess_worker.py")


# One deadline for both workers, and a device-side timeout well below it, so a hang ends as the
# workers' named errors, not as a kill. The deadline must end (and the report below print) inside
# tools/gpu_check.sh's 80 s step limit, which also pays for this pytest process's start: at 80 s
# here the step was killed first and the workers' output was lost.
DEADLINE_S = 60
COLLECTIVE_TIMEOUT_S = 20


def test_two_processes_one_gpu():
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONUNBUFFERED="1",
        JAX_ARK_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S),
    )
    env.pop("XLA_FLAGS", None)  # the CPU device-count flag of conftest is not for these processes
    run = run_two_workers(WORKER, env, DEADLINE_S)
    report = run.report()
    print(report)
    assert not run.timed_out, f"workers did not finish within {DEADLINE_S} s\n{report}"
    for pid, (rc, out) in enumerate(zip(run.returncodes, run.outputs, strict=True)):
        assert rc == 0 and f"[{pid}] WORKER_OK" in out, f"process {pid} failed\n{report}"
