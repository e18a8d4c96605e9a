"""Dense linear algebra inside ark.persistent (jax_ark/_persistent/_linalg.py): cholesky,
triangular_solve (every flag), lu (pivots and permutation exact), jnp.linalg.solve / inv / det /
slogdet, their gradients, and a Kalman filter scanned over time steps, against jax.jit (LAPACK)
on fresh random inputs; plans made for a GPU through the numpy reference interpreter."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._persistent._reference import interpret


def _spd(rng, n, batch=()):
    x = rng.standard_normal((*batch, n, n)).astype(np.float32)
    return x @ np.swapaxes(x, -1, -2) + n * np.eye(n, dtype=np.float32)


def _check(fn, *args, tol=2e-5, gpu=False):
    want = jax.tree.leaves(jax.jit(fn)(*args))
    runs = [jax.tree.leaves(jax.jit(ark.persistent(fn))(*args))]
    if gpu:
        plan = ark.plan(fn, *args, platform="gpu", num_workers=16)
        runs.append(jax.tree.leaves(interpret(plan, *args)))
    for got in runs:
        for g, w in zip(got, want, strict=True):
            g, w = np.asarray(g), np.asarray(w)
            assert g.shape == w.shape and g.dtype == w.dtype
            if w.size == 0:
                continue
            if np.issubdtype(w.dtype, np.integer):
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
                assert_close(np.nan_to_num(g), np.nan_to_num(w), tol)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_cholesky(rng, batch):
    _check(jnp.linalg.cholesky, _spd(rng, 6, batch), gpu=not batch)


def test_cholesky_of_a_matrix_that_is_not_positive_definite_is_nan(rng):
    a = np.stack([_spd(rng, 5), rng.standard_normal((5, 5)).astype(np.float32) - 5 * np.eye(5)])
    got = np.asarray(ark.persistent(jnp.linalg.cholesky)(a.astype(np.float32)))
    assert np.isfinite(got[0]).all() and np.isnan(got[1][np.tril_indices(5)]).all()
    _check(jnp.linalg.cholesky, a.astype(np.float32))


@pytest.mark.parametrize(
    "left_side,lower,transpose_a,unit_diagonal", list(itertools.product([False, True], repeat=4))
)
def test_triangular_solve_every_flag(rng, left_side, lower, transpose_a, unit_diagonal):
    a = np.tril(rng.standard_normal((7, 7))) + 4 * np.eye(7)
    a = (a if lower else a.T).astype(np.float32)
    b = rng.standard_normal((2, 7, 3) if left_side else (2, 3, 7)).astype(np.float32)

    def fn(a, b):
        return jax.lax.linalg.triangular_solve(
            jnp.broadcast_to(a, (2, 7, 7)), b, left_side=left_side, lower=lower,
            transpose_a=transpose_a, unit_diagonal=unit_diagonal,
        )  # fmt: skip

    _check(fn, a, b)


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4), (2, 5, 5)])
def test_lu_pivots_and_permutation_are_lapacks(rng, shape):
    _check(jax.lax.linalg.lu, rng.standard_normal(shape).astype(np.float32), gpu=len(shape) == 2)


def test_lu_with_a_zero_column_divides_by_no_zero_pivot(rng):
    a = rng.standard_normal((5, 5)).astype(np.float32)
    a[:, 2] = 0.0
    lu = np.asarray(ark.persistent(jax.lax.linalg.lu)(a)[0])
    assert np.isfinite(lu).all()
    _check(jax.lax.linalg.lu, a)


@pytest.mark.filterwarnings("ignore:jax.scipy.linalg.cho_solve")  # inside jax's solve(assume_a)
@pytest.mark.parametrize("name", ["solve", "inv", "det", "slogdet", "cho_solve", "lstsq_normal"])
def test_jnp_linalg_functions(rng, name):
    a = rng.standard_normal((2, 6, 6)).astype(np.float32) + 3 * np.eye(6, dtype=np.float32)
    b = rng.standard_normal((2, 6, 2)).astype(np.float32)
    fns = {
        "solve": jnp.linalg.solve,
        "inv": lambda a, b: jnp.linalg.inv(a),
        "det": lambda a, b: jnp.linalg.det(a),
        "slogdet": lambda a, b: jnp.linalg.slogdet(a),
        "cho_solve": lambda a, b: jax.scipy.linalg.cho_solve(
            jax.scipy.linalg.cho_factor(a @ jnp.swapaxes(a, -1, -2)), b
        ),
        # least squares through the normal equations: cholesky + two triangular solves
        "lstsq_normal": lambda a, b: jax.scipy.linalg.solve(
            jnp.swapaxes(a, -1, -2) @ a, jnp.swapaxes(a, -1, -2) @ b, assume_a="pos"
        ),
    }
    _check(fns[name], a, b, tol=1e-4)


def test_gradients_of_a_gaussian_log_likelihood(rng):
    """A GP marginal likelihood's value and gradient with respect to the kernel matrix (the
    backward of cholesky and of the triangular solves is planned too)."""
    a, y = _spd(rng, 8), rng.standard_normal((8, 1)).astype(np.float32)

    def nll(k, y):
        low = jnp.linalg.cholesky(k)
        alpha = jax.scipy.linalg.cho_solve((low, True), y)
        return 0.5 * jnp.sum(y * alpha) + jnp.sum(jnp.log(jnp.diag(low)))

    _check(jax.value_and_grad(nll), a, y, tol=1e-4)
    _check(jax.grad(lambda a: jnp.linalg.slogdet(a)[1]), a, tol=1e-4)


def test_kalman_filter_scan_is_one_persistent_call(rng):
    """A 4-state Kalman filter over 20 observations: each step's predict / update (a 2 x 2
    innovation covariance solved with jnp.linalg.solve) inside a lax.scan, the whole filter one
    persistent call."""
    n, m, steps = 4, 2, 20
    f = (np.eye(n) + 0.1 * rng.standard_normal((n, n))).astype(np.float32)
    h = rng.standard_normal((m, n)).astype(np.float32)
    q, r = 0.1 * np.eye(n, dtype=np.float32), 0.5 * np.eye(m, dtype=np.float32)
    ys = rng.standard_normal((steps, m)).astype(np.float32)

    def kalman(f, h, q, r, ys):
        def step(carry, y):
            x, p = carry
            x, p = f @ x, f @ p @ f.T + q
            s = h @ p @ h.T + r
            gain = jnp.linalg.solve(s, h @ p).T
            x = x + gain @ (y - h @ x)
            p = p - gain @ h @ p
            return (x, p), x

        return jax.lax.scan(step, (jnp.zeros(n), jnp.eye(n)), ys)

    _check(kalman, f, h, q, r, ys, tol=1e-4)


def test_empty_matrices(rng):
    """Size-0 systems (JAX's own testSolve has one): every result is empty, nothing is planned
    for them (an eqn whose results are all empty is a constant of their shape)."""
    a, b = np.zeros((1, 0, 0), np.float32), np.zeros((1, 0, 2), np.float32)
    _check(jnp.linalg.solve, a, b)
    _check(lambda a: (jnp.linalg.cholesky(a), jnp.linalg.inv(a)), a)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 3)])
@pytest.mark.parametrize("mode", ["reduced", "complete", "r"])
def test_qr_is_lapacks(rng, shape, mode):
    """Householder QR in geqrf / orgqr's order: Q and R equal LAPACK's to rounding, signs
    included (R's diagonal is -sign(a_jj) * |column|, dlarfg's choice), every mode and shape."""
    a = rng.standard_normal(shape).astype(np.float32)
    _check(lambda a: jnp.linalg.qr(a, mode=mode), a, gpu=shape == (6, 4))


def test_qr_with_zero_columns_reflects_nothing(rng):
    """A column already zero below the diagonal gets no reflection (tau = 0), an all-zero column
    no division by zero."""
    a = rng.standard_normal((5, 4)).astype(np.float32)
    a[:, 1] = 0.0
    a[3:, 2] = 0.0
    a[1:, 0] = 0.0
    _check(jnp.linalg.qr, a)


def test_orthogonal_init_and_a_gradient_through_qr(rng):
    """flax / optax code that calls QR: jax.nn.initializers.orthogonal (QR of a normal draw, signs
    fixed by R's diagonal), and the gradient of a loss through the QR factors (jax's QR JVP:
    triangular solves)."""
    init = jax.nn.initializers.orthogonal()
    a = rng.standard_normal((6, 4)).astype(np.float32)

    def fn(key, a):
        w = init(key, (8, 5), jnp.float32)
        loss = lambda a: jnp.sum(jnp.sin(jnp.linalg.qr(a)[0])) + jnp.sum(jnp.linalg.qr(a)[1] ** 2)  # noqa: E731
        return w, jax.grad(loss)(a)

    _check(fn, jax.random.key(4), a, tol=1e-4)
    with pytest.raises(ark.UnsupportedError, match="QR with column pivoting"):
        ark.plan(lambda a: jax.scipy.linalg.qr(a, pivoting=True), a)


def _sign_free_checks(got_vectors, got_values, want_values, a, tol):
    """What an eigendecomposition / SVD owes whatever its vectors' signs: its values as
    LAPACK's, orthonormal vectors (checked by the caller's reconstruction)."""
    scale = max(1.0, float(np.abs(want_values).max()))
    np.testing.assert_allclose(got_values, want_values, rtol=tol, atol=tol * scale)
    eye = np.eye(got_vectors.shape[-1], dtype=np.float32)
    gram = np.swapaxes(got_vectors, -1, -2) @ got_vectors
    np.testing.assert_allclose(gram, np.broadcast_to(eye, gram.shape), atol=tol * 10)


@pytest.mark.parametrize("shape", [(2, 2), (5, 5), (8, 8), (3, 7, 7), (24, 24)])
@pytest.mark.parametrize("lower", [True, False])
def test_eigh_by_jacobi_sweeps(rng, shape, lower):
    """jnp.linalg.eigh / lax.linalg.eigh: eigenvalues ascending as LAPACK's, orthonormal vectors
    with V diag(w) V^T the symmetric matrix of the named triangle (the other one is not read),
    each vector LAPACK's up to sign (distinct eigenvalues)."""
    x = rng.standard_normal(shape).astype(np.float32)
    a = x + np.swapaxes(x, -1, -2)
    junk = np.triu(rng.standard_normal(shape[-2:]), 1).astype(np.float32) * 100
    a = a + (junk if lower else junk.T)  # the unread triangle: must not matter
    fn = lambda a: jax.lax.linalg.eigh(a, lower=lower, symmetrize_input=False)  # noqa: E731
    (v, w), (v_want, w_want) = jax.jit(ark.persistent(fn))(a), jax.jit(fn)(a)
    v, w, v_want = np.asarray(v), np.asarray(w), np.asarray(v_want)
    _sign_free_checks(v, w, np.asarray(w_want), a, 2e-5)
    tri = np.tril(a) if lower else np.triu(a)
    sym = tri + np.swapaxes(tri, -1, -2) - tri * np.eye(shape[-1], dtype=np.float32)
    assert_close((v * w[..., None, :]) @ np.swapaxes(v, -1, -2), sym, 2e-5)
    np.testing.assert_allclose(np.abs(np.sum(v * v_want, axis=-2)), 1.0, atol=2e-3)


