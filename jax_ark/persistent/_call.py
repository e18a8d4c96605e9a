"""`persistent(fn)` and `plan(fn, *args)`: trace, plan, and run as one `ark_persistent` FFI call."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark.persistent._format import PROFILE_WORDS_PER_TASK, Plan, PlanError, np_dtype
from jax_ark.persistent._schedule import build_plan
from jax_ark.persistent._trace import trace
from jax_ark.persistent._validate import validate

_TARGET = "ark_persistent"
_DEFAULT_TIMEOUT_MS = 60_000


def _default_workers() -> int:
    env = os.environ.get("JAX_ARK_PERSISTENT_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 8))


def _chaos_seed() -> int:
    """Test mode (env JAX_ARK_PERSISTENT_CHAOS=<seed>): random 0..200 us delays before each task."""
    return int(os.environ.get("JAX_ARK_PERSISTENT_CHAOS", "0") or 0)


def _flat_avals(args) -> tuple[list, Any, tuple]:
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
    key = (tree, tuple((a.shape, str(a.dtype)) for a in avals))
    return leaves, tree, key


def plan(
    fn: Callable,
    *args,
    num_workers: int | None = None,
    tile_m: int | None = None,
    tile_n: int | None = None,
) -> Plan:
    """The plan `persistent(fn)` runs for these arguments (arrays or ShapeDtypeStructs)."""
    _, tree, _ = _flat_avals(args)
    leaves = jax.tree_util.tree_leaves(args)
    avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]

    def flat_fn(*flat):
        return jax.tree_util.tree_leaves(fn(*jax.tree_util.tree_unflatten(tree, flat)))

    traced = trace(flat_fn, avals)
    return build_plan(traced, num_workers or _default_workers(), tile_m, tile_n)


def _varying_axes(in_avals) -> tuple:
    """Mesh axes some input varies over (inside shard_map); () outside."""
    axes: set = set()
    for a in in_avals:
        mat = getattr(a, "manual_axis_type", None)
        if mat is not None:
            axes |= set(mat.varying)
        axes |= set(getattr(a, "vma", None) or ())
    return tuple(sorted(axes))


def _mark_varying(x, axes: tuple):
    """ffi_call results come back typed as invariant across the mesh (shared/DESIGN.md); they are
    per-device values, so declare them varying over the inputs' axes."""
    if not axes:
        return x
    have = set(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()) or ())
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _check_signature(p: Plan, avals) -> None:
    if len(avals) != p.num_inputs:
        raise PlanError(f"plan takes {p.num_inputs} inputs, the function got {len(avals)}")
    for i, (t, aval) in enumerate(zip(p.args, avals, strict=False)):
        spec = p.tensors[t]
        if tuple(spec.shape) != tuple(aval.shape) or np_dtype(spec.dtype) != np.dtype(aval.dtype):
            raise PlanError(
                f"plan input {i} is {spec.dtype}{list(spec.shape)}, the argument is "
                f"{np.dtype(aval.dtype).name}{list(aval.shape)}"
            )


def run_plan(p: Plan, flat_args, *, profile: bool = False, timeout_ms: int = _DEFAULT_TIMEOUT_MS):
    """Binds one ark_persistent call; returns (flat outputs, profile array or None)."""
    axes = _varying_axes([jax.typeof(x) for x in flat_args if isinstance(x, jax.Array)])
    operands = list(flat_args)
    for t in p.args[p.num_inputs :]:
        operands.append(jnp.asarray(p.constants[t]))
    operands.append(jnp.asarray(p.to_binary()))
    results = [
        jax.ShapeDtypeStruct(p.tensors[o].shape, np_dtype(p.tensors[o].dtype)) for o in p.outputs
    ]
    results.append(jax.ShapeDtypeStruct((max(p.workspace_bytes, 1),), np.uint8))
    results.append(jax.ShapeDtypeStruct((len(p.tasks),), np.int32))
    if profile:
        results.append(jax.ShapeDtypeStruct((len(p.tasks) * PROFILE_WORDS_PER_TASK,), np.int64))
    outs = jax.ffi.ffi_call(_TARGET, results, vmap_method="sequential")(
        *operands,
        num_workers=np.int64(p.num_workers),
        num_tasks=np.int64(len(p.tasks)),
        timeout_ms=np.int64(timeout_ms),
        chaos_seed=np.int64(_chaos_seed()),
        profile=np.int64(1 if profile else 0),
    )
    outs = [_mark_varying(o, axes) for o in outs]
    n = len(p.outputs)
    return list(outs[:n]), (outs[n + 2] if profile else None)


class _Persistent:
    """The callable `persistent(fn)` returns: same signature and results as fn."""

    def __init__(self, fn, plan, num_workers, profile, timeout_ms, tile_m, tile_n):
        self._fn = fn
        self._plan = plan
        self._num_workers = num_workers
        self._profile = profile
        self._timeout_ms = timeout_ms
        self._tiles = (tile_m, tile_n)
        self._cache: dict = {}
        if plan is not None:
            validate(plan)
        functools.update_wrapper(self, fn)

    def plan(self, *args) -> Plan:
        """The plan used for these arguments (traced and planned once per signature)."""
        leaves, tree, key = _flat_avals(args)
        if key not in self._cache:
            avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
            out_tree = jax.tree_util.tree_structure(
                jax.eval_shape(self._fn, *jax.tree_util.tree_unflatten(tree, avals))
            )
            if self._plan is not None:
                _check_signature(self._plan, avals)
                p = self._plan
            else:
                p = plan(
                    self._fn,
                    *args,
                    num_workers=self._num_workers,
                    tile_m=self._tiles[0],
                    tile_n=self._tiles[1],
                )
            if len(p.outputs) != out_tree.num_leaves:
                raise PlanError(
                    f"plan has {len(p.outputs)} outputs, fn returns {out_tree.num_leaves}"
                )
            self._cache[key] = (p, out_tree)
        return self._cache[key][0]

    def __call__(self, *args):
        self.plan(*args)
        leaves, _, key = _flat_avals(args)
        p, out_tree = self._cache[key]
        outs, prof = run_plan(p, leaves, profile=self._profile, timeout_ms=self._timeout_ms)
        result = jax.tree_util.tree_unflatten(out_tree, outs)
        return (result, prof) if self._profile else result


def persistent(
    fn: Callable,
    *,
    plan: Plan | None = None,
    num_workers: int | None = None,
    profile: bool = False,
    timeout_ms: int = _DEFAULT_TIMEOUT_MS,
    tile_m: int | None = None,
    tile_n: int | None = None,
) -> Callable:
    """Runs fn as one persistent kernel (one FFI call): same signature and results as fn.

    plan: run this (validated, possibly user-edited) plan instead of planning fn.
    num_workers: worker threads (CPU) / SMs (GPU) the planner targets (default: min(cores, 8)).
    profile: the call returns (result, profile) where profile is int64[num_tasks * 4] (see
    `jax_ark.timeline`). timeout_ms bounds every dependency wait.
    """
    return _Persistent(fn, plan, num_workers, profile, timeout_ms, tile_m, tile_n)
