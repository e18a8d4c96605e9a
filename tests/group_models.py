"""Helpers of the tests that run a communicating plan on every rank at once outside jax (the
single-GPU harness, `jax_ark._persistent._gpu_group.group_run`): plan fn for the GPU inside
jax.shard_map over CPU devices, split arguments into every rank's local inputs, and get every
rank's outputs of `jax.jit(jax.shard_map(fn))` with jax.lax's collectives.

Ranks: the plan's group spans mesh axes comm.axes (mesh order); rank r is jax.lax.axis_index of
those axes, row-major. A group smaller than the mesh is the one whose other coordinates are 0.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark._persistent._format import Plan


def plan_for_gpu(mesh, fn, args, specs: dict, *, num_workers: int, **kw) -> Plan:
    """The plan ark.persistent(fn) runs on a GPU for one device's part of args (planned inside
    jax.shard_map, where the mesh axes are bound; only traced, nothing runs)."""
    box: list[Plan] = []

    def body(*local):
        box.append(ark.plan(fn, *local, platform="gpu", num_workers=num_workers, **kw))
        return fn(*local)

    jax.eval_shape(jax.shard_map(body, mesh=mesh, check_vma=False, **specs), *args)
    return box[0]


@functools.lru_cache(maxsize=64)
def _per_device(mesh, fn, in_specs):
    """jax.jit of fn under shard_map, its results on every device stacked along a new leading
    axis in mesh (row-major) order: entry d is device mesh.devices.flat[d]'s local value.
    Cached, so that several calls' arguments compile it once."""
    every = P(tuple(mesh.axis_names))

    def body(*local):
        return [o[None] for o in jax.tree.leaves(fn(*local))]

    return jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=every, check_vma=False)
    )


def _identity(*args):
    return list(args)


def rank_devices(mesh, plan: Plan) -> list[int]:
    """Index in mesh.devices.flat of each rank of the plan's group."""
    sizes = [int(mesh.shape[a]) for a in plan.comm.axes]
    out = []
    for r in range(plan.comm.group_size):
        coords = dict(zip(plan.comm.axes, np.unravel_index(r, sizes), strict=True))
        where = [int(coords.get(a, 0)) for a in mesh.axis_names]
        out.append(int(np.ravel_multi_index(where, [int(mesh.shape[a]) for a in mesh.axis_names])))
    return out


def _by_rank(mesh, plan: Plan, fn, args, in_specs) -> list[list[np.ndarray]]:
    stacked = [np.asarray(o) for o in _per_device(mesh, fn, in_specs)(*args)]
    return [[s[d] for s in stacked] for d in rank_devices(mesh, plan)]


def local_inputs(mesh, plan: Plan, args, in_specs) -> list[list[np.ndarray]]:
    """Every rank's local inputs (rank order), as jax.shard_map splits args."""
    return _by_rank(mesh, plan, _identity, args, in_specs)


def lax_outputs(mesh, plan: Plan, fn, args, specs: dict) -> list[list[np.ndarray]]:
    """Every rank's local outputs (rank order) of jax.jit(jax.shard_map(fn)) with jax.lax."""
    return _by_rank(mesh, plan, fn, args, specs["in_specs"])