def test_eigh_of_repeated_and_zero_eigenvalues(rng):
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a = (q @ np.diag([1.0, 1.0, 1.0, 2.0, 2.0, 0.0]) @ q.T).astype(np.float32)
    (w, v), (w_want, _) = jax.jit(ark.persistent(jnp.linalg.eigh))(a), jax.jit(jnp.linalg.eigh)(a)
    _sign_free_checks(np.asarray(v), np.asarray(w), np.asarray(w_want), a, 2e-5)
    assert_close((np.asarray(v) * np.asarray(w)) @ np.asarray(v).T, a, 2e-5)
    zero = np.zeros((4, 4), np.float32)
    w0, v0 = jax.jit(ark.persistent(jnp.linalg.eigh))(zero)
    np.testing.assert_array_equal(np.asarray(w0), 0.0)
    np.testing.assert_array_equal(np.asarray(v0), np.eye(4))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (2, 7, 3), (20, 9)])
@pytest.mark.parametrize("full_matrices", [False, True])
def test_svd_by_one_sided_jacobi(rng, shape, full_matrices):
    """jnp.linalg.svd: singular values as LAPACK's (descending), U and V orthonormal (full ones
    completed), U diag(s) V^T = a, each singular vector LAPACK's up to sign; compute_uv=False
    too."""
    a = rng.standard_normal(shape).astype(np.float32)
    fn = lambda a: jnp.linalg.svd(a, full_matrices=full_matrices)  # noqa: E731
    (u, s, vt), (u_want, s_want, vt_want) = jax.jit(ark.persistent(fn))(a), jax.jit(fn)(a)
    u, s, vt = np.asarray(u), np.asarray(s), np.asarray(vt)
    assert u.shape == u_want.shape and vt.shape == vt_want.shape
    _sign_free_checks(u, s, np.asarray(s_want), a, 2e-5)
    _sign_free_checks(np.swapaxes(vt, -1, -2), s, np.asarray(s_want), a, 2e-5)
    k = s.shape[-1]
    assert_close((u[..., :, :k] * s[..., None, :]) @ vt[..., :k, :], a, 2e-5)
    dots = np.abs(np.sum(u[..., :, :k] * np.asarray(u_want)[..., :, :k], axis=-2))
    np.testing.assert_allclose(dots, 1.0, atol=2e-3)
    values = jax.jit(ark.persistent(lambda a: jnp.linalg.svd(a, compute_uv=False)))(a)
    assert_close(values, s_want, 2e-5)


