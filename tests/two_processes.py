"""Running a worker script as two processes of one jax.distributed job (shared by the tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerRun:
    returncodes: list[int | None]
    outputs: list[str]
    timed_out: bool

    def report(self) -> str:
        return "\n".join(
            f"---- process {pid} (rc={rc})\n{out[-4000:]}"
            for pid, (rc, out) in enumerate(zip(self.returncodes, self.outputs, strict=True))
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_workers(worker: Path, env: dict[str, str], deadline_s: float) -> WorkerRun:
    """Starts `python worker PROCESS_ID PORT` for process ids 0 and 1 and waits for both under ONE
    deadline; a worker still running then is killed, and what it printed so far is kept."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + deadline_s
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
    return WorkerRun([p.returncode for p in procs], outputs, timed_out)
