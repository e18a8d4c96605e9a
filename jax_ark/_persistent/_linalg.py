"""Dense linear algebra inside ark.persistent: `cholesky`, `triangular_solve` and `lu` (the
primitives behind jnp.linalg.cholesky / solve / inv / det / slogdet and
jax.scipy.linalg.solve_triangular / cho_solve / lu_factor), planned from their textbook
algorithms written in jax.numpy: one `fori_loop` over the columns (or rows), each step a few
whole-matrix passes, so the plan is a loop the persistent kernel runs without a host step (a
Kalman filter's or a Newton solver's small systems inside one launch, where XLA calls LAPACK /
cuSOLVER per matrix).

The results agree with LAPACK's to rounding (another summation order), not bit for bit: O(n^3)
work in n steps, meant for small matrices. Batch dims are batched through every step. Where
LAPACK fails they fail alike: cholesky of a matrix that is not positive definite is all NaN (as
jax's), lu skips the division by a zero pivot (getrf's rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr

PRIMITIVES = frozenset({"cholesky", "triangular_solve", "lu"})


def _rows_cols(n: int, m: int):
    return jnp.arange(n)[:, None], jnp.arange(m)[None, :]


def cholesky(a):
    """Left-looking Cholesky: column j = (a[:, j] - L[:, :j] @ L[j, :j]) / its diagonal, the
    diagonal sqrt(a[j, j] - |L[j, :j]|^2). Columns after j are still zero when j is computed, so
    the products need no mask. A pivot <= 0 (or NaN) makes the whole matrix NaN, as jax does with
    LAPACK's potrf status."""
    n = a.shape[-1]
    if n == 0:
        return a
    rows = jnp.arange(n)

    def step(j, carry):
        low, ok = carry
        v = a[..., :, j] - jnp.einsum("...ik,...k->...i", low, low[..., j, :])
        pivot = v[..., j]
        ok = ok & (pivot > 0)
        d = jnp.sqrt(pivot)[..., None]
        column = jnp.where(rows > j, v / d, jnp.where(rows == j, d, 0.0))
        return low.at[..., :, j].set(column), ok

    low, ok = lax.fori_loop(0, n, step, (jnp.zeros_like(a), jnp.ones(a.shape[:-2], bool)))
    return jnp.where(ok[..., None, None], low, jnp.nan).astype(a.dtype)


def _forward_substitution(low, b, unit_diagonal: bool):
    """x with low @ x = b (low lower triangular, b (..., n, m)), row by row: row i of x is
    (b[i] - low[i, :i] @ x[:i]) / low[i, i]; rows after i are still zero."""
    n = low.shape[-1]

    def step(i, x):
        row = b[..., i, :] - jnp.einsum("...k,...km->...m", low[..., i, :], x)
        if not unit_diagonal:
            row = row / low[..., i, i][..., None]
        return x.at[..., i, :].set(row)

    return lax.fori_loop(0, n, step, jnp.zeros(jnp.broadcast_shapes(b.shape), b.dtype))


def triangular_solve(a, b, *, left_side, lower, transpose_a, conjugate_a, unit_diagonal):
    """lax.linalg.triangular_solve for real dtypes: op(a) x = b (left_side) or x op(a) = b, with
    op(a) = a or a^T, reduced to forward substitution: a right-side solve is the left-side solve
    of the transposes, an upper-triangular op(a) is lower after reversing both index orders."""
    del conjugate_a  # real dtypes only (complex ones are refused before this)
    if a.shape[-1] == 0 or b.size == 0:
        return jnp.zeros(b.shape, b.dtype)
    mat = jnp.swapaxes(a, -1, -2) if transpose_a else a
    is_lower = lower != transpose_a
    rhs = b if left_side else jnp.swapaxes(b, -1, -2)
    if not left_side:  # x op(a) = b  <=>  op(a)^T x^T = b^T
        mat, is_lower = jnp.swapaxes(mat, -1, -2), not is_lower
    if not is_lower:  # reverse rows and columns: an upper triangle becomes a lower one
        x = _forward_substitution(mat[..., ::-1, ::-1], rhs[..., ::-1, :], unit_diagonal)[
            ..., ::-1, :
        ]
    else:
        x = _forward_substitution(mat, rhs, unit_diagonal)
    x = x if left_side else jnp.swapaxes(x, -1, -2)
    return x.astype(b.dtype)


def lu(a):
    """Partial-pivoting LU (getf2's order): for each column j, the row of the largest |a[i, j]|
    at i >= j (the first one on ties) is swapped into row j, the column below the pivot divided
    by it (not when it is 0: getrf's rule), and the trailing block updated by the outer product.
    Returns (lu, pivots, permutation) as lax.linalg.lu."""
    m, n = a.shape[-2], a.shape[-1]
    k = min(m, n)
    rows, cols = _rows_cols(m, n)
    batch = a.shape[:-2]
    perm0 = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (*batch, m))
    pivots0 = jnp.zeros((*batch, k), jnp.int32)
    if k == 0:
        return a, pivots0, perm0

    def swap(x, i, p):
        """x with rows i and p (per batch element, along axis -2 for a matrix, -1 for a vector)
        exchanged."""
        if x.ndim == len(batch) + 1:  # the permutation vector
            xi = jnp.take_along_axis(x, i[..., None], -1)
            xp = jnp.take_along_axis(x, p[..., None], -1)
            at = jnp.arange(x.shape[-1])
            return jnp.where(at == i[..., None], xp, jnp.where(at == p[..., None], xi, x))
        xi = jnp.take_along_axis(x, i[..., None, None], -2)
        xp = jnp.take_along_axis(x, p[..., None, None], -2)
        at = jnp.arange(x.shape[-2])[:, None]
        return jnp.where(at == i[..., None, None], xp, jnp.where(at == p[..., None, None], xi, x))

    def step(j, carry):
        x, pivots, perm = carry
        magnitude = jnp.where(jnp.arange(m) >= j, jnp.abs(x[..., :, j]), -1.0)
        p = jnp.argmax(magnitude, axis=-1).astype(jnp.int32)
        jj = jnp.full(batch, j, jnp.int32)
        x = swap(x, jj, p)
        perm = swap(perm, jj, p)
        pivots = pivots.at[..., j].set(p)
        pivot = x[..., j, j]
        below = (rows > j) & (cols == j)
        scaled = jnp.where(below & (pivot != 0)[..., None, None], x / pivot[..., None, None], x)
        update = scaled[..., :, j][..., :, None] * scaled[..., j, :][..., None, :]
        trailing = (rows > j) & (cols > j)
        return jnp.where(trailing, scaled - update, scaled), pivots, perm

    x, pivots, perm = lax.fori_loop(0, k, step, (a, pivots0, perm0))
    return x.astype(a.dtype), pivots, perm


def jaxpr_of(eqn) -> ClosedJaxpr:
    """The jaxpr of the algorithm for a linear-algebra eqn, over the eqn's input avals."""
    prim, params = eqn.primitive.name, eqn.params
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    if prim == "cholesky":
        fn = cholesky
    elif prim == "triangular_solve":
        keys = ("left_side", "lower", "transpose_a", "conjugate_a", "unit_diagonal")

        def fn(a, b):
            return triangular_solve(a, b, **{key: bool(params[key]) for key in keys})
    else:
        fn = lu
    # the algorithms broadcast by rank and mix Python scalars in: whatever the caller's config
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return jax.make_jaxpr(fn)(*avals)
