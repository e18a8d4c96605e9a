"""Dense linear algebra inside ark.persistent: `cholesky`, `triangular_solve`, `lu`, `qr`, `eigh`
and `svd` (the primitives behind jnp.linalg.cholesky / solve / inv / det / slogdet / qr / eigh /
svd / pinv / lstsq / matrix_rank / norm(ord=2) / cond and jax.scipy.linalg.solve_triangular /
cho_solve / lu_factor), planned from their textbook
algorithms written in jax.numpy: one `fori_loop` over the columns (or rows), each step a few
whole-matrix passes, so the plan is a loop the persistent kernel runs without a host step (a
Kalman filter's or a Newton solver's small systems inside one launch, where XLA calls LAPACK /
cuSOLVER per matrix).

The results agree with LAPACK's to rounding (another summation order), not bit for bit: O(n^3)
work in n steps, meant for small matrices. eigh and svd are Jacobi methods with a fixed number of
sweeps (no convergence test, so they also run inside scans): their values agree with LAPACK's to
rounding, their vectors up to sign. Batch dims are batched through every step. Where
LAPACK fails they fail alike: cholesky of a matrix that is not positive definite is all NaN (as
jax's), lu skips the division by a zero pivot (getrf's rule).

Also here: integer matmuls (`integer_dot`), exact, as float32 matmuls of contraction chunks short
enough that no partial sum rounds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr

from jax_ark._persistent._algorithm import jaxpr_over

PRIMITIVES = frozenset({"cholesky", "triangular_solve", "lu", "qr", "eigh", "svd"})


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


def _power_of_two_scale(a):
    """Per matrix, the power of two at or below max |a| (1 for an all-zero, denormal or non-finite
    maximum): dividing by it is exact, and keeps squares and sums of squares of the entries
    inside float32's range (LAPACK's norms scale for the same reason)."""
    top = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True).astype(jnp.float32)
    exponent = lax.bitcast_convert_type(top, jnp.int32) & np.int32(0x7F800000)
    scale = lax.bitcast_convert_type(exponent, jnp.float32)
    usable = (exponent != 0) & (exponent != np.int32(0x7F800000))
    return jnp.where(usable, scale, 1.0).astype(a.dtype)


def qr(a, full_matrices: bool):
    """Householder QR in LAPACK's order (geqrf, then orgqr for Q): reflector j maps column j at
    and below the diagonal to (beta, 0, ...) with beta = -sign(a[j, j]) * |column| (dlarfg's
    choice, so R's signs are LAPACK's), tau = (beta - a[j, j]) / beta, no reflection (tau = 0)
    when the column below the diagonal is already zero. Q is the product of the reflectors
    applied to the identity's first columns, last reflector first. Returns (q, r) as lax's qr:
    full_matrices gives q (m, m) and r (m, n), else q (m, k) and r (k, n), k = min(m, n)."""
    m, n = a.shape[-2], a.shape[-1]
    k = min(m, n)
    batch = a.shape[:-2]
    rows = jnp.arange(m)
    q_cols = m if full_matrices else k
    if k == 0:
        q = jnp.broadcast_to(jnp.eye(m, q_cols, dtype=a.dtype), (*batch, m, q_cols))
        return q, jnp.zeros((*batch, q_cols, n), a.dtype)

    scale = _power_of_two_scale(a)  # R scales with a, Q not

    def reflect(j, carry):
        r, vs, taus = carry
        column = r[..., :, j]
        alpha = column[..., j]
        below = jnp.where(rows > j, column, 0.0)
        xnorm = jnp.sqrt(jnp.sum(below * below, axis=-1))
        beta = -jnp.where(alpha >= 0, 1.0, -1.0) * jnp.sqrt(alpha * alpha + xnorm * xnorm)
        reflects = xnorm != 0
        safe = jnp.where(reflects, alpha - beta, 1.0)
        tau = jnp.where(reflects, (beta - alpha) / jnp.where(reflects, beta, 1.0), 0.0)
        v = jnp.where(rows == j, 1.0, below / safe[..., None])
        # r <- (I - tau v v^T) r on the columns after j; column j becomes (.., beta, 0, ...)
        update = (
            r
            - tau[..., None, None]
            * v[..., :, None]
            * jnp.einsum("...i,...in->...n", v, r)[..., None, :]
        )
        cols = jnp.arange(n)
        new_column = jnp.where(
            rows < j, column, jnp.where(rows == j, jnp.where(reflects, beta, alpha)[..., None], 0.0)
        )
        r = jnp.where(cols > j, update, jnp.where(cols == j, new_column[..., :, None], r))
        return r, vs.at[..., j, :].set(v), taus.at[..., j].set(tau)

    vs0 = jnp.zeros((*batch, k, m), a.dtype)
    r, vs, taus = lax.fori_loop(0, k, reflect, (a / scale, vs0, jnp.zeros((*batch, k), a.dtype)))
    r = r * scale

    def apply(i, q):
        j = k - 1 - i  # orgqr: the last reflector first
        v, tau = vs[..., j, :], taus[..., j]
        return (
            q
            - tau[..., None, None]
            * v[..., :, None]
            * jnp.einsum("...i,...in->...n", v, q)[..., None, :]
        )

    eye = jnp.broadcast_to(jnp.eye(m, q_cols, dtype=a.dtype), (*batch, m, q_cols))
    q = lax.fori_loop(0, k, apply, eye)
    r = r[..., :q_cols, :] if full_matrices else r[..., :k, :]
    return q.astype(a.dtype), jnp.triu(r).astype(a.dtype)


# Sweeps of the Jacobi eigensolver: each rotates every pair of indices once. The off-diagonal
# mass falls quadratically once small. Worst eigenvalue error relative to the largest over random,
# ill-conditioned (condition 1e6) and Gram matrices of n = 8..48: 5 sweeps 7.4e-4, 6: 1.1e-4,
# 7: 9.6e-6, 8 and 10: 6.3e-6 (float32 rounding); 12 leave a margin for larger n.
_JACOBI_SWEEPS = 12


def _round_robin(n: int) -> np.ndarray:
    """(n - 1, n // 2, 2) index pairs, n even: each step pairs every index with another, and the
    steps together pair every two indices once (a round-robin tournament: index 0 stays, the
    others rotate)."""
    players = list(range(n))
    steps = []
    for _ in range(n - 1):
        steps.append([(players[i], players[n - 1 - i]) for i in range(n // 2)])
        players = [players[0], players[-1], *players[1:-1]]
    return np.asarray(steps, np.int32)


def _rotations(p, q, c, s, n: int, dtype):
    """The n x n matrix rotating each pair (p[k], q[k]) by (c[k], s[k]) (pairs disjoint):
    J[p, p] = J[q, q] = c, J[p, q] = s, J[q, p] = -s, the identity elsewhere."""
    at_p = jax.nn.one_hot(p, n, dtype=dtype)  # (pairs, n)
    at_q = jax.nn.one_hot(q, n, dtype=dtype)

    def outer(w, left, right):
        return jnp.einsum("...k,ki,kj->...ij", w, left, right)

    return (
        jnp.eye(n, dtype=dtype)
        + outer(c - 1.0, at_p, at_p)
        + outer(c - 1.0, at_q, at_q)
        + outer(s, at_p, at_q)
        - outer(s, at_q, at_p)
    )


def _jacobi_angle(alpha, beta, gamma):
    """(c, s) of the rotation that zeroes gamma: the off-diagonal of [[alpha, gamma], [gamma,
    beta]] (Golub and Van Loan's sym.schur2); none (1, 0) where gamma is already 0."""
    rotate = gamma != 0
    zeta = (beta - alpha) / jnp.where(rotate, 2.0 * gamma, 1.0)
    t = jnp.where(zeta >= 0, 1.0, -1.0) / (jnp.abs(zeta) + jnp.sqrt(1.0 + zeta * zeta))
    t = jnp.where(rotate, t, 0.0)
    c = lax.rsqrt(1.0 + t * t)
    return c, t * c


def eigh(a, lower: bool):
    """Symmetric eigendecomposition by parallel cyclic Jacobi: each step rotates n / 2 disjoint
    index pairs at once (a round-robin order, one matrix of rotations, two matmuls), every pair
    once per sweep, for _JACOBI_SWEEPS sweeps; eigenvalues ascending as LAPACK's syevd. Returns
    (vectors, values) as lax's eigh. Eigenvalues agree with LAPACK's to rounding; an eigenvector
    is unique up to its sign (and a repeated eigenvalue's only as a subspace), so the vectors may
    differ from LAPACK's by a sign: V diag(w) V^T, V^T V and each |v_i . v_i'| agree. For small
    matrices: O(n^3) per step, n - 1 steps per sweep."""
    n = a.shape[-1]
    batch = a.shape[:-2]
    tri = jnp.tril(a) if lower else jnp.triu(a)
    diagonal = jnp.where(jnp.eye(n, dtype=bool), a, 0.0)  # not a * I: the other triangle's inf
    sym = tri + jnp.swapaxes(tri, -1, -2) - diagonal  # the named triangle only
    m = n + n % 2  # an odd size gets an index no rotation touches (its row and column are 0)
    if m != n:
        sym = jnp.pad(sym, [(0, 0)] * len(batch) + [(0, 1), (0, 1)])
    pairs = jnp.asarray(_round_robin(m))
    steps = pairs.shape[0]

    def step(i, carry):
        x, v = carry
        p, q = pairs[i % steps, :, 0], pairs[i % steps, :, 1]
        c, s = _jacobi_angle(x[..., p, p], x[..., q, q], x[..., p, q])
        rot = _rotations(p, q, c, s, m, a.dtype)
        x = jnp.einsum("...ji,...jk,...kl->...il", rot, x, rot)
        x = 0.5 * (x + jnp.swapaxes(x, -1, -2))  # symmetric, as rounding does not keep it
        return x, jnp.einsum("...ij,...jk->...ik", v, rot)

    eye = jnp.broadcast_to(jnp.eye(m, dtype=a.dtype), (*batch, m, m))
    x, v = lax.fori_loop(0, _JACOBI_SWEEPS * steps, step, (sym, eye))
    values = jnp.diagonal(x, axis1=-2, axis2=-1)[..., :n]
    vectors = v[..., :n, :n]
    # Ascending, even for sort_eigenvalues=False: the order XLA's CPU and GPU solvers return.
    order = jnp.argsort(values, axis=-1)
    values = jnp.take_along_axis(values, order, axis=-1)
    vectors = jnp.take_along_axis(vectors, order[..., None, :], axis=-1)
    return vectors.astype(a.dtype), values.astype(a.dtype)


def svd(a, full_matrices: bool, compute_uv: bool):
    """Singular value decomposition by one-sided Jacobi (Hestenes): the columns of a are rotated
    in pairs (the round-robin order of `eigh`, the angle that makes two columns orthogonal) until
    all are, for _JACOBI_SWEEPS sweeps; the singular values are the column norms, descending, V
    the product of the rotations, U the normalized columns. Returns s, or (s, u, vt) as lax's
    svd. A matrix wider than tall is decomposed transposed. U's columns of zero singular values
    (and full_matrices' extra ones) complete U to an orthonormal basis by a QR of U with fixed
    columns in their place. Singular values agree with LAPACK's to rounding; singular vectors up
    to sign (as `eigh`'s), and those of zero or repeated singular values only as subspaces."""
    m, n = a.shape[-2], a.shape[-1]
    if m < n:
        out = svd(jnp.swapaxes(a, -1, -2), full_matrices, compute_uv)
        if not compute_uv:
            return out
        s, u, vt = out
        return s, jnp.swapaxes(vt, -1, -2), jnp.swapaxes(u, -1, -2)
    batch = a.shape[:-2]
    if n == 0:  # no singular values; full U / V^T are identities, as LAPACK's
        s = jnp.zeros((*batch, 0), a.dtype)
        if not compute_uv:
            return s
        u = jnp.broadcast_to(
            jnp.eye(m, m if full_matrices else 0, dtype=a.dtype),
            (*batch, m, m if full_matrices else 0),
        )
        return s, u, jnp.zeros((*batch, 0, 0), a.dtype)
    k = n + n % 2  # an odd count gets a zero column, which no rotation moves
    scale = _power_of_two_scale(a)  # the singular values scale with a, U and V not
    x = a / scale
    x = jnp.pad(x, [(0, 0)] * len(batch) + [(0, 0), (0, k - n)]) if k != n else x
    pairs = jnp.asarray(_round_robin(k))
    steps = pairs.shape[0]

    def step(i, carry):
        x, v = carry
        p, q = pairs[i % steps, :, 0], pairs[i % steps, :, 1]
        xp, xq = x[..., :, p], x[..., :, q]  # (..., m, pairs)
        c, s = _jacobi_angle(
            jnp.sum(xp * xp, axis=-2), jnp.sum(xq * xq, axis=-2), jnp.sum(xp * xq, axis=-2)
        )
        rot = _rotations(p, q, c, s, k, a.dtype)
        return x @ rot, v @ rot

    eye = jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), (*batch, k, k))
    x, v = lax.fori_loop(0, _JACOBI_SWEEPS * steps, step, (x, eye))
    norms = jnp.sqrt(jnp.sum(x * x, axis=-2))[..., :n]
    order = jnp.argsort(-norms, axis=-1)  # descending; ties keep their order
    s = jnp.take_along_axis(norms, order, axis=-1)
    if not compute_uv:
        return (s * scale[..., 0]).astype(a.dtype)
    x = jnp.take_along_axis(x[..., :, :n], order[..., None, :], axis=-1)
    v = jnp.take_along_axis(v[..., :n, :n], order[..., None, :], axis=-1)
    positive = s > 0
    u = x / jnp.where(positive, s, 1.0)[..., None, :]
    u_cols = m if full_matrices else n
    # Fixed columns where U has none (s = 0, or past n): generic directions, made orthonormal to
    # the others by the QR; Q's signs follow R's diagonal, so U's own columns keep theirs.
    fill = jnp.asarray(np.random.default_rng(0).standard_normal((m, u_cols)), a.dtype)
    have = jnp.concatenate(
        [positive, jnp.zeros((*batch, u_cols - n), bool)], axis=-1
    ) if u_cols > n else positive  # fmt: skip
    if u_cols > n:
        u = jnp.concatenate([u, jnp.zeros((*batch, m, u_cols - n), a.dtype)], axis=-1)
    q, r = qr(jnp.where(have[..., None, :], u, fill), full_matrices=False)
    signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    u = q * signs[..., None, :]
    s = s * scale[..., 0]
    return s.astype(a.dtype), u.astype(a.dtype), jnp.swapaxes(v, -1, -2).astype(a.dtype)


