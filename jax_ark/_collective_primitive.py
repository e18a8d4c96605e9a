"""The `ark_collective` primitive: one primitive for every jax_ark collective.

The user-facing functions in `jax_ark.collectives` reshape and move axes so that this primitive only
ever sees the five block layouts of the contract in docs/internals.md ("Collectives"):

    all_reduce      S      -> S
    all_gather      S      -> (n, *S)
    reduce_scatter  (n, *S) -> S
    permute         S      -> S
    all_to_all      (n, *S) -> (n, *S)

Operands: `x`, `rank` (int32 scalar, `lax.axis_index(axes)`), `color` (int32 scalar, the index of
this device's group). Params (read by the CPU lowering here and by the CUDA lowering in
`jax_ark._cuda_collectives`): `op`, `reduce`, `axes`, `group_size`, `comm_key`, `send_to`,
`recv_from`, `timeout_ms`, `site` (the call-site id, see `call_site`).

This module also holds the only places that touch how jax represents the varying-manual-axes (vma)
type of a value, so a change in that representation between jax versions is fixed here.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sys
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

FFI_TARGET = "ark_collective"


class Op(enum.IntEnum):
    """The `op` FFI attribute (docs/internals.md)."""

    all_reduce = 0
    all_gather = 1
    reduce_scatter = 2
    permute = 3
    all_to_all = 4


class Reduce(enum.IntEnum):
    """The `reduce` FFI attribute; ignored by the non-reducing ops."""

    sum = 0
    max = 1
    min = 2


# ---- jax version compatibility: the vma (varying manual axes) of an abstract value ------------
# jax 0.10 spells it `aval.mat.varying` (a ManualAxisType); earlier releases spelled it `aval.vma`.


def varying_axes(aval) -> frozenset:
    """The mesh axes over which a value of this type may differ between devices."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def pending_reduction_axes(aval) -> frozenset:
    """The mesh axes over which a value is unreduced or reduced (partial sums that a collective
    must not treat as ordinary per-device values); empty where jax has no such types."""
    mat = getattr(aval, "mat", None)
    if mat is None:
        return frozenset()
    return frozenset(getattr(mat, "unreduced", ())) | frozenset(getattr(mat, "reduced", ()))


def _with_shape_and_vma(aval, shape: tuple[int, ...], vma: frozenset):
    if getattr(aval, "mat", None) is not None:
        return aval.update(
            shape=shape, weak_type=False, manual_axis_type=aval.mat.update(varying=vma)
        )
    return aval.update(shape=shape, weak_type=False, vma=vma)


def ensure_varying(x, axes: tuple[str, ...]):
    """`x` made varying over every axis in `axes`, as jax.lax does before a collective.

    Without this, psum of a device-invariant value would be rejected; with it the result is n * x,
    as with jax.lax.psum. A no-op where shard_map runs with check_vma=False (no vma is tracked).
    """
    missing = tuple(a for a in axes if a not in varying_axes(jax.typeof(x)))
    if not missing:
        return x
    return jax.lax.pcast(x, missing, to="varying")


# ---- call sites ---------------------------------------------------------------------------------
# The CPU runtime matches the calls of a group by (site, per-site sequence number), because XLA:CPU
# does not run independent custom calls in program order: a `while`/`cond` body is ONE thunk of the
# enclosing computation, and its collectives can start before, after or concurrently with the
# collectives around it, in a different order on different devices. A site id names one collective
# of the traced program; calls at one site are sequential on every device (a loop re-entering it).
#
# What makes a site id right: distinct for distinct collectives of one program, and a pure function
# of the program text, so every device (they all run the one compiled program), every process of a
# multi-process run, and every re-trace agree. A per-process counter of binds fails the last two.
# A counter per trace fails the first (a loop body's trace and the enclosing trace both start at 0).
# So a site is a digest of:
#   - the collective's signature (comm_key, op, reduce, shape, dtype, permutation tables);
#   - the user's call path to it: (file name, function, line) of every frame between the bind and
#     the outermost jax frame (the jit entry), so where the jitted function was first called from
#     does not matter, but a psum reached through the loop body differs from one reached directly;
#   - the occurrence index of that (signature, path) within the whole top-level trace (the root of
#     the chain of nested traces), which separates a Python loop emitting the same collective
#     several times, including into separate `fori_loop` bodies traced from one line.
# Collectives that a transformation adds (jvp tangents, transposes) get a site derived from their
# primal's site. Known gap: jax traces a sub-function once and reuses its jaxpr (a nested jax.jit
# called twice, a loop body cached across calls), so two uses of it share sites; they are safe
# when ordered by data (the usual case), otherwise the runtime reports a clash at one rank
# ("two calls claim rank ...") or, in the worst case, pairs them across devices.

