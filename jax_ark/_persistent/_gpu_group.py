"""A plan with put tasks (v3 `comm`) run by the CUDA executor on ONE GPU, every rank of its group
at once: the single-GPU multi-rank harness of `_ark_cuda` (`persistent_group_run`), for tests and
bring-up without several GPUs or a jax mesh of GPUs.

Each call is one cooperative launch of all ranks (grid = ranks x workers blocks), so every rank's
blocks are resident together; the calls run back to back as calls 1..C of one call site, which is
what exercises the epochs that keep a call from reading an inbox of the previous one.

Everything the caller gives is checked here before the module is needed, so a wrong input fails
with a message naming the call, the rank and the input, never on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_ark import _ffi
from jax_ark._persistent._format import Plan, PlanError, np_dtype
from jax_ark._persistent._validate import freeze

_HARNESS = "persistent_group_run"


def group_run(
    plan: Plan,
    calls: Sequence[Sequence[Sequence[Any]]],
    *,
    timeout_ms: int = 10_000,
    chaos_seed: int = 0,
    skip_rank: int = -1,
) -> list[list[list[np.ndarray]]]:
    """Runs `plan` on every rank of its group on the current GPU, once per call.

    calls[c][r]: rank r's user inputs of call c (numpy arrays of the plan's input shapes and
    dtypes, in the plan's input order; the plan's constants are appended here). Returns
    out[c][r][j]: rank r's output j (plan.outputs order) after call c.
    timeout_ms bounds every wait on the device; chaos_seed != 0 runs the kernel's chaos mode
    (random stalls, adversarial orders); skip_rank >= 0 makes that rank's blocks return at once,
    so that its peers time out. A timeout, or a plan the device rejects, raises RuntimeError
    naming the rank, the peer, the task and its op.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"group_run: plan must be a jax_ark Plan, got {type(plan).__name__}")
    if plan.comm is None:
        raise PlanError(
            "group_run: the plan has no communication group (no put task, no axis_index): run "
            "it with ark.persistent or the reference interpreter's interpret()"
        )
    # The words sent are those of a validated copy: edits of `plan` after this call, or a plan
    # edited into an invalid one before it, never reach the device.
    frozen = freeze(plan)
    n_ranks = frozen.comm.group_size
    _check_int("timeout_ms", timeout_ms, 1, 2**31 - 1)
    _check_int("chaos_seed", chaos_seed, 0, 2**31 - 1)
    _check_int("skip_rank", skip_rank, -1, n_ranks - 1)
    operands = _encode_calls(frozen, calls, n_ranks)
    if not frozen.tasks:
        # Every output is empty (see run_plan): nothing to launch.
        empty = [np.zeros(frozen.tensors[o].shape, _dtype_of(frozen, o)) for o in frozen.outputs]
        return [[[a.copy() for a in empty] for _ in range(n_ranks)] for _ in operands]
    harness = _harness(frozen, n_ranks)
    words = np.ascontiguousarray(frozen.to_binary(), dtype="<i4").tobytes()
    raw = harness(words, n_ranks, operands, int(timeout_ms), int(chaos_seed), int(skip_rank))
    return _decode_outputs(frozen, raw, len(operands), n_ranks)


def group_time(
    plan: Plan,
    inputs: Sequence[Sequence[Any]],
    *,
    iters: int = 20,
    ranks: int | None = None,
    timeout_ms: int = 10_000,
) -> float:
    """Microseconds per call of `iters` back-to-back calls of `plan` on every rank at once on the
    current GPU (CUDA events around the launches only; one warm-up call first).

    inputs[r]: rank r's user inputs, as one call of group_run. A plan without a communication
    group (a compute-only baseline) runs as `ranks` independent copies, so that it shares the
    GPU the way the communicating plan's ranks do."""
    frozen = freeze(plan)
    if frozen.comm is not None:
        n_ranks = frozen.comm.group_size
        if ranks not in (None, n_ranks):
            raise ValueError(f"group_time: the plan's group has {n_ranks} ranks, not {ranks}")
    elif ranks is None:
        raise ValueError("group_time: a plan without a communication group needs ranks=")
    else:
        n_ranks = ranks
    _check_int("iters", iters, 1, 1 << 20)
    _check_int("timeout_ms", timeout_ms, 1, 2**31 - 1)
    _check_int("ranks", n_ranks, 1, 64)
    (operands,) = _encode_calls(frozen, [inputs], n_ranks)
    if not frozen.tasks:
        return 0.0
    timer = _harness(frozen, n_ranks, "persistent_group_time")
    words = np.ascontiguousarray(frozen.to_binary(), dtype="<i4").tobytes()
    return float(timer(words, n_ranks, operands, int(iters), int(timeout_ms)))


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"group_run: {name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"group_run: {name} = {value} is not in {lo}..{hi}")


def _dtype_of(plan: Plan, tensor: int) -> np.dtype:
    return np_dtype(plan.tensors[tensor].dtype)