# Float32 holds every integer up to 2^24 exactly: products and partial sums of integer operands
# below that are exact in any summation order.
_EXACT_IN_FLOAT32 = 2**24


def _largest_magnitude(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


def integer_dot_chunk(lhs_dtype, rhs_dtype) -> int:
    """How many products of these integer dtypes a float32 sum holds exactly (0: not one)."""
    return _EXACT_IN_FLOAT32 // (_largest_magnitude(lhs_dtype) * _largest_magnitude(rhs_dtype))


def integer_dot(lhs, rhs, dimension_numbers, out_dtype):
    """lax.dot_general of integer operands (an int8 x int8 -> int32 quantized matmul), exact: the
    contraction is cut into chunks whose float32 matmul is exact (1,024 products of int8 x int8,
    258 of uint8 x uint8), and the chunks' results summed in int32 (wrapping, as XLA's integer
    dot), then converted to the result dtype (wrapping too)."""
    (lc, rc), (lb, rb) = dimension_numbers
    lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    batch = [lhs.shape[d] for d in lb]
    depth = math.prod(lhs.shape[d] for d in lc)
    if depth == 0:  # every element the empty sum
        shape = [*batch, *(lhs.shape[d] for d in lfree), *(rhs.shape[d] for d in rfree)]
        return jnp.zeros(shape, out_dtype)
    chunk = min(depth, integer_dot_chunk(lhs.dtype, rhs.dtype))
    chunks = -(-depth // chunk)

    def chunked(x, batch_dims, free, contracting):
        """x as (batch..., free..., chunks, chunk) float32, the contraction zero-padded."""
        x = jnp.transpose(x, [*batch_dims, *free, *contracting])
        x = x.reshape(*x.shape[: len(batch) + len(free)], depth)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * chunk - depth)])
        return x.reshape(*x.shape[:-1], chunks, chunk).astype(jnp.float32)

    a, b = chunked(lhs, lb, lfree, lc), chunked(rhs, rb, rfree, rc)
    nb = len(batch)
    numbers = (((a.ndim - 1,), (b.ndim - 1,)), ((*range(nb), a.ndim - 2), (*range(nb), b.ndim - 2)))
    partial = lax.dot_general(a, b, numbers, preferred_element_type=jnp.float32)
    # (batch..., chunks, lhs free..., rhs free...): every value an exact integer. An integer
    # result sums the chunks in int32 (wrapping as XLA's); a float one in float32 (XLA converts
    # the operands and accumulates in float: no wrap past 2^31).
    if jnp.issubdtype(out_dtype, jnp.floating):
        return jnp.sum(partial, axis=nb).astype(out_dtype)
    total = jnp.sum(partial.astype(jnp.int32), axis=nb, dtype=jnp.int32)
    return total.astype(out_dtype)