_JAX_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (jax, sys.modules.get("jaxlib"))
    if m is not None and getattr(m, "__file__", None)
)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SITE_STATE = threading.local()


def _load_trace_api():
    """(get the trace stack, EvalTrace, DynamicJaxprTrace) from jax internals, or None.

    jax-internal (jax._src), checked against jax 0.10.2 and 0.11.2; the only place that names it.
    """
    try:
        from jax._src import core as _core
        from jax._src.interpreters.partial_eval import DynamicJaxprTrace

        def stack() -> list:
            return list(_core.unsafe_get_trace_stack(_core.trace_ctx.trace))

        stack()  # also fails here, not at the first collective, if the names moved
        return stack, _core.EvalTrace, DynamicJaxprTrace
    except (ImportError, AttributeError):
        return None


_TRACE_API = _load_trace_api()


def bound_axis_names() -> frozenset:
    """The axis names bound by vmap/pmap (and shard_map) around the current trace.

    jax-internal (jax._src.core.unsafe_get_axis_names); empty if this jax lacks it.
    """
    try:
        from jax._src import core as _core

        return frozenset(_core.unsafe_get_axis_names())
    except (ImportError, AttributeError):
        return frozenset()


def _trace_api():
    # Without the trace stack, call-site ids lose their occurrence index (two independent
    # collectives emitted from one line would share a site, and devices could pair them
    # crosswise: wrong data, no error) and collectives lose their ordering. So refuse.
    if _TRACE_API is None:
        raise RuntimeError(
            f"jax_ark collectives: this jax ({jax.__version__}) no longer exposes the trace stack "
            "(jax._src.core.unsafe_get_trace_stack / trace_ctx, partial_eval.DynamicJaxprTrace) "
            "that call-site ids and collective ordering need; jax_ark supports jax 0.10.x-0.11.x"
        )
    return _TRACE_API


def _trace_chain() -> list:
    """The active traces, outermost first, from the top-level trace (eval excluded) to the
    current one; [] when nothing is being traced."""
    stack, eval_trace, _ = _trace_api()
    # A trace built without a parent (custom_vjp's optimize_remat traces its forward so) sits on a
    # stack whose bottom entry is None rather than an EvalTrace.
    return [t for t in stack() if t is not None and not isinstance(t, eval_trace)]


