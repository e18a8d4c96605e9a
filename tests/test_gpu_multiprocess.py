"""Two JAX processes sharing one GPU run jax_ark collectives over CUDA IPC (see the worker)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("gpu_multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_gpu():
    port = _free_port()
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONUNBUFFERED="1",
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
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        print(f"---- process {pid} (rc={p.returncode})\n{out[-4000:]}")
    for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 and f"[{pid}] WORKER_OK" in out, f"process {pid} failed"
