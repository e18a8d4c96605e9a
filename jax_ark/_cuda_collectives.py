"""CUDA side of `ark_collective`: the MLIR lowering for platform "cuda", the communicator bootstrap
it runs at lowering time, the error check, and the single-GPU harness wrappers.

Bootstrap (once per mesh devices + group axes, cached): the lowering rule reads the concrete mesh
from the shard_map axis context, splits its devices into groups (one per combination of the other
axes; rank = row-major index over the group axes, like `lax.axis_index(axes)`), allocates each local
device's rank state (`_ark_cuda.comm_create`, returns a CUDA IPC handle of the rank's scratch),
swaps handles through the jax.distributed key-value store when there are several processes, and
opens every peer (`_ark_cuda.comm_connect`: same process -> direct pointer / peer access, other
process -> cudaIpcOpenMemHandle). The FFI call then carries `comm_id`; the handler finds the rank
state from its stream's device. Nothing of this runs per call.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jax_ark import _ffi

TARGET = "ark_collective_cuda"
# The same handler declared command-buffer compatible, so XLA may record it into its CUDA graphs
# instead of splitting them around it (docs/gpu_runtime.md, "CUDA graphs"). Opt-in, read at
# lowering: a call replayed from a graph cannot return an error to XLA, so a timeout there shows
# only through jax_ark.check(), where the default target fails the next call with it.
GRAPH_TARGET = "ark_collective_cuda_graph"
GRAPHS_ENV = "JAX_ARK_CUDA_GRAPHS"


def graphs_requested() -> bool:
    """JAX_ARK_CUDA_GRAPHS=1 when a program is lowered: every jax_ark CUDA call (collectives,
    persistent plans) takes its command-buffer-compatible target."""
    return os.environ.get(GRAPHS_ENV, "0") == "1"


def _target() -> str:
    return GRAPH_TARGET if graphs_requested() else TARGET


_OPS = {"all_reduce": 0, "all_gather": 1, "reduce_scatter": 2, "permute": 3, "all_to_all": 4}
_REDUCES = {"sum": 0, "max": 1, "min": 2}
_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "int32": 3}

# Communicator shape (identical on every rank; see docs/gpu_runtime.md). 16 blocks x 32 KiB pieces
# move 512 KiB per peer per round; messages up to 64 KiB per peer take the LL protocol.
_BLOCKS = 16
_PIECE_BYTES = 32 * 1024
_LL_BYTES = 64 * 1024
_BOOTSTRAP_TIMEOUT_MS = 120_000

_communicators: dict[tuple, int] = {}
# Lowerings may run on several Python threads: two bootstrapping one communicator at once would
# both call comm_create (the second fails: "already exists") and publish the same keys twice.
_communicators_lock = threading.Lock()


def _module():
    module = _ffi.cuda_module()
    if module is None:
        raise RuntimeError("jax_ark was built without the CUDA runtime (JAX_ARK_CUDA=OFF)")
    return module


def _code(table: dict[str, int], value: Any, what: str) -> int:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"jax_ark: unknown {what} {value!r}; expected one of {sorted(table)}")
        return table[value]
    return int(value)


# ---- lowering ---------------------------------------------------------------------------------


def _concrete_mesh(ctx) -> Any:
    """The concrete mesh (with devices) the program is lowered for.

    jax-internal (checked against jax 0.10.2 and 0.11.2), kept here: the lowering context's
    `module_context.axis_context` is an `SPMDAxisContext` inside shard_map, whose `mesh` is the
    concrete Mesh, or an AbstractMesh when shard_map got one (`mesh=mesh.abstract_mesh`); then the
    mesh of the enclosing `jax.set_mesh` is used, if it is that same mesh.
    """
    axis_context = getattr(ctx.module_context, "axis_context", None)
    mesh = getattr(axis_context, "mesh", None)
    # Test abstractness first: AbstractMesh.devices raises ValueError, not AttributeError.
    if mesh is not None and not _is_abstract(mesh) and getattr(mesh, "devices", None) is not None:
        return mesh
    try:
        from jax._src import mesh as mesh_lib

        concrete = mesh_lib.get_concrete_mesh()
    except (ImportError, AttributeError):
        concrete = None
    if (
        concrete is not None
        and not getattr(concrete, "empty", False)
        and (mesh is None or _same_shape(mesh, concrete))
    ):
        return concrete
    raise ValueError(
        "jax_ark GPU collectives must be used inside jax.shard_map over a concrete Mesh, or over "
        "an abstract mesh under `jax.set_mesh(mesh)` with the concrete mesh "
        f"(axis context {type(axis_context).__name__} has mesh {type(mesh).__name__}, no devices)"
    )


def _is_abstract(mesh) -> bool:
    return type(mesh).__name__ == "AbstractMesh"


def _same_shape(abstract, concrete) -> bool:
    """True when `concrete` has the axis names and sizes of `abstract`."""
    return tuple(abstract.axis_names) == tuple(concrete.axis_names) and tuple(
        abstract.axis_sizes
    ) == tuple(concrete.axis_sizes)


def _group_axes(axes: Any) -> tuple:
    if isinstance(axes, (tuple, list)):
        return tuple(axes)
    return (axes,)


def _lowering(ctx, x, rank, color, *, axes, group_size, **params):
    # The attributes come from the one function that also types the CPU backend's, so names and
    # types match what both handlers decode; `comm_id` is the only CUDA-specific attribute.
    from jax_ark._collective_primitive import ffi_attributes

    mesh = _concrete_mesh(ctx)
    comm_id = _communicator(mesh, _group_axes(axes), int(group_size))
    rule = jax.ffi.ffi_lowering(_target())
    attributes = ffi_attributes(axes=axes, group_size=group_size, **params)
    return rule(ctx, x, rank, color, **attributes, comm_id=np.int64(comm_id))


def register_lowering(prim) -> None:
    """Registers the "cuda" lowering of the `ark_collective` primitive."""
    from jax.interpreters import mlir

    mlir.register_lowering(prim, _lowering, platform="cuda")


# ---- bootstrap --------------------------------------------------------------------------------


def _groups(mesh, axes: tuple) -> np.ndarray:
    """Device groups as rows; column = rank (row-major over `axes`, as lax.axis_index(axes))."""
    names = tuple(mesh.axis_names)
    missing = [a for a in axes if a not in names]
    if missing:
        raise ValueError(f"jax_ark: axes {missing} are not axes of the mesh {names}")
    group_dims = [names.index(a) for a in axes]
    other_dims = [i for i in range(len(names)) if i not in group_dims]
    devices = np.asarray(mesh.devices)
    n = int(np.prod([devices.shape[d] for d in group_dims], dtype=np.int64))
    return np.transpose(devices, other_dims + group_dims).reshape(-1, n)


def _comm_id(key: tuple) -> int:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _kv_client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax_ark: several processes but jax.distributed is not initialized")
    return client


def _communicator(mesh, axes: tuple, group_size: int) -> int:
    """Bootstraps (once) the communicator of `axes` on `mesh`; returns its id."""
    with _communicators_lock:
        return _bootstrap(mesh, axes, group_size)


# A persistent plan's communicator runs no collective kernel: the smallest scratch the
# communicator accepts, plus the plan's symmetric region.
_PLAN_SCRATCH = (1, 16, 4)  # blocks, piece_bytes, ll_bytes


def plan_communicator(mesh, axes: tuple, group_size: int, site: int, region_bytes: int) -> int:
    """Bootstraps (once) the communicator of one persistent plan call site: its group over
    `axes`, each rank with a symmetric region of `region_bytes` (inboxes and signals, see
    cuda/include/jax_ark/gpu/persistent_comm_device.hpp); returns its id. One per site, and no
    collective kernel runs on it, so the epoch the persistent kernel keeps in its ranks' control
    words counts the site's calls."""
    with _communicators_lock:
        return _bootstrap(
            mesh, axes, group_size, sizes=_PLAN_SCRATCH, extra_bytes=region_bytes, site=site
        )


