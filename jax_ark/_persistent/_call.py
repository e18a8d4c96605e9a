"""`persistent(fn)` and `plan(fn, *args)`: trace, plan, and run as one `ark_persistent` FFI call."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark import _collective_primitive as _prim
from jax_ark._cuda_collectives import graphs_requested
from jax_ark._ffi import cpu_module
from jax_ark._persistent import _comm_call
from jax_ark._persistent._format import (
    DEFAULT_MAX_WHILE_ITERATIONS,
    DTYPE_CODES,
    MAX_TRIP_COUNT,
    MAX_WORKERS,
    PROFILE_WORDS_PER_TASK,
    Plan,
    PlanError,
    np_dtype,
)
from jax_ark._persistent._random import key_data_arguments, with_output_keys
from jax_ark._persistent._schedule import build_plan
from jax_ark._persistent._target import (
    concurrent_cpu_programs,
    default_workers,
    prepare_gpus_for_graphs,
    resolve_platform,
)
from jax_ark._persistent._trace import UnsupportedError, host_debug_eqns, trace
from jax_ark._persistent._validate import freeze

_TARGET = "ark_persistent"
# The same handler declared command-buffer compatible on CUDA (xla_ffi/gpu/persistent.cc), for
# plans without put tasks when JAX_ARK_CUDA_GRAPHS=1 at lowering, as for the collectives
# (docs/gpu_runtime.md, "CUDA graphs"): XLA may then replay the launch from its CUDA graph, and a
# failure on the device shows through jax_ark.check() instead of the next call's error.
_GRAPH_TARGET = "ark_persistent_graph"
_DEFAULT_TIMEOUT_MS = 60_000


def _chaos_seed() -> int:
    """Test mode (env JAX_ARK_PERSISTENT_CHAOS=<seed>): random 0..200 us delays before each task."""
    return int(os.environ.get("JAX_ARK_PERSISTENT_CHAOS", "0") or 0)


def _flat_avals(args) -> tuple[list, Any, list, tuple]:
    """(leaves, tree, their shapes/dtypes/varying axes, a hashable signature key) of a call's
    arguments."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = [_aval_of(x) for x in leaves]
    key = (
        tree,
        tuple((a.shape, str(a.dtype), _varying_of(x)) for a, x in zip(avals, leaves, strict=True)),
    )
    return leaves, tree, avals, key


def _varying_of(x) -> tuple:
    if not isinstance(x, jax.Array):
        return ()
    return tuple(sorted(_prim.varying_axes(jax.typeof(x)), key=str))


def _aval_of(x):
    """x's shape and dtype, and inside jax.shard_map the mesh axes it varies over (then x's own
    abstract value, which carries them): the planner traces fn on these, and what jax derives
    depends on them (jax.grad transposes a psum of a varying value to a pvary, to another psum
    without the type)."""
    if isinstance(x, jax.Array) and _prim.varying_axes(jax.typeof(x)):
        return jax.typeof(x)
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def plan(
    fn: Callable,
    *args,
    num_workers: int | None = None,
    tile_m: int | None = None,
    tile_n: int | None = None,
    platform: str | None = None,
    max_while_iterations: int = DEFAULT_MAX_WHILE_ITERATIONS,
) -> Plan:
    """The plan `persistent(fn)` runs for these arguments (arrays or ShapeDtypeStructs).

    platform: "cpu" or "gpu", the executor the defaults (worker count, tile shapes) are chosen for,
    and the ops it runs (a matmul storing into a dynamic_update_slice's window: CPU only);
    default: the platform of the arguments' devices, else jax's default backend, as
    `persistent(fn)(*args)` does. Planning for "gpu" without a GPU needs num_workers.
    max_while_iterations: the guard of each while_loop (one more body iteration fails the call).
    """
    _check_max_while(max_while_iterations)
    _check_workers(num_workers)
    fn, args = key_data_arguments(fn, args)
    leaves, tree, avals, _ = _flat_avals(args)
    target, device = resolve_platform(leaves, platform)
    workers = num_workers or default_workers(target, device)

    def flat_fn(*flat):
        return jax.tree_util.tree_leaves(fn(*jax.tree_util.tree_unflatten(tree, flat)))

    traced = trace(flat_fn, avals, _arg_names(fn, args), int(max_while_iterations), target)
    return build_plan(traced, workers, tile_m, tile_n, platform=target)