def _user_call_path() -> tuple:
    """(file, function, line) of the user frames inside the traced function, innermost first."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    outermost_jax = max(
        (i for i, f in enumerate(frames) if f.f_code.co_filename.startswith(_JAX_DIRS)),
        default=len(frames),
    )
    path = []
    for f in frames[:outermost_jax]:
        name = f.f_code.co_filename
        if name.startswith(_JAX_DIRS) or os.path.abspath(name).startswith(_OWN_DIR):
            continue
        code = f.f_code
        path.append(
            (os.path.basename(name), getattr(code, "co_qualname", code.co_name), f.f_lineno)
        )
    return tuple(path)


def _digest(value) -> int:
    """A signed 64-bit digest of repr(value), the same in every process (never Python's hash())."""
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def call_site(signature: tuple) -> int:
    """The site id of a collective bound now, with `signature` (see the comment above)."""
    chain = _trace_chain()
    key = (signature, _user_call_path())
    occurrence = 0
    if chain:
        # Counts per top-level trace (a trace built without a parent, as jax's linearize does,
        # counts as one too, and its binds may interleave with the enclosing one's). Dead roots
        # are forgotten; the counts hold no reference to a trace.
        per_root = getattr(_SITE_STATE, "per_root", None)
        if per_root is None:
            per_root = _SITE_STATE.per_root = {}
        for rid in [r for r, (ref, _) in per_root.items() if ref() is None]:
            del per_root[rid]
        root = chain[0]
        entry = per_root.get(id(root))
        if entry is None or entry[0]() is not root:
            entry = per_root[id(root)] = (weakref.ref(root), {})
        occurrence = entry[1].get(key, 0)
        entry[1][key] = occurrence + 1
    return _digest(("ark_collective site", key, occurrence))


def derived_site(site: int, what: str) -> int:
    """The site of a collective that a transformation (`what`) derives from the one at `site`."""
    return _digest(("ark_collective derived site", int(site), what))


# ---- program order between collectives ---------------------------------------------------------
# Sites make the runtime correct whatever order XLA runs collectives in, but every collective in
# flight parks a pool thread while it waits for its peers: a dozen independent collectives at once
# on each of 8 devices exhaust XLA's CPU pool and stall until the timeout. So each collective still
# takes a real (0-valued) data dependency on the previous collective of its trace (through its
# `color` operand), and the first collective of a nested trace (a loop or branch body) on the last
# one of the nearest enclosing trace (a closed-over value, which makes the whole loop wait for it).
# Then at most one collective per nesting level is in flight, instead of one per collective.

_order_state = threading.local()


def _opaque_zero_from(value):
    """An int32 zero that XLA must compute from `value`: nothing using it starts before `value`."""
    if value.size == 0:
        return None
    first = jnp.ravel(value)[0]
    if first.dtype == jnp.int32:
        bits = first
    elif first.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(first, jnp.int32)
    else:
        bits = jax.lax.bitcast_convert_type(first, jnp.int16).astype(jnp.int32)
    # An optimization barrier hides the 0 from XLA's algebraic simplifier (which would fold x * 0).
    return bits * jax.lax.optimization_barrier(jnp.int32(0))


def _previous_in_chain(chain: list, enclosing: bool = True):
    """The last collective result of the innermost trace of `chain` that has one, or None.

    Only through staging traces (jaxpr building, where closing over an outer value is plain
    lifting); a jvp/vmap trace in between stops the search. Forgets finished traces on the way.
    """
    results = getattr(_order_state, "results", None)
    if not results:
        return None
    live = {id(t) for t in chain}
    for tid in [k for k in results if k not in live]:
        del results[tid]
    staging_trace = _trace_api()[2]
    for trace in reversed(chain):
        entry = results.get(id(trace))
        if entry is not None and entry[0]() is trace:
            for ref in reversed(entry[1]):
                result = ref()
                if result is not None:
                    return result
        if not enclosing or not isinstance(trace, staging_trace):
            return None
    return None


def sequenced(color, enclosing: bool = True):
    """`color`, made to depend on the result of the previous collective (see above).

    `enclosing=False` looks in the innermost trace only. Collectives that a transformation adds
    (jvp tangents, transposes) need that: jax re-traces closed jaxprs for them (a loop body's jvp,
    a transpose) and caches the result, so a value closed over from an enclosing trace would stay
    in jax's cache as a leaked tracer.
    """
    chain = _trace_chain()
    previous = _previous_in_chain(chain, enclosing) if chain else None
    if previous is None:
        return color
    zero = _opaque_zero_from(previous)
    if zero is None:
        return color
    # Only XLA:CPU needs it: on GPU, XLA issues custom calls in program order on its stream, and
    # the dependency would cost a kernel launch per collective. There `zero * 0` folds away at
    # compile time, the dependency with it (same expression shape, so both branches type alike).
    return jax.lax.platform_dependent(
        color, zero, cpu=lambda c, z: c + z, default=lambda c, z: c + z * 0
    )


# How many recent results of a trace are remembered (weakly): when the user already dropped the
# latest one, the next collective follows the newest one still alive.
_REMEMBERED_RESULTS = 8


def remember(result) -> None:
    """Records `result` as the collective that the next one in this trace must follow.

    Only weak references: a strong one would keep the tracer (and through it its trace) alive
    after tracing ends, which `jax.checking_leaks()` reports as a leaked trace.
    """
    chain = _trace_chain()
    if not chain:
        return
    trace = chain[-1]
    results = getattr(_order_state, "results", None)
    if results is None:
        results = _order_state.results = {}
    entry = results.get(id(trace))
    if entry is None or entry[0]() is not trace:
        entry = results[id(trace)] = (weakref.ref(trace), [])
    refs = [r for r in entry[1] if r() is not None][-(_REMEMBERED_RESULTS - 1) :]
    refs.append(weakref.ref(result))
    entry[1][:] = refs


# ---- the primitive -----------------------------------------------------------------------------

ark_collective_p = Primitive("ark_collective")


def bind(
    x,
    rank,
    color,
    *,
    op: Op,
    reduce: Reduce = Reduce.sum,
    axes: tuple[str, ...],
    group_size: int,
    comm_key: int,
    send_to: tuple[int, ...] = (),
    recv_from: tuple[int, ...] = (),
    timeout_ms: int,
    site: int | None = None,
):
    """Binds `ark_collective`; `x` must already have the block layout of `op`.

    `site` defaults to `call_site(...)` of this bind (the normal case; see "call sites" above).
    """
    send_to = tuple(int(i) for i in send_to)
    recv_from = tuple(int(i) for i in recv_from)
    if site is None:
        aval = jax.typeof(x)
        signature = (
            int(comm_key),
            int(op),
            int(reduce),
            tuple(aval.shape),
            str(aval.dtype),
            send_to,
            recv_from,
        )
        site = call_site(signature)
    return ark_collective_p.bind(
        x,
        rank,
        color,
        op=Op(op),
        reduce=Reduce(reduce),
        axes=tuple(axes),
        group_size=int(group_size),
        comm_key=int(comm_key),
        send_to=send_to,
        recv_from=recv_from,
        timeout_ms=int(timeout_ms),
        site=int(site),
    )


def _out_shape(shape: tuple[int, ...], op: Op, n: int) -> tuple[int, ...]:
    if op == Op.all_gather:
        return (n, *shape)
    if op in (Op.reduce_scatter, Op.all_to_all):
        if not shape or shape[0] != n:
            raise ValueError(
                f"ark_collective {op.name}: operand must have the group size {n} as its leading "
                f"dimension, got shape {shape} (jax_ark.collectives builds this layout; "
                "a direct bind is wrong)"
            )
        return shape[1:] if op == Op.reduce_scatter else shape
    return shape


def _abstract_eval(x, rank, color, *, op, reduce, axes, group_size, **_):
    vma = varying_axes(x)
    if op == Op.all_reduce:
        # The result is the same on every device of the group: no longer varying over `axes`.
        vma = vma - frozenset(axes)
    return _with_shape_and_vma(x, _out_shape(tuple(x.shape), op, group_size), vma)


ark_collective_p.def_abstract_eval(_abstract_eval)


def _impl(*args, **params):
    raise RuntimeError(
        "jax_ark collectives must run inside jax.shard_map under jax.jit (they were called eagerly)"
    )


ark_collective_p.def_impl(_impl)


# ---- autodiff -----------------------------------------------------------------------------------


def _bind_in_order(x, rank, color, what: str, **params):
    """Binds a collective that a transformation (`what`) adds, after the previous one, at a site
    derived from the original's: it is a different collective, which may run in any order
    relative to the original."""
    params = dict(params, site=derived_site(params["site"], what))
    out = ark_collective_p.bind(x, rank, sequenced(color, enclosing=False), **params)
    remember(out)
    return out


def _jvp(primals, tangents, **params):
    x, rank, color = primals
    tx = tangents[0]
    if params["op"] == Op.all_reduce and params["reduce"] != Reduce.sum:
        # Same as jax.lax.pmax / pmin, which define no differentiation rule either.
        name = f"p{params['reduce'].name}"
        raise NotImplementedError(
            f"jax_ark.{name} is not differentiable (jax.lax.{name} is not either); "
            "use a psum-based formulation if you need gradients"
        )
    out = ark_collective_p.bind(x, rank, color, **params)
    if type(tx) is ad.Zero:
        return out, ad.Zero(jax.typeof(out).to_tangent_aval())
    return out, _bind_in_order(tx, rank, color, "jvp", **params)


def _transpose(ct, x, rank, color, **params):
    assert ad.is_undefined_primal(x) and not ad.is_undefined_primal(rank)
    op, axes = params["op"], params["axes"]
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval), None, None]
    if op == Op.all_reduce:
        assert params["reduce"] == Reduce.sum, "pmax/pmin have no jvp, hence no transpose"
        if frozenset(axes) <= varying_axes(x.aval):
            # vma tracked (check_vma=True): the sum's cotangent is the same on every device, and
            # each device's input receives it unchanged (as jax.lax's psum_invariant transpose).
            return [jax.lax.pcast(ct, axes, to="varying"), None, None]
        # check_vma=False: the result is read as psum + broadcast, so the transpose sums again,
        # as jax.lax.psum's transpose does.
        return [_bind_in_order(ct, rank, color, "transpose", **params), None, None]
    ct = ensure_varying(ct, axes)
    if op == Op.all_gather:
        new = dict(params, op=Op.reduce_scatter, reduce=Reduce.sum)
    elif op == Op.reduce_scatter:
        new = dict(params, op=Op.all_gather)
    elif op == Op.permute:
        new = dict(params, send_to=params["recv_from"], recv_from=params["send_to"])
    else:
        # all_to_all in block layout (y_r[j] = x_j[r]) is its own adjoint.
        new = params
    return [_bind_in_order(ct, rank, color, "transpose", **new), None, None]


