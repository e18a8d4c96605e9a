"""Ctrl-C during a blocked CPU collective: the process exits at once, not when the timeout ends.

Before the process-wide cancellation, KeyboardInterrupt came at once but jax's exit handler then
waited for the XLA threads parked in the collective, so the process lived until the 60 s timeout.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from subprocess_env import subprocess_env

WORKER = Path(__file__).with_name("blocked_collective_worker.py")
COLLECTIVE_TIMEOUT_S = 60
EXIT_WITHIN_S = 10.0


def test_sigint_ends_a_blocked_collective_promptly():
    env = subprocess_env(JAX_ARK_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S), PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker prints BLOCKED 1 s into the collective
            lines.append(line)
            if "BLOCKED" in line:
                break
        assert "BLOCKED" in "".join(lines), "".join(lines)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=COLLECTIVE_TIMEOUT_S + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    report = "".join(lines) + out
    assert "INTERRUPTED" in report, report
    assert took < EXIT_WITHIN_S, f"exit took {took:.1f} s after SIGINT\n{report[-3000:]}"