def _check_max_while(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise PlanError(f"max_while_iterations must be an integer, got {type(n).__name__}")
    if not 1 <= n < MAX_TRIP_COUNT:
        raise PlanError(f"max_while_iterations {n} not in 1..{MAX_TRIP_COUNT - 1}")


def _check_workers(num_workers: int | None) -> None:
    if num_workers is None:
        return
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
        raise PlanError(f"num_workers must be an integer, got {type(num_workers).__name__}")
    if not 1 <= num_workers <= MAX_WORKERS:
        raise PlanError(
            f"num_workers must be in 1..{MAX_WORKERS} (the runtime's range), got {num_workers}"
        )


def _arg_names(fn: Callable, args: tuple) -> list[str]:
    """The user's name of every flat argument: the parameter name, then its pytree path
    (``cache['k']``, ``params.layers[0].w``); ``args[i]...`` when fn has no usable signature."""
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(args)[0]:
        i = getattr(path[0], "idx", 0)
        head = params[i] if i < len(params) else f"args[{i}]"
        names.append(head + jax.tree_util.keystr(tuple(path[1:])))
    return names


def _varying_axes(in_avals) -> tuple:
    """Mesh axes some input varies over (inside shard_map); () outside."""
    axes: set = set()
    for a in in_avals:
        axes |= _prim.varying_axes(a)
    return tuple(sorted(axes))


def _mark_varying(x, axes: tuple):
    """ffi_call results come back typed as invariant across the mesh (shared/DESIGN.md); they are
    per-device values, so declare them varying over the inputs' axes."""
    if not axes:
        return x
    have = _prim.varying_axes(jax.typeof(x))
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


def run_plan(
    p: Plan,
    flat_args,
    *,
    profile: bool = False,
    timeout_ms: int = _DEFAULT_TIMEOUT_MS,
    words: np.ndarray | None = None,
    check_on_host: bool = False,
    out_varying: list[tuple] | None = None,
):
    """Binds one ark_persistent call; returns (flat outputs, profile array or None).

    words: the binary plan to send instead of p.to_binary() (tests of the runtime's own check).
    check_on_host: run the runtime's binary-plan check here, on the exact words sent (for the GPU,
    whose handler cannot read the plan operand in device memory without a stream sync; the CPU
    handler checks the words it receives itself).
    out_varying: the mesh axes each output varies over (default: every axis an input varies
    over; a psum's result varies over fewer)."""
    if not p.tasks:
        # Every output has a zero-size dim (an op is planned for every non-empty output): there is
        # nothing to run, and a kernel with no tasks would only cost a launch.
        outs = [jnp.zeros(p.tensors[o].shape, np_dtype(p.tensors[o].dtype)) for o in p.outputs]
        return outs, (jnp.zeros((0,), np.int64) if profile else None)
    axes = _varying_axes([jax.typeof(x) for x in flat_args if isinstance(x, jax.Array)])
    operands = list(flat_args)
    for t in p.args[p.num_inputs :]:
        operands.append(jnp.asarray(p.constants[t]))
    plan_words = np.ascontiguousarray(p.to_binary() if words is None else words, dtype=np.int32)
    results = [
        jax.ShapeDtypeStruct(p.tensors[o].shape, np_dtype(p.tensors[o].dtype)) for o in p.outputs
    ]
    results.append(jax.ShapeDtypeStruct((max(p.workspace_bytes, 1),), np.uint8))
    results.append(jax.ShapeDtypeStruct((p.num_counters,), np.int32))
    # Results updated in place share their operand's buffer (with jax.jit donation of that
    # argument XLA passes the buffer itself; otherwise it copies the operand once before the call).
    aliases = {p.tensors[o].alias: i for i, o in enumerate(p.outputs) if p.tensors[o].alias >= 0}
    if check_on_host:
        for i, op in enumerate(p.ops):
            if op.kind == "matmul" and op.store_view >= 0:
                raise PlanError(
                    f"op {i} '{op.name}': a matmul's window store runs on the CPU executor only; "
                    "plan for the GPU (ark.plan(..., platform='gpu')) to store it with a map"
                )
            if op.kind == "put" and op.read_in_place:
                raise PlanError(
                    f"op {i} '{op.name}': a put read in place runs on the CPU executor only; "
                    "plan for the GPU (ark.plan(..., platform='gpu')) to copy it"
                )
        _check_words_on_host(plan_words, operands, results, aliases)
    group = None
    site = 0
    if p.comm is not None:
        group, comm_operand, site = _comm_operand(p, plan_words)
        operands.append(comm_operand)
    operands.append(jnp.asarray(plan_words))
    if profile:
        results.append(jax.ShapeDtypeStruct((len(p.tasks) * PROFILE_WORDS_PER_TASK,), np.int64))
    attributes = dict(
        num_workers=np.int64(p.num_workers),
        num_tasks=np.int64(len(p.tasks)),
        timeout_ms=np.int64(timeout_ms),
        chaos_seed=np.int64(_chaos_seed()),
        profile=np.int64(1 if profile else 0),
    )
    if p.comm is None:
        target = _TARGET
        if graphs_requested():
            target = _GRAPH_TARGET
            prepare_gpus_for_graphs()
        outs = jax.ffi.ffi_call(
            target, results, vmap_method="sequential", input_output_aliases=aliases or None
        )(*operands, **attributes)
    else:
        # Its own primitive: on GPUs the lowering bootstraps the group's symmetric regions.
        outs = _comm_call.bind(
            operands,
            results,
            aliases,
            plan_words=plan_words,
            comm_axes=p.comm.axes,
            group_size=p.comm.group_size,
            site=site,
            **attributes,
        )
    if out_varying is None:
        outs = [_mark_varying(o, axes) for o in outs]
    else:
        n = len(p.outputs)
        # workspace, counters and profile differ per rank, whatever the inputs are
        per_rank = tuple(sorted(set(axes) | set(p.comm.axes if p.comm else ()), key=str))
        outs = [_mark_varying(o, v) for o, v in zip(outs[:n], out_varying, strict=True)] + [
            _mark_varying(o, per_rank) for o in outs[n:]
        ]
    if group is not None:
        _prim.remember(outs[0])
    n = len(p.outputs)
    return list(outs[:n]), (outs[n + 2] if profile else None)


def _comm_operand(p: Plan, plan_words: np.ndarray):
    """(the group, the int32[6] operand rank, color, comm_key, site, and the site) of a plan with
    put tasks.

    The group is looked up at call time from the enclosing jax.shard_map, like ark_collective's
    (a plan given with `plan=` may run under another mesh of the same axes); the site keeps two
    such calls in one program apart (docs/internals.md, "Call sites")."""
    from jax_ark import collectives

    try:
        group = collectives._group("persistent", p.comm.axes)
    except collectives._NoFastPath as why:
        raise PlanError(f"ark.persistent: the plan's collectives: {why.error}") from None
    except NameError as why:  # an axis the call's shard_map does not bind (an edited plan)
        raise PlanError(
            f"ark.persistent: the plan's communication group (comm.axes {p.comm.axes}): {why}"
        ) from None
    shape = dict(jax.sharding.get_abstract_mesh().shape)
    sizes = tuple(int(shape[a]) for a in p.comm.axes if a in shape)
    if p.comm.axis_sizes and sizes != p.comm.axis_sizes:
        # Routing tables and axis_index programs depend on each axis's size, not only on the
        # group's: a plan for a 2 x 4 mesh would route wrongly on a 4 x 2 one.
        raise PlanError(
            f"the plan's communication group is mesh axes {p.comm.axes} of sizes "
            f"{p.comm.axis_sizes}; this call's mesh gives sizes {sizes}"
        )
    if not isinstance(group, collectives._Group) or group.size != p.comm.group_size:
        raise PlanError(
            f"the plan's communication group is {p.comm.group_size} ranks over mesh axes "
            f"{p.comm.axes}; this call's mesh gives "
            f"{getattr(group, 'size', 'a group spanning processes')}"
        )
    digest = hashlib.blake2b(np.ascontiguousarray(plan_words).tobytes(), digest_size=8).digest()
    site = _prim.call_site(("ark_persistent", group.comm_key, digest))
    rank, color = group.operands()
    color = _prim.sequenced(color)

    def halves(v: int) -> list[int]:
        u = v & ((1 << 64) - 1)
        return [np.int32(np.uint32(u & 0xFFFFFFFF)), np.int32(np.uint32(u >> 32))]

    operand = jnp.stack(
        [
            jnp.asarray(rank, jnp.int32),
            jnp.asarray(color, jnp.int32),
            *(jnp.asarray(h, jnp.int32) for h in halves(group.comm_key) + halves(site)),
        ]
    )
    return group, operand, site


def _dtype_code(dtype) -> int:
    """The plan format's code of a buffer dtype (-1: none, which the check rejects)."""
    return DTYPE_CODES.get(np.dtype(dtype).name, -1)


def _check_words_on_host(
    words: np.ndarray, operands: list, results: list, aliases: dict[int, int]
) -> None:
    """The runtime's own binary-plan check (plan_check.hpp) against the call's buffers; raises
    PlanError with its verdict. aliases: operand index -> index of the result in its buffer."""
    outputs = results[:-2]
    result_alias = [-1] * len(outputs)
    for operand, result in aliases.items():
        result_alias[result] = operand
    problem = cpu_module().check_plan(
        words,
        [int(np.prod(np.shape(x))) * np.dtype(jnp.result_type(x)).itemsize for x in operands],
        [_dtype_code(jnp.result_type(x)) for x in operands],
        [int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize for r in outputs],
        [_dtype_code(r.dtype) for r in outputs],
        result_alias,
        int(results[-2].shape[0]),
        int(results[-1].shape[0]),
    )
    if problem:
        raise PlanError(f"the runtime's check refuses this plan: {problem}")


# jax's tracers of forward / reverse-mode differentiation (jax.jvp; jax.grad and jax.vjp
# linearize), by class name: jax_ark reads no jax internals here, and a renamed class only
# means jax's own (less helpful) error instead of ours.
_AD_TRACERS = frozenset({"JVPTracer", "LinearizeTracer"})


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", "fn")


class _Persistent:
    """The callable `persistent(fn)` returns: same signature and results as fn."""

    def __init__(self, fn, plan, num_workers, profile, timeout_ms, tile_m, tile_n, max_while):
        self._fn = fn
        self._max_while = max_while
        _check_max_while(max_while)
        self._plan = plan
        self._num_workers = num_workers
        self._profile = profile
        self._timeout_ms = timeout_ms
        self._tiles = (tile_m, tile_n)
        self._cache: dict = {}
        _check_workers(num_workers)
        # Frozen: a validated deep copy, so edits to `plan` after this point never run unchecked.
        self._plan = None if plan is None else freeze(plan)
        functools.update_wrapper(self, fn)

    def plan(self, *args) -> Plan:
        """A copy of the plan used for these arguments (planned once per signature and platform);
        editing it changes nothing here: pass the edited plan to `persistent(fn, plan=...)`."""
        fn, args = key_data_arguments(self._fn, args)
        p = self._planned(fn, args, resolve_platform(jax.tree_util.tree_leaves(args))[0])[0]
        return p.copy()

    def _planned(self, fn, args, platform: str) -> tuple[Plan, Any, list, list[tuple], list]:
        """(plan, output tree, kinds of the PRNG keys among the outputs, the mesh axes each output
        varies over, fn's top-level jax.debug equations) for these arguments; fn:
        self._fn, or it taking and returning typed PRNG keys as key data (key_data_arguments)."""
        _, tree, avals, key = _flat_avals(args)
        # The platform (and, on CPU, how many shard_map programs share the cores) decides the
        # default workers and tiles (see _target.py): part of the key.
        key = (
            key,
            platform if self._plan is None else None,
            concurrent_cpu_programs() if self._plan is None else None,
            getattr(fn, "key_impls", ()),
        )
        if key not in self._cache:
            traced, out_shapes = jax.make_jaxpr(fn, return_shape=True)(
                *jax.tree_util.tree_unflatten(tree, avals)
            )
            out_avals, out_tree = jax.tree_util.tree_flatten(out_shapes)
            # jax.debug.print / callback at fn's top level: the plan returns their operands after
            # fn's results, and __call__ runs them on those.
            debug = host_debug_eqns(traced.jaxpr)
            debug_avals = [v.aval for e in debug for v in e.invars]
            if any(jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) for a in debug_avals):
                raise UnsupportedError(
                    f"ark.persistent({_fn_name(fn)}): jax.debug.print / callback of a PRNG key: "
                    "print jax.random.key_data(key) instead"
                )
            # Inside shard_map, the mesh axes each output varies over, as jax derives them: an
            # output of replicated inputs only, or a psum's, is the same on every device.
            out_varying = [
                tuple(sorted(_prim.varying_axes(a), key=str))
                for a in [*traced.out_avals, *debug_avals]
            ]
            if self._plan is not None:
                _check_signature(self._plan, avals)
                p = self._plan
            else:
                p = plan(
                    fn,
                    *args,
                    num_workers=self._num_workers,
                    tile_m=self._tiles[0],
                    tile_n=self._tiles[1],
                    platform=key[1],
                    max_while_iterations=self._max_while,
                )
            if len(p.outputs) != out_tree.num_leaves + len(debug_avals):
                debug_note = f" and {len(debug_avals)} jax.debug operands" if debug_avals else ""
                raise PlanError(
                    f"plan has {len(p.outputs)} outputs, fn returns {out_tree.num_leaves}"
                    + debug_note
                )
            for i, (t, aval) in enumerate(zip(p.outputs, [*out_avals, *debug_avals], strict=True)):
                spec = p.tensors[t]
                if tuple(spec.shape) != tuple(aval.shape) or np_dtype(spec.dtype) != aval.dtype:
                    raise PlanError(
                        f"plan output {i} is {spec.dtype}{list(spec.shape)}, fn returns "
                        f"{np.dtype(aval.dtype).name}{list(aval.shape)}"
                    )
            out_keys = list(getattr(fn, "out_key_impls", None) or [])
            self._cache[key] = (p, out_tree, out_keys, out_varying, debug)
        return self._cache[key]

    def __call__(self, *args):
        leaves = jax.tree_util.tree_leaves(args)
        if any(type(x).__name__ in _AD_TRACERS for x in leaves):
            # Otherwise jax fails inside with "The FFI call to ark_persistent cannot be
            # differentiated"; say what works instead.
            raise UnsupportedError(
                f"jax.grad / jax.vjp / jax.jvp of ark.persistent({_fn_name(self._fn)}) is not "
                "supported: the FFI call has no derivative rule. Differentiate inside instead: "
                f"ark.persistent(jax.grad({_fn_name(self._fn)})) plans the backward pass (its "
                "collectives too) as one persistent call"
            )
        fn, args = key_data_arguments(self._fn, args)
        leaves = jax.tree_util.tree_leaves(args)
        platform = resolve_platform(leaves)[0]
        p, out_tree, out_keys, out_varying, debug = self._planned(fn, args, platform)
        outs, prof = run_plan(
            p,
            leaves,
            profile=self._profile,
            timeout_ms=self._timeout_ms,
            check_on_host=platform != "cpu",
            out_varying=out_varying,
        )
        outs = list(outs)
        at = out_tree.num_leaves
        for eqn in debug:  # after the call, on the values the kernel computed: XLA prints them
            eqn.primitive.bind(*outs[at : at + len(eqn.invars)], **eqn.params)
            at += len(eqn.invars)
        outs = outs[: out_tree.num_leaves]
        result = jax.tree_util.tree_unflatten(out_tree, with_output_keys(outs, out_keys))
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
    max_while_iterations: int = DEFAULT_MAX_WHILE_ITERATIONS,
) -> Callable:
    """Runs fn as one persistent kernel (one FFI call): same signature and results as fn.

    plan: run this (validated, possibly user-edited) plan instead of planning fn.
    num_workers: worker threads (CPU) / thread blocks, one per SM (GPU) the planner targets
    (default: min(cores, 8) on CPU, cores // programs inside shard_map; the SM count, capped by
    the kernel's co-residency, on GPU; the platform is that of the arguments' devices, else jax's
    default backend: see `plan`).
    tile_m / tile_n: tile shape of every op (default: per platform; on GPU a GEMV layer is split
    into about one column tile per SM).
    profile: the call returns (result, profile) where profile is int64[num_tasks * 4] (see
    `jax_ark.timeline`). timeout_ms bounds every dependency wait.
    max_while_iterations: the guard of each while_loop in fn: a loop whose predicate is still true
    after that many body iterations fails the call (an error, never a hang).
    """
    return _Persistent(
        fn, plan, num_workers, profile, timeout_ms, tile_m, tile_n, max_while_iterations
    )
