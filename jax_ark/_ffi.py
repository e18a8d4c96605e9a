"""Loading the compiled backends and registering their XLA FFI targets with jax.

`_ark_cpu` is always built. `_ark_cuda` exists only where the package was built with a CUDA
compiler; importing jax_ark without it (or without a GPU) registers the CPU targets only.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.metadata
from pathlib import Path
from types import ModuleType

import jax


@functools.cache
def cpu_module() -> ModuleType:
    try:
        return importlib.import_module("jax_ark._ark_cpu")
    except ModuleNotFoundError as err:
        if err.name != "jax_ark._ark_cpu":
            raise
        raise ImportError(_missing_backend_message()) from None


def _installed_copy(package_dir: Path) -> Path | None:
    """Where pip installed jax_ark, when that is not `package_dir` (None if not installed)."""
    try:
        dist = importlib.metadata.distribution("jax_ark")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next(
        (f for f in dist.files or () if str(f).replace("\\", "/") == "jax_ark/__init__.py"), None
    )
    if init is None:
        return None  # an editable install: its modules live in the checkout itself
    installed = Path(str(dist.locate_file(init))).resolve().parent
    return None if installed == package_dir else installed


def _missing_backend_message() -> str:
    """Says why the compiled CPU backend is missing and what to run, for the common cases."""
    package_dir = Path(__file__).resolve().parent
    lines = [f"jax_ark's compiled backend (jax_ark._ark_cpu) is not in {package_dir}."]
    if (package_dir.parent / "pyproject.toml").is_file():
        lines.append(
            "This is the source checkout, which Python imports first when it is the working "
            "directory (or on PYTHONPATH); its folder holds no compiled modules."
        )
        installed = _installed_copy(package_dir)
        if installed is not None:
            lines.append(
                f"jax_ark is installed in {installed}: run Python from another directory "
                "(and keep the checkout off PYTHONPATH) to use it,"
            )
        else:
            lines.append(
                f'Install it (`pip install "{package_dir.parent}"`) and run Python from another '
                "directory,"
            )
        lines.append(
            f"or build the modules into the checkout: `cd {package_dir.parent} && "
            "tools/dev_build.sh -DJAX_ARK_CUDA=OFF` (see README.md, Development)."
        )
    else:
        lines.append(
            "The install is incomplete: reinstall it (`pip install --force-reinstall jax_ark`)."
        )
    return "\n".join(lines)


@functools.cache
def cuda_module() -> ModuleType | None:
    """The CUDA extension, or None where it was not built."""
    try:
        return importlib.import_module("jax_ark._ark_cuda")
    except ImportError:
        return None


# CUDA targets whose handler C++ declares command-buffer compatible (kCmdBufferCompatible in
# XLA_FFI_DEFINE_HANDLER_SYMBOL); XLA takes the trait from the registration, so it goes here too.
_COMMAND_BUFFER_TARGETS = frozenset(
    {"ark_collective_cuda_graph", "ark_persistent_graph", "ark_persistent_comm_graph"}
)


def _traits(name: str) -> dict:
    if name not in _COMMAND_BUFFER_TARGETS:
        return {}
    from jaxlib import xla_client

    traits = getattr(xla_client, "CustomCallTargetTraits", None)
    return {} if traits is None else {"traits": traits.COMMAND_BUFFER_COMPATIBLE}


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
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA", **_traits(name))
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
