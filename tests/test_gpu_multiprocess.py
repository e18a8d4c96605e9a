"""Two JAX processes sharing one GPU run jax_ark collectives over CUDA IPC (see the worker)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


# Creates (and drops) the primary context of device 0 through the driver API: with MPS env vars set
# this is the first client connection, so it fails here, in a second, if the MPS server cannot
# start (e.g. a GPU in exclusive mode), instead of failing both workers.
_MPS_PROBE = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
rc = cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0)
rc = rc or cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
if rc:
    sys.exit(f"CUDA driver call failed with CUresult {rc}")
cuda.cuDevicePrimaryCtxRelease(dev)
"""


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextlib.contextmanager
def _mps_daemon(env: dict[str, str]) -> Iterator[str]:
    """Runs the workers under a private MPS daemon when `nvidia-cuda-mps-control` exists: without
    MPS two processes on one GPU time-slice (each kernel waits for the other's time slice, so a
    collective's ranks rarely spin at once); with it their kernels share the SMs. The daemon gets
    its own pipe/log folders (no clash with a system-wide one) and is told to quit afterwards.
    Updates `env` for the workers; yields a line for the test's report."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        yield "MPS: nvidia-cuda-mps-control not found, the two processes time-slice the GPU"
        return
    root = Path(tempfile.mkdtemp(prefix="ark-mps-"))
    mps_env = dict(
        env, CUDA_MPS_PIPE_DIRECTORY=str(root / "pipe"), CUDA_MPS_LOG_DIRECTORY=str(root / "log")
    )
    (root / "pipe").mkdir()
    (root / "log").mkdir()
    started = False
    try:
        start = subprocess.run([control, "-d"], env=mps_env, capture_output=True, timeout=15)
        started = start.returncode == 0
        if not started:
            yield f"MPS: daemon did not start ({start.returncode}, {start.stderr!r}); time-slicing"
            return
        probe = subprocess.run(
            [sys.executable, "-c", _MPS_PROBE], env=mps_env, capture_output=True, timeout=30
        )
        if probe.returncode != 0:
            log = _tail(root / "log" / "control.log") + _tail(root / "log" / "server.log")
            yield f"MPS: a client could not connect ({probe.stderr!r}); time-slicing\n{log}"
            return
        env.update(
            CUDA_MPS_PIPE_DIRECTORY=mps_env["CUDA_MPS_PIPE_DIRECTORY"],
            CUDA_MPS_LOG_DIRECTORY=mps_env["CUDA_MPS_LOG_DIRECTORY"],
        )
        yield f"MPS: private daemon started ({root})"
    finally:
        if started:
            subprocess.run([control], input=b"quit\n", env=mps_env, capture_output=True, timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def test_two_processes_one_gpu():
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONUNBUFFERED="1",
        JAX_ARK_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S),
    )
    env.pop("XLA_FLAGS", None)  # the CPU device-count flag of conftest is not for these processes
    with _mps_daemon(env) as mps:
        print(mps)
        run = run_two_workers(WORKER, env, DEADLINE_S)
    report = f"{mps}\n{run.report()}"
    print(report)
    assert not run.timed_out, f"workers did not finish within {DEADLINE_S} s\n{report}"
    for pid, (rc, out) in enumerate(zip(run.returncodes, run.outputs, strict=True)):
        assert rc == 0 and f"[{pid}] WORKER_OK" in out, f"process {pid} failed\n{report}"
