"""Loading the compiled backends and registering their XLA FFI targets with jax.

`_ark_cpu` is always built. `_ark_cuda` exists only where the package was built with a CUDA
compiler; importing jax_ark without it (or without a GPU) registers the CPU targets only.
"""

from __future__ import annotations

import atexit
import functools
import importlib
from types import ModuleType

import jax


@functools.cache
def cpu_module() -> ModuleType:
    return importlib.import_module("jax_ark._ark_cpu")


@functools.cache
def cuda_module() -> ModuleType | None:
    """The CUDA extension, or None where it was not built."""
    try:
        return importlib.import_module("jax_ark._ark_cuda")
    except ImportError:
        return None


@functools.cache
def register_targets() -> tuple[str, ...]:
    """Registers every FFI target of the built backends with jax; returns the platforms done."""
    platforms = []
    for name, capsule in cpu_module().registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    platforms.append("cpu")
    cuda = cuda_module()
    if cuda is not None:
        for name, capsule in cuda.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        platforms.append("cuda")
    return tuple(platforms)


def has_cuda() -> bool:
    """True when the CUDA runtime was built into this install."""
    return cuda_module() is not None


def _cancel_collectives_at_exit() -> None:
    # A collective blocked on a peer that never comes (the user pressed Ctrl-C while it waited)
    # holds an XLA thread, and jax's own exit handler waits for it: without this the process would
    # exit only when the collective's timeout ends. Registered after jax's handler (jax_ark is
    # imported after jax), so it runs before it.
    try:
        cpu_module().cancel_collectives("the Python interpreter is exiting")
    except Exception:  # noqa: BLE001 - never turn an exit into a traceback
        pass


atexit.register(_cancel_collectives_at_exit)