def _encode_calls(
    plan: Plan, calls: Sequence[Sequence[Sequence[Any]]], n_ranks: int
) -> list[list[list[bytes]]]:
    """operands[c][r]: the FFI operands of rank r in call c as raw bytes (user inputs, then the
    plan's constants), after checking every input against the plan."""
    if isinstance(calls, (str, bytes, np.ndarray)) or not isinstance(calls, Sequence):
        raise TypeError(
            "group_run: calls must be a list (calls) of lists (ranks) of lists (inputs), got "
            f"{type(calls).__name__}"
        )
    if not calls:
        raise ValueError("group_run: calls is empty; give at least one call")
    constants = [
        np.ascontiguousarray(plan.constants[t], dtype=_dtype_of(plan, t)).tobytes()
        for t in plan.args[plan.num_inputs :]
    ]
    operands = []
    for c, ranks in enumerate(calls):
        if not isinstance(ranks, Sequence) or len(ranks) != n_ranks:
            got = len(ranks) if isinstance(ranks, Sequence) else type(ranks).__name__
            raise ValueError(
                f"group_run: call {c} has inputs for {got} ranks; the plan's group "
                f"({', '.join(plan.comm.axes)}) has {n_ranks} ranks"
            )
        per_rank = []
        for r, inputs in enumerate(ranks):
            if not isinstance(inputs, Sequence) or len(inputs) != plan.num_inputs:
                got = len(inputs) if isinstance(inputs, Sequence) else type(inputs).__name__
                raise ValueError(
                    f"group_run: call {c}, rank {r}: {got} inputs; the plan takes "
                    f"{plan.num_inputs} ({', '.join(_input_names(plan))})"
                )
            blobs = [_input_bytes(plan, i, x, c, r) for i, x in enumerate(inputs)]
            per_rank.append(blobs + constants)
        operands.append(per_rank)
    return operands


def _input_names(plan: Plan) -> list[str]:
    inputs = plan.args[: plan.num_inputs]
    return [plan.tensors[t].name or f"input {i}" for i, t in enumerate(inputs)]


def _input_bytes(plan: Plan, i: int, x: Any, call: int, rank: int) -> bytes:
    spec = plan.tensors[plan.args[i]]
    want = np_dtype(spec.dtype)
    a = np.asarray(x)
    if tuple(a.shape) != tuple(spec.shape) or a.dtype != want:
        # No conversion: a float64 array or a transposed shape is a caller's mistake, and
        # converting it would hide it.
        raise ValueError(
            f"group_run: call {call}, rank {rank}, input {i} ({spec.name}): the plan takes "
            f"{spec.dtype}{list(spec.shape)}, got {a.dtype.name}{list(a.shape)}"
        )
    return np.ascontiguousarray(a).tobytes()


def _harness(plan: Plan, n_ranks: int, entry: str = _HARNESS):
    module = _ffi.cuda_module()
    if module is None:
        raise RuntimeError(
            "group_run needs the CUDA runtime of jax_ark (jax_ark._ark_cuda), which this install "
            "does not have: build with a CUDA compiler (JAX_ARK_CUDA=ON, see README.md) and run "
            "on an NVIDIA GPU"
        )
    harness = getattr(module, entry, None)
    if harness is None:
        raise RuntimeError(
            f"group_run: this build of jax_ark._ark_cuda has no {entry} (the multi-rank "
            "harness of the persistent kernel): rebuild jax_ark"
        )
    resident = getattr(module, "persistent_max_workers", None)
    if resident is not None:
        # One cooperative launch holds every rank's workers: all must be resident at once.
        blocks = n_ranks * plan.num_workers
        fits = int(resident(0))
        if blocks > fits:
            raise PlanError(
                f"group_run: {n_ranks} ranks x {plan.num_workers} workers = {blocks} blocks in "
                f"one launch, but this GPU keeps only {fits} blocks of the persistent kernel "
                "resident; plan for fewer workers"
            )
    return harness


def _decode_outputs(
    plan: Plan, raw: Any, n_calls: int, n_ranks: int
) -> list[list[list[np.ndarray]]]:
    if len(raw) != n_calls or any(len(ranks) != n_ranks for ranks in raw):
        raise RuntimeError(
            f"group_run: {_HARNESS} returned {[len(ranks) for ranks in raw]} ranks per call, "
            f"expected {n_calls} calls of {n_ranks} ranks"
        )
    out: list[list[list[np.ndarray]]] = []
    for c, ranks in enumerate(raw):
        per_rank = []
        for r, blobs in enumerate(ranks):
            if len(blobs) != len(plan.outputs):
                raise RuntimeError(
                    f"group_run: call {c}, rank {r}: {_HARNESS} returned {len(blobs)} outputs, "
                    f"the plan has {len(plan.outputs)}"
                )
            arrays = []
            for j, (blob, t) in enumerate(zip(blobs, plan.outputs, strict=True)):
                spec = plan.tensors[t]
                if len(blob) != spec.nbytes:
                    raise RuntimeError(
                        f"group_run: call {c}, rank {r}, output {j}: {len(blob)} bytes, the "
                        f"plan's {spec.dtype}{list(spec.shape)} has {spec.nbytes}"
                    )
                a = np.frombuffer(blob, dtype=np_dtype(spec.dtype)).reshape(spec.shape)
                arrays.append(a.copy())  # writable, and independent of the module's bytes
            per_rank.append(arrays)
        out.append(per_rank)
    return out