ad.primitive_jvps[ark_collective_p] = _jvp
ad.primitive_transposes[ark_collective_p] = _transpose


# ---- vmap ---------------------------------------------------------------------------------------


def _batch(args, dims, **params):
    x, rank, color = args
    dx, drank, dcolor = dims
    if dcolor is not None:
        # Only `sequenced` batches the color (the 0 it adds came from a batched value): every
        # batch element holds the same color.
        color = jax.lax.index_in_dim(color, 0, dcolor, keepdims=False)
    if drank is not None:
        raise NotImplementedError(
            "jax_ark collectives: the rank/color of a collective cannot be batched (vmap over a "
            "mesh axis, e.g. spmd_axis_name, is not supported)"
        )
    if dx is None:
        return ark_collective_p.bind(x, rank, color, **params), None
    op = params["op"]
    if op in (Op.all_reduce, Op.permute):
        # Element-wise layouts: the batch dimension can stay where it is.
        return ark_collective_p.bind(x, rank, color, **params), dx
    if op == Op.all_gather:
        x = jax.numpy.moveaxis(x, dx, 0)
        return ark_collective_p.bind(x, rank, color, **params), 1
    # reduce_scatter / all_to_all: block dimension first, batch right after it.
    x = jax.numpy.moveaxis(x, dx, 1)
    out = ark_collective_p.bind(x, rank, color, **params)
    return out, (0 if op == Op.reduce_scatter else 1)


