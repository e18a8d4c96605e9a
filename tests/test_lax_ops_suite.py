"""JAX's own op records (jax._src.internal_test_util.lax_test_util: lax_ops(), what jax's
lax_test.py runs for every elementwise lax op, and lax_named_reduce_ops(), its reductions) run
through ark.persistent against jax.jit.

For each (op, dtype) of those records, every combination of JAX's compatible shapes (broadcasting
included) with JAX's own input generator for that op and JAX's tolerance for the dtype (integers and
bools exact, NaN / inf where jax.jit has them). What ark does not plan is pinned below and must be
refused before anything runs: a newly planned op fails here until it moves to the planned list.
"""

from __future__ import annotations

import itertools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_ark as ark

lax_test_util = pytest.importorskip("jax._src.internal_test_util.lax_test_util")
jtu = pytest.importorskip("jax._src.test_util")

# The records' ops that ark plans (for the dtypes it takes), and those it refuses. A record of an
# op in neither set (one a later jax adds) is skipped: it is not known what to expect of it.
_PLANNED_OPS = {
    "neg", "sign", "floor", "ceil", "round", "nextafter", "is_finite", "exp", "exp2", "expm1",
    "log", "log1p", "tanh", "logistic", "sin", "cos", "atan2", "sqrt", "rsqrt", "cbrt", "square",
    "reciprocal", "tan", "asin", "acos", "atan", "asinh", "acosh", "atanh", "sinh", "cosh",
    "lgamma", "digamma", "erf", "erfc", "erf_inv", "abs", "pow", "bitwise_and", "bitwise_not",
    "bitwise_or", "bitwise_xor", "add", "sub", "mul", "div", "rem", "max", "min", "eq", "ne", "ge",
    "gt", "le", "lt", "population_count", "clz", "mulhi",
}  # fmt: skip
# Tensor dtypes ark.persistent does not take (refused for any op).
_REFUSED_DTYPES = {"complex64"}
# Ops refused for every dtype, and single (op, dtype) refusals.
_REFUSED_OPS = {
    "betainc", "igamma", "igammac", "bessel_i0e", "bessel_i1e", "real", "imag", "complex",
    "conj",
}  # fmt: skip
_REFUSED_PAIRS: set[tuple[str, str]] = set()


def _cases():
    seen = set()
    for rec in lax_test_util.lax_ops():
        for dtype in rec.dtypes:
            name = np.dtype(dtype).name
            if (rec.op, name) in seen:  # sqrt / rsqrt have a second record for complex64
                continue
            seen.add((rec.op, name))
            yield pytest.param(rec, dtype, id=f"{rec.op}-{name}")


def _refused(op: str, dtype_name: str) -> bool:
    return dtype_name in _REFUSED_DTYPES or op in _REFUSED_OPS or (op, dtype_name) in _REFUSED_PAIRS


def _same_specials(got: np.ndarray, want: np.ndarray, what: str):
    """(got, want, finite): both as float64, checked to be NaN / +inf / -inf at the same places;
    finite masks want's other values."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    for special in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(special(got), special(want), err_msg=what)
    return got, want, np.isfinite(want)


def _check(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    got, want, finite = _same_specials(got, want, what)
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("rec,dtype", list(_cases()))
def test_lax_op_records_match_jit(request, rec, dtype):
    if rec.op not in _PLANNED_OPS | _REFUSED_OPS:
        pytest.skip(f"lax.{rec.op} is new to this project's list (a later jax's record)")
    op = getattr(lax, rec.op)
    dtype_name = np.dtype(dtype).name
    seed = zlib.crc32(request.node.nodeid.encode())
    groups = [
        itertools.combinations_with_replacement(group, rec.nargs)
        for group in lax_test_util.compatible_shapes
    ]
    for i, shapes in enumerate(itertools.chain(*groups)):
        rng = rec.rng_factory(np.random.RandomState(seed + i))
        args = [rng(shape, dtype) for shape in shapes]
        if _refused(rec.op, dtype_name):
            with pytest.raises(ark.UnsupportedError):
                ark.plan(op, *args)
            continue
        want = np.asarray(jax.jit(op)(*args))
        got = np.asarray(jax.jit(ark.persistent(op))(*args))
        tol = jtu.tolerance(want.dtype, rec.tol) if rec.tol else jtu.default_tolerance()[want.dtype]
        _check(got, want, tol, f"{rec.op} on {dtype_name} {shapes}")


def _reduce_cases():
    for rec in lax_test_util.lax_named_reduce_ops():
        for dtype in rec.dtypes:
            name = np.dtype(dtype).name
            if name not in _REFUSED_DTYPES and np.dtype(dtype).itemsize <= 4:  # no 64-bit: x64 off
                yield pytest.param(rec, dtype, id=f"{rec.op.__name__}-{name}")


@pytest.mark.parametrize("rec,dtype", list(_reduce_cases()))
def test_lax_reduction_records_match_jit(request, rec, dtype):
    """Every axis subset of a 3-D operand, JAX's default input generator for the dtype."""
    seed = zlib.crc32(request.node.nodeid.encode())
    shape = (3, 4, 5)
    for i, axes in enumerate([(0,), (1,), (2,), (0, 2), (1, 2), (0, 1, 2)]):
        x = jtu.rand_default(np.random.RandomState(seed + i))(shape, dtype)
        fn = lambda x, axes=axes: rec.op(x, axes)  # noqa: E731
        want = np.asarray(jax.jit(fn)(x))
        got = np.asarray(jax.jit(ark.persistent(fn))(x))
        what = f"{rec.op.__name__} on {np.dtype(dtype).name} over {axes}"
        folds = rec.op.__name__ in ("reduce_sum", "reduce_prod")
        if folds and want.dtype.itemsize == 2 and want.dtype.kind in "fV":
            # A 16-bit sum / product: ark folds in float32 and rounds once; XLA's fold may round
            # every step, an error of up to K ulps of the terms' magnitude (K terms).
            terms = math.prod(shape[a] for a in axes)
            eps = float(jnp.finfo(want.dtype).eps)
            scale = np.abs(np.asarray(x, np.float64)).sum(axis=axes)
            if rec.op.__name__ == "reduce_prod":
                scale = np.abs(np.prod(np.asarray(x, np.float64), axis=axes))
            assert got.dtype == want.dtype, what
            got, want, finite = _same_specials(got, want, what)  # a product may overflow
            err = np.abs(got[finite] - want[finite])
            assert (err <= terms * eps * np.broadcast_to(scale, want.shape)[finite]).all(), what
            continue
        tol = jtu.default_tolerance()[want.dtype] if want.dtype.kind in "fV" else 0
        _check(got, want, tol, what)