def _bootstrap(
    mesh,
    axes: tuple,
    group_size: int,
    *,
    sizes: tuple[int, int, int] = (_BLOCKS, _PIECE_BYTES, _LL_BYTES),
    extra_bytes: int = 0,
    site: int | None = None,
) -> int:
    devices = np.asarray(mesh.devices)
    key: tuple = (
        tuple(int(d.id) for d in devices.flat),
        tuple(devices.shape),
        tuple(mesh.axis_names),
        axes,
    )
    if site is not None:
        key += ("persistent", site, extra_bytes)
    if key in _communicators:
        return _communicators[key]
    groups = _groups(mesh, axes)
    if groups.shape[1] != group_size:
        raise ValueError(
            f"jax_ark: group_size {group_size} differs from the mesh's {groups.shape[1]} "
            f"devices along {axes}"
        )
    comm_id = _comm_id(key)
    module = _module()
    me = jax.process_index()
    multi_process = jax.process_count() > 1
    for color, group in enumerate(groups):
        local = [(r, d) for r, d in enumerate(group) if d.process_index == me]
        if not local:
            continue
        entries: dict[int, tuple[int, int, bytes]] = {}
        for r, d in local:
            handle = module.comm_create(
                comm_id, d.local_hardware_id, r, group_size, *sizes, extra_bytes
            )
            entries[r] = (me, d.local_hardware_id, bytes(handle))
        if multi_process:
            client = _kv_client()
            prefix = f"jax_ark/comm/{comm_id}/{color}"
            for r, (pid, dev, handle) in entries.items():
                client.key_value_set(f"{prefix}/{r}", f"{pid}:{dev}:{handle.hex()}")
            for r, d in enumerate(group):
                if r in entries:
                    continue
                try:
                    value = client.blocking_key_value_get(f"{prefix}/{r}", _BOOTSTRAP_TIMEOUT_MS)
                except Exception as err:  # the client raises its own error type
                    raise RuntimeError(
                        f"jax_ark: bootstrap of communicator {comm_id} (group {color}): rank {r} "
                        f"(process {d.process_index}) did not publish its IPC handle within "
                        f"{_BOOTSTRAP_TIMEOUT_MS} ms: {err}"
                    ) from err
                pid, dev, hexhandle = value.split(":")
                entries[r] = (int(pid), int(dev), bytes.fromhex(hexhandle))
        for r, d in local:
            peers = []
            for j in range(group_size):
                pid, dev, handle = entries[j]
                if j == r:
                    kind = "self"
                elif pid == me:
                    kind = "local"
                else:
                    kind = "ipc"
                peers.append((kind, dev, handle))
            module.comm_connect(comm_id, d.local_hardware_id, peers)
    _communicators[key] = comm_id
    return comm_id


