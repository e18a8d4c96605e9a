"""Two JAX processes sharing one GPU run jax_ark collectives over CUDA IPC (see the worker)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("gpu_multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One deadline for both workers, and a device-side timeout well below it, so a hang ends as the
# workers' named errors, not as a kill. The deadline must end (and the report below print) inside
# tools/gpu_check.sh's 80 s step limit, which also pays for this pytest process's start: at 80 s
# here the step was killed first and the workers' output was lost.
DEADLINE_S = 60
COLLECTIVE_TIMEOUT_S = 20


def test_two_processes_one_gpu():
    port = _free_port()
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONUNBUFFERED="1",
        JAX_ARK_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S),
    )
    env.pop("XLA_FLAGS", None)  # the CPU device-count flag of conftest is not for these processes
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(pid), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + DEADLINE_S
    outputs = ["", ""]
    timed_out = False
    try:
        for i, p in enumerate(procs):
            try:
                outputs[i], _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            if not outputs[i]:
                outputs[i] = p.communicate()[0] or ""  # keep what it printed before the kill
    report = "\n".join(
        f"---- process {pid} (rc={p.returncode})\n{out[-4000:]}"
        for pid, (p, out) in enumerate(zip(procs, outputs, strict=True))
    )
    print(report)
    assert not timed_out, f"workers did not finish within {DEADLINE_S} s\n{report}"
    for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 and f"[{pid}] WORKER_OK" in out, f"process {pid} failed\n{report}"
