"""Which executor a plan is for, and the planner defaults that follow from it.

The CPU executor runs one host thread per worker; the CUDA executor one thread block per worker,
all co-resident (cooperative launch). So the default worker count is a property of the platform:
min(cores, 8) on CPU (inside shard_map the host's device programs share the cores), the SM count
(capped by the kernel's co-residency limit) on GPU. Tile shapes follow too (`_schedule._tiles`):
on GPU a GEMV layer is split into about one column tile per worker.

`ark.plan(fn, *args)` and `ark.persistent(fn)(*args)` resolve the platform the same way (explicit
`platform=`, else the devices of concrete array arguments, else jax's default backend), so the plan
one inspects is the plan that runs. Under `jax.jit` the arguments are tracers without devices: the
default backend is used, which is the platform jit lowers for unless the arguments were committed to
another backend's devices.
"""

from __future__ import annotations

import functools
import os

import jax

from jax_ark._ffi import cuda_module

CPU = "cpu"
GPU = "gpu"
_WORKERS_ENV = "JAX_ARK_PERSISTENT_WORKERS"


def normalize_platform(name: str) -> str:
    """jax platform names ("cpu", "gpu", "cuda") -> CPU / GPU. Anything else has no ark executor."""
    name = name.lower()
    if name in ("gpu", "cuda"):
        return GPU
    if name == "cpu":
        return CPU
    raise ValueError(f"ark.persistent runs on 'cpu' or 'gpu' (CUDA), not on {name!r}")


def cpu_workers(concurrent: int = 1) -> int:
    """Cores shared among `concurrent` calls running at once, at most 8 workers each. More worker
    threads than cores only adds dependency-wait handoffs (measured: an 8-device shard_map decode
    on 2 cores ran 1.5-2x slower with 2 workers per device than with 1)."""
    return max(1, min((os.cpu_count() or 1) // max(1, concurrent), 8))


def concurrent_cpu_programs() -> int:
    """How many device programs of the enclosing shard_map run at once on this host's CPU devices
    (each calls the executor with its own workers); 1 outside shard_map."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
        manual = tuple(getattr(mesh, "manual_axes", ()) or ())
        if getattr(mesh, "empty", True) or not manual:
            return 1
        programs = 1
        for name in manual:
            programs *= int(mesh.shape[name])
        return max(1, min(programs, len(jax.local_devices(backend=CPU))))
    except Exception:  # noqa: BLE001 - a jax without abstract meshes: assume no concurrency
        return 1


def gpu_workers(sm_count: int, max_resident: int | None = None) -> int:
    """One worker per SM, never more than the persistent kernel keeps co-resident (the CUDA
    executor refuses a plan with more workers: its blocks spin on each other's counters)."""
    n = int(sm_count)
    if max_resident:
        n = min(n, int(max_resident))
    return max(1, n)


@functools.cache
def _gpu_device_workers(device_id: int, ordinal: int, core_count: int) -> int:
    resident = None
    sms = core_count
    mod = cuda_module()
    if mod is not None:
        try:
            resident = int(mod.persistent_max_workers(ordinal))
        except Exception:  # noqa: BLE001 - an older module or a CUDA error: the SM count alone
            resident = None
        if sms <= 0:
            try:
                sms = int(mod.device_sm_count(ordinal))
            except Exception:  # noqa: BLE001
                sms = 0
    if sms <= 0:
        sms = resident or 0
    if sms <= 0:
        raise ValueError(
            f"cannot tell how many SMs GPU device {device_id} has (no core_count, no _ark_cuda): "
            "pass num_workers= to ark.persistent / ark.plan"
        )
    return gpu_workers(sms, resident)


def _first_device(platform: str) -> jax.Device | None:
    try:
        devices = jax.devices("cuda" if platform == GPU else CPU)
    except RuntimeError:
        return None
    return devices[0] if devices else None


def platform_of(leaves) -> tuple[str, jax.Device | None]:
    """(platform, a device of it) for these arguments: the devices of the first concrete array (or
    ShapeDtypeStruct with a concrete sharding), else jax's default backend."""
    tracer = getattr(jax.core, "Tracer", ())  # guarded: jax.core shrinks release by release
    for x in leaves:
        if (tracer and isinstance(x, tracer)) or not isinstance(
            x, (jax.Array, jax.ShapeDtypeStruct)
        ):
            continue
        try:  # tracers (if not caught above) and abstract meshes have no devices: skip them
            sharding = getattr(x, "sharding", None)
            devices = sorted(sharding.device_set, key=lambda d: d.id) if sharding else []
        except Exception:  # noqa: BLE001
            continue
        if devices:
            return normalize_platform(devices[0].platform), devices[0]
    platform = normalize_platform(jax.default_backend())
    return platform, _first_device(platform)


def resolve_platform(leaves, platform: str | None = None) -> tuple[str, jax.Device | None]:
    """(platform, a device of it): `platform` if given, else from the arguments (see above)."""
    if platform is not None:
        platform = normalize_platform(platform)
        return platform, _first_device(platform)
    return platform_of(leaves)


def default_workers(platform: str, device: jax.Device | None) -> int:
    """Worker count when the caller gives none (env JAX_ARK_PERSISTENT_WORKERS wins)."""
    env = os.environ.get(_WORKERS_ENV)
    if env:
        return max(1, int(env))
    if platform == CPU:
        return cpu_workers(concurrent_cpu_programs())
    if device is None:
        raise ValueError(
            "planning for 'gpu' without a GPU device in this process: pass num_workers= "
            "(one per SM of the target GPU, e.g. 132 on an H100 SXM)"
        )
    ordinal = getattr(device, "local_hardware_id", None)
    ordinal = device.id if ordinal is None else int(ordinal)
    core_count = int(getattr(device, "core_count", 0) or 0)
    return _gpu_device_workers(device.id, ordinal, core_count)


@functools.cache
def prepare_gpus_for_graphs() -> None:
    """Creates the CUDA executor's per-device state (abort word, error record) on every local GPU
    now, at trace time: the first enqueue of a plan lowered for command buffers may run under
    XLA's stream capture, where its allocations and synchronization are not allowed. The default
    worker count asks for it anyway; a plan with explicit num_workers does not."""
    mod = cuda_module()
    if mod is None:
        return
    try:
        devices = jax.local_devices(backend="cuda")
    except RuntimeError:  # no CUDA backend in this process
        return
    for device in devices:
        mod.persistent_max_workers(device.local_hardware_id)