# ---- errors -----------------------------------------------------------------------------------


def check() -> None:
    """Raises RuntimeError (naming op, rank and peer) if a GPU collective or persistent kernel of
    this process failed.

    GPU calls never synchronize, so a timeout inside a kernel surfaces at the NEXT call on that
    communicator or device (as DEADLINE_EXCEEDED) or here; with JAX_ARK_CUDA_GRAPHS=1, calls that
    XLA replays from a CUDA graph run no handler, so only here. A persistent kernel's failure is
    reported once (the next call or check() clears it).
    """
    module = _ffi.cuda_module()
    if module is None:
        return
    record = module.last_error()
    if record is not None:
        raise RuntimeError(record["message"])
    try:
        gpus = jax.local_devices(backend="cuda")
    except RuntimeError:  # no CUDA backend in this process
        return
    for device in gpus:
        message = module.persistent_take_failure(device.local_hardware_id)
        if message is not None:
            raise RuntimeError(message)


# ---- single-GPU harness (tests, benchmark) ----------------------------------------------------


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _dtype_name(dtype: Any) -> str:
    name = _np_dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"jax_ark: unsupported dtype {name}; expected one of {sorted(_DTYPES)}")
    return name


def _harness_inputs(op, dtype, n_ranks: int, input_sets):
    """Checks the harness inputs (each set: one x per rank, one shape); returns the op code, the
    numpy dtype, the sets as contiguous arrays and the shape of each rank's y."""
    dtype = _np_dtype(_dtype_name(dtype))
    op_code = _code(_OPS, op, "op")
    sets = [[np.ascontiguousarray(np.asarray(a, dtype=dtype)) for a in s] for s in input_sets]
    if not sets or any(len(s) != n_ranks for s in sets):
        raise ValueError(f"jax_ark: every input set needs {n_ranks} inputs, one per rank")
    shape = sets[0][0].shape
    if any(a.shape != shape for s in sets for a in s):
        raise ValueError("jax_ark: all ranks' inputs must have one shape")
    if op_code in (2, 4) and (len(shape) == 0 or shape[0] != n_ranks):
        raise ValueError("jax_ark: reduce_scatter/all_to_all inputs need a leading axis of n_ranks")
    out_shape = {0: shape, 1: (n_ranks, *shape), 2: shape[1:], 3: shape, 4: shape}[op_code]
    return op_code, dtype, sets, out_shape