batching.primitive_batchers[ark_collective_p] = _batch


# ---- lowering -----------------------------------------------------------------------------------


def ffi_attributes(
    *, op, reduce, axes, group_size, comm_key, send_to, recv_from, timeout_ms, site
) -> dict:
    """The FFI attributes of the contract, typed as the handlers decode them."""
    del axes  # named by comm_key; the runtime needs no names
    return dict(
        op=np.int32(op),
        reduce=np.int32(reduce),
        group_size=np.int64(group_size),
        comm_key=np.int64(comm_key),
        timeout_ms=np.int64(timeout_ms),
        send_to=np.asarray(send_to, dtype=np.int64),
        recv_from=np.asarray(recv_from, dtype=np.int64),
        site=np.int64(site),
    )


_cpu_rule = jax.ffi.ffi_lowering(FFI_TARGET)


def _lower_cpu(ctx, x, rank, color, **params):
    return _cpu_rule(ctx, x, rank, color, **ffi_attributes(**params))


def _lower_unsupported(ctx, *args, **params):
    platforms = getattr(ctx.module_context, "platforms", ("?",))
    raise NotImplementedError(
        f"jax_ark collectives have no implementation for platform(s) {tuple(platforms)}: "
        "the CPU backend is always built; the CUDA one only where jax_ark was built with CUDA"
    )


mlir.register_lowering(ark_collective_p, _lower_unsupported)
mlir.register_lowering(ark_collective_p, _lower_cpu, platform="cpu")


def _register_cuda_lowering() -> None:
    # The CUDA lowering lives with the CUDA runtime (jax_ark/_cuda_collectives.py); a build or a
    # branch without it keeps the CPU lowering only.
    import importlib
    import importlib.util

    from jax_ark import _ffi

    if not _ffi.has_cuda() or importlib.util.find_spec("jax_ark._cuda_collectives") is None:
        return
    importlib.import_module("jax_ark._cuda_collectives").register_lowering(ark_collective_p)


_register_cuda_lowering()
