"""Long cumulative ops inside ark.persistent (cumsum / cumprod / cummax / cummin /
cumlogsumexp): a blocked scan written in jax.numpy and planned like any jaxpr; and lax.reduce
with a computation of its own, as a tree of elementwise steps (tree_reduce).

A running fold planned directly is one REDUCE over (positions x positions): O(L^2) terms per row,
1.4 s for one row of 32,768 (the cumulative probabilities of a top-p sampler over a vocabulary).
Here the axis is cut into blocks of _BLOCK positions: the running fold inside each block (direct:
O(L * _BLOCK)), the running fold over the blocks' totals (the same algorithm, recursively, on an
axis _BLOCK times shorter), and each block combined with the total of the blocks before it. Work
O(L * _BLOCK), and about 2 * log_BLOCK(L) dependent passes.

Integers and max / min are exact (the combination is associative, wrapping included). Float sums
and products are associated by block instead of left to right: they agree with jax.jit's to
rounding. bfloat16 / float16 run in float32 and are rounded once at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from jax_ark._persistent._algorithm import jaxpr_over

# A running fold along an axis up to this long is planned directly (O(L^2) per row), and the block
# size of longer ones. Measured on the CPU executor (one row of 32,768 float32): 4 -> 1.6 ms,
# 8 -> 1.9 ms, 16 -> 4.6 ms, 32 -> 4.5 ms; 8 keeps that row five levels deep (4: eight levels).
_BLOCK = 8

_DIRECT = {
    "cumsum": lax.cumsum,
    "cumprod": lax.cumprod,
    "cummax": lax.cummax,
    "cummin": lax.cummin,
    "cumlogsumexp": lax.cumlogsumexp,
}
_COMBINE = {
    "cumsum": jnp.add,
    "cumprod": jnp.multiply,
    "cummax": jnp.maximum,
    "cummin": jnp.minimum,
    "cumlogsumexp": jnp.logaddexp,
}


def planned_here(shape, axis: int, max_rank: int) -> bool:
    """Whether a running fold over `axis` of `shape` takes this module's path: a long axis, or a
    direct fold's pair space (one dim more than x) the format's rank would not hold."""
    return shape[axis] > _BLOCK or len(shape) + 1 > max_rank


def _identity(prim: str, dtype) -> np.ndarray:
    """The value that leaves prim's combination unchanged (pads the last block)."""
    dtype = np.dtype(dtype)
    floating = jnp.issubdtype(dtype, jnp.floating)
    if prim == "cumsum":
        value = 0
    elif prim == "cumprod":
        value = 1
    elif prim in ("cummax", "cumlogsumexp"):
        value = -np.inf if floating else jnp.iinfo(dtype).min
    else:  # cummin
        value = np.inf if floating else jnp.iinfo(dtype).max
    return np.asarray(value, dtype)