def test_svd_of_a_rank_deficient_matrix_and_what_is_built_on_svd(rng):
    """A rank-2 6 x 4 matrix: U is still orthonormal (zero singular values' columns completed),
    and pinv / lstsq / matrix_rank / norm(ord=2) / cond equal jax.jit's."""
    low_rank = (rng.standard_normal((6, 2)) @ rng.standard_normal((2, 4))).astype(np.float32)
    u, s, vt = (np.asarray(t) for t in jax.jit(ark.persistent(jnp.linalg.svd))(low_rank))
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=2e-5)
    assert_close((u[:, :4] * s) @ vt, low_rank, 2e-5)
    a = rng.standard_normal((7, 4)).astype(np.float32)
    b = rng.standard_normal((7,)).astype(np.float32)

    def fn(a, b, low_rank):
        return (
            jnp.linalg.pinv(a),
            jnp.linalg.lstsq(a, b)[0],
            jnp.linalg.matrix_rank(low_rank),
            jnp.linalg.norm(a, ord=2),
            jnp.linalg.cond(a),
        )

    _check(fn, a, b, low_rank, tol=1e-4)
    with pytest.raises(ark.UnsupportedError, match="eigh of a subset"):
        ark.plan(lambda a: jax.lax.linalg.eigh(a, subset_by_index=(0, 2)), a[:4])


