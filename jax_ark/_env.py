"""Process setup that must happen before jax (or CUDA) initializes."""

from __future__ import annotations

import os


def configure_host_devices(count: int = 8) -> None:
    """Give the CPU platform `count` virtual devices and a worker pool big enough for rendezvous.

    Harmless on GPU machines: the flag only shapes the host platform. Must run before jax starts.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    # Threads parked in a rendezvous must not starve the pool (../shared/DESIGN.md).
    os.environ.setdefault("PJRT_NPROC", str(2 * count))
    # The single-GPU harness runs its ranks as concurrent streams that spin on each other: each
    # stream needs its own hardware queue, or two ranks could wait on one another forever.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