def integer_dot_jaxpr(operands, dimension_numbers, out_dtype: str) -> ClosedJaxpr:
    """integer_dot's jaxpr over the two operands' shapes and dtypes."""
    return jaxpr_over(
        lambda lhs, rhs: integer_dot(lhs, rhs, dimension_numbers, jnp.dtype(out_dtype)), operands
    )


def jaxpr_of(eqn) -> ClosedJaxpr:
    """The jaxpr of the algorithm for a linear-algebra eqn, over the eqn's input avals."""
    prim, params = eqn.primitive.name, eqn.params
    if prim == "cholesky":
        fn = cholesky
    elif prim == "triangular_solve":
        keys = ("left_side", "lower", "transpose_a", "conjugate_a", "unit_diagonal")

        def fn(a, b):
            return triangular_solve(a, b, **{key: bool(params[key]) for key in keys})
    elif prim == "eigh":  # ascending whatever sort_eigenvalues says (see eigh)
        lower = bool(params["lower"])

        def fn(a):
            return eigh(a, lower)
    elif prim == "svd":
        full, with_uv = bool(params["full_matrices"]), bool(params["compute_uv"])

        def fn(a):
            return svd(a, full, with_uv)
    elif prim == "qr":
        if params["pivoting"]:
            raise NotImplementedError  # refused by the caller (_trace), before this
        full = bool(params["full_matrices"])

        def fn(a):
            return qr(a, full)
    else:
        fn = lu
    return jaxpr_over(fn, [v.aval for v in eqn.invars])
