"""Test setup: 8 virtual CPU devices, a worker pool large enough for blocking rendezvous, and
`-m gpu` tests skipped where there is no GPU or no CUDA build.

The environment must be set before jax initializes its backends, hence at import time here.
"""

from __future__ import annotations

import os
import zlib

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Each CPU device's part of a program runs on a pool thread; ark's rendezvous parks threads, so the
# pool needs headroom (../shared/DESIGN.md: fewer threads deadlock both ark and lax.psum).
os.environ.setdefault("PJRT_NPROC", "16")
# GPU tests (no effect on CPU): the single-GPU harness runs N spinning ranks as N streams of this
# process; streams that share a hardware queue serialize and deadlock until the timeout. Must be
# set before CUDA initializes (jax.devices below).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


def _gpu_available() -> bool:
    try:
        import jax_ark

        return jax_ark.has_cuda() and len(jax.devices("gpu")) > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and jax_ark built with CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices("cpu")
    assert len(devices) >= 8, "tests expect 8 virtual CPU devices (XLA_FLAGS set too late?)"
    return devices[:8]


@pytest.fixture(scope="session")
def mesh8(cpu_devices):
    """1-D mesh of 8 CPU devices, axis 'x'."""
    return Mesh(np.array(cpu_devices), ("x",))


@pytest.fixture(scope="session")
def mesh2x4(cpu_devices):
    """2-D mesh 2x4 of CPU devices, axes ('x', 'y')."""
    return Mesh(np.array(cpu_devices).reshape(2, 4), ("x", "y"))


@pytest.fixture
def rng(request):
    """A fresh numpy generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