@pytest.mark.parametrize("scale", [1e-25, 1e20, 1e30])
def test_qr_and_svd_of_tiny_and_huge_matrices(rng, scale):
    """Sums of squares of entries near 1e-25 underflow float32 and near 1e20 overflow it: the
    matrix is divided by a power of two near its largest entry first (exact), so R and the
    singular values come out right instead of 0 or inf / NaN."""
    a = (rng.standard_normal((4, 3)) * scale).astype(np.float32)
    q, r = (np.asarray(t) for t in jax.jit(ark.persistent(jnp.linalg.qr))(a))
    q_want, r_want = (np.asarray(t) for t in jax.jit(jnp.linalg.qr)(a))
    assert_close(r / scale, r_want / scale, 2e-5)
    assert_close(q, q_want, 2e-5)
    u, s, vt = (np.asarray(t) for t in jax.jit(ark.persistent(jnp.linalg.svd))(a))
    s_want = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert_close(s / scale, s_want / scale, 2e-5)
    assert_close((u[:, :3] * s) @ vt / scale, a / scale, 2e-5)


@pytest.mark.parametrize(("shape", "full_matrices"), [((3, 0), True), ((3, 0), False),
                                                      ((0, 3), True), ((0, 3), False)])  # fmt: skip
def test_svd_of_an_empty_matrix(shape, full_matrices):
    _check(lambda a: jnp.linalg.svd(a, full_matrices=full_matrices), np.zeros(shape, np.float32))


def test_eigh_reads_one_triangle_and_sorts_whatever_the_flag(rng):
    """An inf in the unread triangle changes nothing (the diagonal is taken with a select, not
    multiplied by the identity); sort_eigenvalues=False still returns them ascending, as XLA's
    CPU and GPU solvers do."""
    x = rng.standard_normal((4, 4)).astype(np.float32)
    upper = np.triu(x + x.T) + np.tril(np.full((4, 4), np.inf, np.float32), -1)

    def fn(a):
        eigenvalues = jax.lax.linalg.eigh(a, lower=False, symmetrize_input=False)[1]
        return eigenvalues, jax.lax.linalg.eigh(x + x.T, sort_eigenvalues=False)[1]

    _check(fn, upper)