def _scan_last_axis(prim: str, x):
    """prim's running fold along x's last axis, forward."""
    length = x.shape[-1]
    if length <= _BLOCK:
        return _DIRECT[prim](x, axis=x.ndim - 1)
    blocks = -(-length // _BLOCK)
    pad = blocks * _BLOCK - length
    if pad:  # identities after the last element change no prefix that is kept
        fill = jnp.full((*x.shape[:-1], pad), _identity(prim, x.dtype), x.dtype)
        x = jnp.concatenate([x, fill], axis=-1)
    within = _DIRECT[prim](x.reshape(*x.shape[:-1], blocks, _BLOCK), axis=x.ndim)
    before = _scan_last_axis(prim, within[..., -1])  # inclusive, over the blocks' totals
    first = jnp.full((*x.shape[:-1], 1), _identity(prim, x.dtype), x.dtype)
    before = jnp.concatenate([first, before[..., :-1]], axis=-1)  # exclusive
    # The first block has nothing before it: kept as is (a combination with the identity could
    # still round, as logaddexp(-inf, x) or -0.0 + 0.0 do).
    later = _COMBINE[prim](before[..., 1:, None], within[..., 1:, :])
    out = jnp.concatenate([within[..., :1, :], later], axis=-2)
    return out.reshape(*x.shape[:-1], blocks * _BLOCK)[..., :length]


def blocked_cumulative(prim: str, x, axis: int, reverse: bool):
    """lax.<prim>(x, axis, reverse) as a blocked scan over (rows, L): the other dims flattened
    into rows, so the scan's own dims (rows, blocks, _BLOCK) and the direct folds' pair spaces
    stay within the plan format's rank whatever x's rank."""
    dtype = x.dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        x = x.astype(jnp.float32)
    x = jnp.moveaxis(x, axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if reverse:
        x = jnp.flip(x, -1)
    out = _scan_last_axis(prim, x)
    if reverse:
        out = jnp.flip(out, -1)
    return jnp.moveaxis(out.reshape(*lead, out.shape[-1]), -1, axis).astype(dtype)


def jaxpr_of(eqn) -> ClosedJaxpr:
    """The jaxpr of the blocked scan for a cumulative eqn, over its input aval."""
    axis, reverse = int(eqn.params["axis"]), bool(eqn.params["reverse"])
    prim = eqn.primitive.name
    return jaxpr_over(
        lambda x: blocked_cumulative(prim, x, axis, reverse), [v.aval for v in eqn.invars]
    )


def tree_reduce(operands, init_values, computation, dimensions) -> list:
    """lax.reduce with a computation of its own (a variadic argmax-with-value, say): the reduced
    dims flattened last and padded with the init values to a power of two, then halved log2(K)
    times, each step applying the computation elementwise to neighbours (2i as its left operand,
    2i + 1 as its right: everything the left holds precedes what the right holds); the init
    values combined once in front (XLA: the order is unspecified, the init values an identity).
    Exact for associative computations (an argmax that keeps the earlier operand on ties: the
    first index, as XLA's in-order fold); others agree to rounding."""
    combine = jax.vmap(jaxpr_as_fun(computation))
    shape = operands[0].shape
    kept = [d for d in range(len(shape)) if d not in dimensions]
    lead = tuple(shape[d] for d in kept)
    xs = [jnp.transpose(x, [*kept, *dimensions]).reshape(*lead, -1) for x in operands]
    inits = [
        jnp.broadcast_to(jnp.asarray(v, x.dtype), lead)
        for v, x in zip(init_values, xs, strict=True)
    ]
    length = xs[0].shape[-1]
    if length == 0:
        return inits
    width = 1 << (length - 1).bit_length()
    if width != length:
        xs = [
            jnp.concatenate([x, jnp.broadcast_to(v[..., None], (*lead, width - length))], axis=-1)
            for x, v in zip(xs, inits, strict=True)
        ]
    while width > 1:  # neighbours: every left operand's elements precede the right one's
        width //= 2
        pairs = [x.reshape(*lead, width, 2) for x in xs]
        left = [x[..., 0].reshape(-1) for x in pairs]
        right = [x[..., 1].reshape(-1) for x in pairs]
        xs = [y.reshape(*lead, width) for y in combine(*left, *right)]
    flat = combine(*[v.reshape(-1) for v in inits], *[x.reshape(-1) for x in xs])
    return [y.reshape(lead) for y in flat]


def tree_reduce_jaxpr(eqn) -> ClosedJaxpr:
    """tree_reduce's jaxpr for a `reduce` eqn (operands, then as many init values)."""
    n = len(eqn.invars) // 2
    computation = eqn.params["jaxpr"]
    if not hasattr(computation, "consts"):
        computation = ClosedJaxpr(computation, [])
    dims = tuple(int(d) for d in eqn.params["dimensions"])
    return jaxpr_over(
        lambda *a: tree_reduce(a[:n], a[n:], computation, dims), [v.aval for v in eqn.invars]
    )
