"""Helpers of the tests that run a communicating plan on every rank at once outside jax (the
single-GPU harness, `jax_ark._persistent._gpu_group.group_run`): plan fn for the GPU inside
jax.shard_map over CPU devices, split arguments into every rank's local inputs, and get every
rank's outputs of `jax.jit(jax.shard_map(fn))` with jax.lax's collectives.

Ranks: the plan's group spans mesh axes comm.axes (mesh order); rank r is jax.lax.axis_index of
those axes, row-major. A group smaller than the mesh is the one whose other coordinates are 0.
"""

from __future__ import annotations

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


def _stack_per_device(mesh, fn, args, in_specs):
    """fn's results on every device, stacked along a new leading axis in mesh (row-major)
    order: entry d is device mesh.devices.flat[d]'s local value."""
    every = P(tuple(mesh.axis_names))

    def body(*local):
        return [o[None] for o in jax.tree.leaves(fn(*local))]

    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=every, check_vma=False)
    return [np.asarray(o) for o in jax.jit(run)(*args)]


def rank_devices(mesh, plan: Plan) -> list[int]:
    """Index in mesh.devices.flat of each rank of the plan's group."""
    sizes = [int(mesh.shape[a]) for a in plan.comm.axes]
    out = []
    for r in range(plan.comm.group_size):
        coords = dict(zip(plan.comm.axes, np.unravel_index(r, sizes), strict=True))
        where = [int(coords.get(a, 0)) for a in mesh.axis_names]
        out.append(int(np.ravel_multi_index(where, [int(mesh.shape[a]) for a in mesh.axis_names])))
    return out


def local_inputs(mesh, plan: Plan, args, in_specs) -> list[list[np.ndarray]]:
    """Every rank's local inputs (rank order), as jax.shard_map splits args."""
    stacked = _stack_per_device(mesh, lambda *a: list(a), args, in_specs)
    return [[s[d] for s in stacked] for d in rank_devices(mesh, plan)]


def lax_outputs(mesh, plan: Plan, fn, args, specs: dict) -> list[list[np.ndarray]]:
    """Every rank's local outputs (rank order) of jax.jit(jax.shard_map(fn)) with jax.lax."""
    stacked = _stack_per_device(mesh, fn, args, specs["in_specs"])
    return [[s[d] for s in stacked] for d in rank_devices(mesh, plan)]
