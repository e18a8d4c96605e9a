"""Tracing the algorithms some primitives are planned from, written in jax.numpy (_linalg,
_prefix, _radix, _precision): the translation of such an eqn translates this jaxpr in place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr


def jaxpr_over(fn: Callable, operands: Sequence) -> ClosedJaxpr:
    """fn traced over operands of these shapes and dtypes (avals, or the planner's nodes, whose
    dtype is a name). The algorithms broadcast by rank and mix Python scalars in: they are traced
    under rank promotion "allow" and standard dtype promotion, whatever the caller's config."""
    avals = [jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype)) for x in operands]
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return jax.make_jaxpr(fn)(*avals)