def harness_run(
    op: str | int,
    reduce: str | int,
    dtype: Any,
    n_ranks: int,
    inputs: Sequence[np.ndarray],
    send_to: Sequence[int] | None = None,
    recv_from: Sequence[int] | None = None,
    *,
    iters: int = 1,
    timeout_ms: int = 10_000,
    blocks: int = 0,
    piece_bytes: int = _PIECE_BYTES,
    ll_bytes: int = _LL_BYTES,
    skip_rank: int = -1,
) -> list[np.ndarray]:
    """Runs one collective on `n_ranks` (<= 16) ranks on the current GPU, one cooperative launch.

    inputs[r] is rank r's x (shapes as in docs/internals.md: (n, *S) for reduce_scatter and
    all_to_all). Returns each rank's y. `piece_bytes` small forces many chunked rounds; `ll_bytes`
    is the largest per-peer message taking the LL path; `skip_rank` never launches that rank.
    """
    op_code, dtype, (arrays,), out_shape = _harness_inputs(op, dtype, n_ranks, [inputs])
    raw = _module().harness_run(
        op_code,
        _code(_REDUCES, reduce, "reduce"),
        _DTYPES[dtype.name],
        n_ranks,
        [a.tobytes() for a in arrays],
        list(send_to or ()),
        list(recv_from or ()),
        iters=iters,
        timeout_ms=timeout_ms,
        blocks=blocks,
        piece_bytes=piece_bytes,
        ll_bytes=ll_bytes,
        skip_rank=skip_rank,
    )
    return [np.frombuffer(b, dtype=dtype).reshape(out_shape) for b in raw]


def harness_run_calls(
    op: str | int,
    reduce: str | int,
    dtype: Any,
    n_ranks: int,
    input_sets: Sequence[Sequence[np.ndarray]],
    send_to: Sequence[int] | None = None,
    recv_from: Sequence[int] | None = None,
    *,
    iters: int,
    timeout_ms: int = 10_000,
    blocks: int = 0,
    piece_bytes: int = _PIECE_BYTES,
    ll_bytes: int = _LL_BYTES,
) -> list[list[np.ndarray]]:
    """`iters` back-to-back calls; call i reads input_sets[i % len(input_sets)] (one x per rank)
    and writes its own y. Returns ys[i][r]: every call's result, so a call that consumed stale
    scratch (an earlier call's data) shows up as a wrong result, not only as a timeout.
    """
    op_code, dtype, sets, out_shape = _harness_inputs(op, dtype, n_ranks, input_sets)
    raw = _module().harness_run(
        op_code,
        _code(_REDUCES, reduce, "reduce"),
        _DTYPES[dtype.name],
        n_ranks,
        [b"".join(s[r].tobytes() for s in sets) for r in range(n_ranks)],
        list(send_to or ()),
        list(recv_from or ()),
        iters=iters,
        timeout_ms=timeout_ms,
        blocks=blocks,
        piece_bytes=piece_bytes,
        ll_bytes=ll_bytes,
        input_sets=len(sets),
        all_outputs=True,
    )
    per_rank = [np.frombuffer(b, dtype=dtype).reshape(iters, *out_shape) for b in raw]
    return [[per_rank[r][i] for r in range(n_ranks)] for i in range(iters)]


def harness_time(
    op: str | int,
    dtype: Any,
    n_ranks: int,
    nbytes: int,
    iters: int = 100,
    *,
    reduce: str | int = "sum",
    graph: bool = True,
    timeout_ms: int = 10_000,
    blocks: int = 0,
    piece_bytes: int = _PIECE_BYTES,
    ll_bytes: int = _LL_BYTES,
) -> float:
    """Microseconds per call of `iters` back-to-back calls, `nbytes` of x per rank (cudaEvents).

    graph=True replays all ranks' launches from one CUDA graph (no host launch cost per call).
    """
    return _module().harness_time(
        _code(_OPS, op, "op"),
        _code(_REDUCES, reduce, "reduce"),
        _DTYPES[_dtype_name(dtype)],
        n_ranks,
        nbytes,
        iters,
        graph=graph,
        timeout_ms=timeout_ms,
        blocks=blocks,
        piece_bytes=piece_bytes,
        ll_bytes=ll_bytes,
    )


def copy_bandwidth(nbytes: int, iters: int = 20) -> float:
    """Device-to-device copy bandwidth of the current GPU in GB/s (bytes read + bytes written)."""
    return _module().copy_bandwidth(nbytes, iters)
