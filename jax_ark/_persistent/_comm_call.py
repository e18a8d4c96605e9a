"""The FFI call of a persistent plan with put tasks, as a primitive with per-platform lowerings.

A plan without communication is bound with `jax.ffi.ffi_call` (one lowering for every platform).
A plan with put tasks needs more on a GPU: the symmetric region of every rank of its group, which
only exists once the group's devices have exchanged CUDA IPC handles. That exchange happens when
the program is LOWERED, where the concrete mesh is known (the same moment and the same bootstrap as
jax_ark's GPU collectives, `_cuda_collectives`), so the call needs a lowering rule of its own:
- CPU: target `ark_persistent`, exactly what `ffi_call` would emit (the comm operand carries the
  rank; the CPU executor meets the group through its host communicator at run time);
- CUDA: bootstraps the call site's communicator with a region sized for the plan
  (`persistent_comm_needs` on the plan words), then target `ark_persistent_comm` with its id, or
  its command-buffer-compatible twin `ark_persistent_comm_graph` when JAX_ARK_CUDA_GRAPHS=1 (the
  epoch lives in the rank's device memory, so a replay from XLA's CUDA graph is a new call).

Results are typed invariant over the mesh, as `ffi_call`'s are; `run_plan` marks them varying.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import mlir

from jax_ark import _ffi
from jax_ark._persistent._target import prepare_gpus_for_graphs

ark_persistent_comm_p = jex_core.Primitive("ark_persistent_comm")
ark_persistent_comm_p.multiple_results = True

CPU_TARGET = "ark_persistent"
CUDA_TARGET = "ark_persistent_comm"
CUDA_GRAPH_TARGET = "ark_persistent_comm_graph"


def bind(
    operands: list,
    results: list[jax.ShapeDtypeStruct],
    aliases: dict[int, int],
    *,
    plan_words: np.ndarray,
    comm_axes: tuple,
    group_size: int,
    site: int,
    **attributes: Any,
) -> list:
    """One call of a plan with put tasks. `operands` end with the comm operand and the plan;
    `attributes` are the ark_persistent attributes (numpy scalars)."""
    return ark_persistent_comm_p.bind(
        *operands,
        results=tuple((tuple(r.shape), np.dtype(r.dtype)) for r in results),
        aliases=tuple(sorted(aliases.items())),
        plan_bytes=np.ascontiguousarray(plan_words, dtype=np.int32).tobytes(),
        comm_axes=tuple(comm_axes),
        group_size=int(group_size),
        site=int(site),
        attributes=tuple(sorted(attributes.items())),
    )


def _abstract_eval(*operands, results, **_):
    del operands
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in results]


ark_persistent_comm_p.def_abstract_eval(_abstract_eval)


def _impl(*args, **params):
    raise RuntimeError(
        "a persistent plan with collectives runs inside jax.shard_map under jax.jit (it was called "
        "eagerly)"
    )


ark_persistent_comm_p.def_impl(_impl)


def _lower_cpu(ctx, *operands, aliases, attributes, **_):
    rule = jax.ffi.ffi_lowering(CPU_TARGET, operand_output_aliases=dict(aliases) or None)
    return rule(ctx, *operands, **dict(attributes))


def _lower_cuda(ctx, *operands, aliases, attributes, plan_bytes, comm_axes, group_size, site, **_):
    from jax_ark import _cuda_collectives

    module = _cuda_collectives._module()
    needs_group, inbox_bytes, region_bytes = module.persistent_comm_needs(plan_bytes)
    if needs_group != group_size:
        raise ValueError(
            f"ark.persistent: the plan's words say a group of {needs_group} ranks, its call "
            f"{group_size}"
        )
    mesh = _cuda_collectives._concrete_mesh(ctx)
    comm_id = _cuda_collectives.plan_communicator(
        mesh, tuple(comm_axes), group_size, site, region_bytes
    )
    target = CUDA_TARGET
    if _cuda_collectives.graphs_requested():
        target = CUDA_GRAPH_TARGET
        prepare_gpus_for_graphs()
    rule = jax.ffi.ffi_lowering(target, operand_output_aliases=dict(aliases) or None)
    return rule(
        ctx,
        *operands,
        **dict(attributes),
        comm_id=np.int64(comm_id),
        inbox_bytes=np.int64(inbox_bytes),
    )


def _lower_unsupported(ctx, *args, **params):
    platforms = getattr(ctx.module_context, "platforms", ("?",))
    raise NotImplementedError(
        f"ark.persistent plans with collectives have no executor for platform(s) "
        f"{tuple(platforms)}: the CPU executor is always built, the CUDA one where jax_ark was "
        "built with CUDA"
    )


mlir.register_lowering(ark_persistent_comm_p, _lower_unsupported)
mlir.register_lowering(ark_persistent_comm_p, _lower_cpu, platform="cpu")
if _ffi.has_cuda():
    mlir.register_lowering(ark_persistent_comm_p, _lower_cuda, platform="cuda")
