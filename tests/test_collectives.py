"""jax_ark collectives against their jax.lax namesakes, end to end on 8 virtual CPU devices.

Every test runs the same program twice, once with `jax_ark` and once with `jax.lax`, on fresh random
data, and compares what every device got. Data-movement ops and max/min must match exactly; sums
match within the dtype's rounding (see `_assert_reduction_close`).

Each device's result is returned with a leading axis of 1 under out_specs P(<all mesh axes>), so the
global output stacks the per-device results in device order, whatever their vma type.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ark

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32]
DTYPE_IDS = ["f32", "bf16", "f16", "i32"]
# (mesh fixture, axis_name): a 1-D mesh, each axis of a 2-D mesh, and both axes together.
CONFIGS = [("mesh8", "x"), ("mesh2x4", "x"), ("mesh2x4", "y"), ("mesh2x4", ("x", "y"))]
CONFIG_IDS = ["8:x", "2x4:x", "2x4:y", "2x4:xy"]
LARGE = 1 << 20  # elements per device for the large cases


# ---- helpers ------------------------------------------------------------------------------------


def _random(rng, shape, dtype):
    if np.dtype(dtype) == np.int32:
        return jnp.asarray(rng.integers(-1000, 1000, size=shape, dtype=np.int32))
    return jnp.asarray(rng.standard_normal(size=shape).astype(np.float32)).astype(dtype)


def _group_size(mesh, axis_name) -> int:
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _per_device(mesh, fn, *xs, check_vma=True):
    """Runs fn on each device's slice of xs (each x has shape (8, *local)), jitted in shard_map.

    Returns fn's per-device results stacked in device order: (8, *local_result) per leaf.
    """
    spec = P(tuple(mesh.axis_names))

    def body(*local):
        local = [jax.tree.map(lambda a: a[0], x) for x in local]
        return jax.tree.map(lambda r: r[None], fn(*local))

    mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma)
    return jax.jit(mapped)(*xs)


def _compare(mesh, make_fn, *xs, exact: bool, check_vma=True):
    """Runs make_fn(jax_ark) and make_fn(jax.lax) per device and checks they agree."""
    got = _per_device(mesh, make_fn(jax_ark), *xs, check_vma=check_vma)
    want = _per_device(mesh, make_fn(jax.lax), *xs, check_vma=check_vma)
    jax.tree.map(functools.partial(_assert_same, exact=exact), got, want)
    return got, want


def _assert_same(got, want, *, exact: bool):
    assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    if exact or np.dtype(got.dtype) == np.int32:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        tol = {np.dtype(jnp.float32): 2e-5}.get(np.dtype(got.dtype), 2e-2)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def _assert_reduction_close(got, want_f32, dtype):
    """A 16-bit sum must be the float32 sum rounded once (docs/internals.md): within 2 ulps of
    the dtype of the float32 reference, whatever order either side added in."""
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want_f32, np.float32), rtol=2 * eps, atol=2 * eps
    )


def _partial_perm(n: int) -> list[tuple[int, int]]:
    # Every other rank sends, to distinct destinations; the other ranks receive zeros.
    return [(i, (3 * i + 1) % n) for i in range(0, n, 2)]


def _shift_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


# ---- types --------------------------------------------------------------------------------------

_TYPE_CASES = {
    "psum": lambda mod, a: mod.psum(a, "y"),
    "psum_xy": lambda mod, a: mod.psum(a, ("x", "y")),
    "pmin": lambda mod, a: mod.pmin(a, "x"),
    "pmean_int": lambda mod, a: mod.pmean(a.astype(jnp.int32), "y"),
    "all_gather": lambda mod, a: mod.all_gather(a, "y", axis=1),
    "all_gather_tiled": lambda mod, a: mod.all_gather(a, ("y", "x"), axis=1, tiled=True),
    "psum_scatter": lambda mod, a: mod.psum_scatter(a, "y", scatter_dimension=1, tiled=True),
    "ppermute": lambda mod, a: mod.ppermute(a, "x", [(0, 1)]),
    "all_to_all": lambda mod, a: mod.all_to_all(a, "y", 1, 0, tiled=True),
    "psum_invariant": lambda mod, a: mod.psum(jnp.ones(3), "y"),
    "all_gather_invariant": lambda mod, a: mod.all_gather(jnp.ones(3), "y"),
}


@pytest.mark.parametrize("case", list(_TYPE_CASES))
def test_types_match_lax(mesh2x4, case):
    # Shape, dtype and varying manual axes (vma), from tracing alone.
    types = {}
    for mod in (jax_ark, jax.lax):

        def body(a, mod=mod):
            types[mod.__name__] = jax.typeof(_TYPE_CASES[case](mod, a))
            return a

        jax.make_jaxpr(
            jax.shard_map(body, mesh=mesh2x4, in_specs=P("x", "y"), out_specs=P("x", "y"))
        )(jnp.zeros((4, 32), jnp.float32))
    assert str(types["jax_ark"]) == str(types["jax.lax"]), types


# ---- reductions ---------------------------------------------------------------------------------

REDUCTIONS = ["psum", "pmax", "pmin", "pmean"]
SHAPES = [(), (7,), (3, 5), (1000,)]  # size 1, odd, 2-D odd, non-power-of-two


def _reduction_cases():
    # Every op x dtype once; the mesh config and shape rotate so each op meets all of them.
    cases = []
    for i, op in enumerate(REDUCTIONS):
        for j, (dtype, dtype_id) in enumerate(zip(DTYPES, DTYPE_IDS, strict=True)):
            k = (i + j) % 4
            cases.append(
                pytest.param(
                    op,
                    dtype,
                    CONFIGS[k],
                    SHAPES[(i + 2 * j) % 4],
                    id=f"{op}-{dtype_id}-{CONFIG_IDS[k]}",
                )
            )
    cases.append(pytest.param("psum", jnp.float32, CONFIGS[0], (LARGE,), id="psum-f32-large"))
    cases.append(pytest.param("psum", jnp.bfloat16, CONFIGS[3], (LARGE + 3,), id="psum-bf16-large"))
    cases.append(pytest.param("pmax", jnp.int32, CONFIGS[2], (LARGE,), id="pmax-i32-large"))
    return cases


@pytest.mark.parametrize(("op", "dtype", "config", "shape"), _reduction_cases())
def test_reduction_matches_lax(request, rng, op, dtype, config, shape):
    mesh_name, axis_name = config
    mesh = request.getfixturevalue(mesh_name)
    x = _random(rng, (8, *shape), dtype)
    make = lambda mod: lambda a: getattr(mod, op)(a, axis_name)  # noqa: E731
    is_16bit_sum = op in ("psum", "pmean") and np.dtype(dtype).itemsize == 2
    got, _ = _compare(mesh, make, x, exact=op in ("pmax", "pmin"))
    if is_16bit_sum:
        # Tighter check than the loose one against lax in the same 16-bit dtype: against lax in
        # float32, rounded once.
        want = _per_device(
            mesh, lambda a: getattr(jax.lax, op)(a.astype(jnp.float32), axis_name).astype(dtype), x
        )
        _assert_reduction_close(got, want, dtype)


# ---- all_gather ---------------------------------------------------------------------------------

_GATHER_VARIANTS = [(0, False), (1, False), (-1, False), (0, True), (1, True), (-1, True)]


def _gather_cases():
    cases = []
    for i, (axis, tiled) in enumerate(_GATHER_VARIANTS):
        k, d = i % 4, (i + i // 4) % 4
        cases.append(
            pytest.param(
                axis,
                tiled,
                CONFIGS[k],
                DTYPES[d],
                (3, 5),
                id=f"axis{axis}-{'tiled' if tiled else 'stacked'}-{CONFIG_IDS[k]}-{DTYPE_IDS[d]}",
            )
        )
    cases.append(pytest.param(0, True, CONFIGS[0], jnp.float32, (LARGE // 8 + 1,), id="large"))
    cases.append(pytest.param(0, False, ("mesh2x4", ("y", "x")), jnp.int32, (5,), id="axes-yx"))
    return cases


@pytest.mark.parametrize(("axis", "tiled", "config", "dtype", "shape"), _gather_cases())
def test_all_gather_matches_lax(request, rng, axis, tiled, config, dtype, shape):
    mesh_name, axis_name = config
    mesh = request.getfixturevalue(mesh_name)
    x = _random(rng, (8, *shape), dtype)
    make = lambda mod: lambda a: mod.all_gather(a, axis_name, axis=axis, tiled=tiled)  # noqa: E731
    _compare(mesh, make, x, exact=True)


# ---- psum_scatter -------------------------------------------------------------------------------


def _scatter_cases():
    cases = []
    for i, (dim, tiled) in enumerate([(0, False), (1, False), (0, True), (1, True)] * 2):
        k, d = (i + i // 4) % 4, i % 4
        cases.append(
            pytest.param(
                dim,
                tiled,
                CONFIGS[k],
                DTYPES[d],
                id=f"dim{dim}-{'tiled' if tiled else 'exact'}-{CONFIG_IDS[k]}-{DTYPE_IDS[d]}",
            )
        )
    return cases


@pytest.mark.parametrize(("dim", "tiled", "config", "dtype"), _scatter_cases())
def test_psum_scatter_matches_lax(request, rng, dim, tiled, config, dtype):
    mesh_name, axis_name = config
    mesh = request.getfixturevalue(mesh_name)
    n = _group_size(mesh, axis_name)
    shape = [5, 3]
    shape[dim] = 3 * n if tiled else n
    x = _random(rng, (8, *shape), dtype)

    def make(mod):
        return lambda a: mod.psum_scatter(a, axis_name, scatter_dimension=dim, tiled=tiled)

    got, _ = _compare(mesh, make, x, exact=False)
    if np.dtype(dtype).itemsize == 2:
        want = _per_device(mesh, lambda a: make(jax.lax)(a.astype(jnp.float32)).astype(dtype), x)
        _assert_reduction_close(got, want, dtype)


def test_psum_scatter_large(mesh8, rng):
    x = _random(rng, (8, LARGE), jnp.float32)
    make = lambda mod: lambda a: mod.psum_scatter(a, "x", tiled=True)  # noqa: E731
    _compare(mesh8, make, x, exact=False)


# ---- all_to_all ---------------------------------------------------------------------------------


def _all_to_all_cases():
    cases = []
    variants = [(s, c, t) for t in (False, True) for s in (0, 1) for c in (0, 1)]
    for i, (split, concat, tiled) in enumerate(variants):
        k, d = i % 4, (i + i // 4) % 4
        cases.append(
            pytest.param(
                split,
                concat,
                tiled,
                CONFIGS[k],
                DTYPES[d],
                id=f"{split}to{concat}-{'tiled' if tiled else 'exact'}-"
                f"{CONFIG_IDS[k]}-{DTYPE_IDS[d]}",
            )
        )
    return cases


@pytest.mark.parametrize(("split", "concat", "tiled", "config", "dtype"), _all_to_all_cases())
def test_all_to_all_matches_lax(request, rng, split, concat, tiled, config, dtype):
    mesh_name, axis_name = config
    mesh = request.getfixturevalue(mesh_name)
    n = _group_size(mesh, axis_name)
    shape = [3, 5]
    shape[split] = 2 * n if tiled else n
    x = _random(rng, (8, *shape), dtype)

    def make(mod):
        return lambda a: mod.all_to_all(a, axis_name, split, concat, tiled=tiled)

    _compare(mesh, make, x, exact=True)


def test_all_to_all_large(mesh2x4, rng):
    x = _random(rng, (8, LARGE, 2), jnp.bfloat16)
    make = lambda mod: lambda a: mod.all_to_all(a, ("x", "y"), 0, 1, tiled=True)  # noqa: E731
    _compare(mesh2x4, make, x, exact=True)


# ---- ppermute -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "dtype", "kind", "shape"),
    [
        (CONFIGS[0], jnp.float32, "shift", (7, 3)),
        (CONFIGS[0], jnp.int32, "partial", (1000,)),
        (CONFIGS[1], jnp.bfloat16, "partial", ()),
        (CONFIGS[2], jnp.float16, "shift", (5,)),
        (CONFIGS[3], jnp.int32, "partial", (3, 2)),
        (CONFIGS[3], jnp.float32, "shift", (LARGE,)),
    ],
    ids=["8:x-f32-shift", "8:x-i32-partial", "2x4:x-bf16", "2x4:y-f16", "2x4:xy-i32", "large"],
)
def test_ppermute_matches_lax(request, rng, config, dtype, kind, shape):
    mesh_name, axis_name = config
    mesh = request.getfixturevalue(mesh_name)
    n = _group_size(mesh, axis_name)
    perm = _partial_perm(n) if kind == "partial" else _shift_perm(n)
    x = _random(rng, (8, *shape), dtype)
    got, _ = _compare(mesh, lambda mod: lambda a: mod.ppermute(a, axis_name, perm), x, exact=True)
    if kind == "partial":
        # Ranks that receive nothing get zeros: make sure that case was exercised.
        assert np.any(np.all(np.asarray(got, np.float32).reshape(8, -1) == 0, axis=1))


# ---- autodiff -----------------------------------------------------------------------------------

_GRAD_OPS = {
    "psum": lambda mod, ax, n: lambda a: mod.psum(a, ax),
    "pmean": lambda mod, ax, n: lambda a: mod.pmean(a, ax),
    "all_gather": lambda mod, ax, n: lambda a: mod.all_gather(a, ax, axis=1),
    "all_gather_tiled": lambda mod, ax, n: lambda a: mod.all_gather(a, ax, axis=1, tiled=True),
    "psum_scatter": lambda mod, ax, n: lambda a: mod.psum_scatter(a[:n], ax),
    "psum_scatter_tiled": (
        lambda mod, ax, n: lambda a: mod.psum_scatter(a, ax, scatter_dimension=1, tiled=True)
    ),
    "ppermute": lambda mod, ax, n: lambda a: mod.ppermute(a, ax, _partial_perm(n)),
    "all_to_all_tiled": lambda mod, ax, n: lambda a: mod.all_to_all(a, ax, 1, 0, tiled=True),
    # (jax.lax's own transpose of an untiled all_to_all with split != concat is broken in
    # jax 0.10.2, hence split == concat here.)
    "all_to_all": lambda mod, ax, n: lambda a: mod.all_to_all(a[:n], ax, 0, 0),
}


@pytest.mark.parametrize("op", list(_GRAD_OPS))
def test_grad_matches_lax(request, rng, op):
    i = list(_GRAD_OPS).index(op)
    mesh_name, axis_name = CONFIGS[i % 4]
    mesh = request.getfixturevalue(mesh_name)
    n = _group_size(mesh, axis_name)
    x = _random(rng, (8, 8, 2 * n), jnp.float32)

    def loss(mod, x, w):
        y = _per_device_unjitted(mesh, _GRAD_OPS[op](mod, axis_name, n), x)
        return jnp.sum(jnp.sin(y) * w)

    w = _random(
        rng,
        jax.eval_shape(
            lambda v: _per_device_unjitted(mesh, _GRAD_OPS[op](jax.lax, axis_name, n), v), x
        ).shape,
        jnp.float32,
    )
    got = jax.jit(jax.grad(functools.partial(loss, jax_ark)))(x, w)
    want = jax.jit(jax.grad(functools.partial(loss, jax.lax)))(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert np.any(np.asarray(got) != 0)


def _per_device_unjitted(mesh, fn, x, check_vma=True):
    spec = P(tuple(mesh.axis_names))
    body = lambda a: fn(a[0])[None]  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma)(x)


@pytest.mark.parametrize("op", ["psum", "all_gather", "ppermute"])
def test_grad_without_vma_checking(mesh2x4, rng, op):
    # check_vma=False: no vma is tracked, and psum's transpose is a psum again (as jax.lax's).
    x = _random(rng, (8, 4, 8), jnp.float32)
    w = _random(rng, (8, 4, 8) if op != "all_gather" else (8, 4, 4, 8), jnp.float32)

    def loss(mod, x):
        y = _per_device_unjitted(mesh2x4, _GRAD_OPS[op](mod, "y", 4), x, check_vma=False)
        return jnp.sum(y * w)

    got = jax.jit(jax.grad(functools.partial(loss, jax_ark)))(x)
    want = jax.jit(jax.grad(functools.partial(loss, jax.lax)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_jvp_matches_lax(mesh8, rng):
    x, t = _random(rng, (8, 16), jnp.float32), _random(rng, (8, 16), jnp.float32)

    def f(mod, v):
        return _per_device_unjitted(mesh8, lambda a: mod.psum_scatter(a, "x", tiled=True), v)

    got = jax.jit(lambda x, t: jax.jvp(functools.partial(f, jax_ark), (x,), (t,)))(x, t)
    want = jax.jit(lambda x, t: jax.jvp(functools.partial(f, jax.lax), (x,), (t,)))(x, t)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


# ---- vmap ---------------------------------------------------------------------------------------

_VMAP_OPS = {
    "psum": lambda mod: lambda a: mod.psum(a, "y"),
    "all_gather": lambda mod: lambda a: mod.all_gather(a, ("x", "y"), axis=1),
    "psum_scatter": lambda mod: lambda a: mod.psum_scatter(a, "y", scatter_dimension=1, tiled=True),
    "ppermute": lambda mod: lambda a: mod.ppermute(a, "x", [(0, 1)]),
    "all_to_all": lambda mod: lambda a: mod.all_to_all(a, "y", 1, 0, tiled=True),
}


@pytest.mark.parametrize("op", list(_VMAP_OPS))
def test_vmap_of_shard_map(mesh2x4, rng, op):
    x = _random(rng, (3, 8, 4, 8), jnp.float32)  # batch of 3, then (8, *local)

    def run(mod):
        fn = functools.partial(_per_device_unjitted, mesh2x4, _VMAP_OPS[op](mod))
        return jax.jit(jax.vmap(fn, in_axes=0))(x)

    _assert_same(run(jax_ark), run(jax.lax), exact=op != "psum")


@pytest.mark.parametrize("op", ["psum", "all_gather", "psum_scatter", "all_to_all"])
def test_vmap_inside_shard_map(mesh2x4, rng, op):
    # The batch axis (in_axes=1) sits inside each device's block: the batching rule must move it.
    x = _random(rng, (8, 4, 3, 8), jnp.float32)

    def make(mod):
        return lambda a: jax.vmap(_VMAP_OPS[op](mod), in_axes=1, out_axes=1)(a)

    _compare(mesh2x4, make, x, exact=op != "psum")


# ---- many calls, ordering -----------------------------------------------------------------------


def test_thousand_calls_in_a_fori_loop(mesh8, rng):
    x = _random(rng, (8, 16), jnp.int32)

    def make(mod):
        def run(a):
            def step(_, v):
                v = mod.ppermute(v, "x", _shift_perm(8))
                return v + mod.psum(v % 7, "x") % 5

            return jax.lax.fori_loop(0, 500, step, a)  # 2 collectives per step: 1000 calls

        return run

    _compare(mesh8, make, x, exact=True)


def test_independent_collectives_in_a_row(mesh2x4, rng):
    # No data dependency between these collectives: each device must still run them in the same
    # order as its peers (XLA keeps custom calls in program order on every device).
    a, b, c = (_random(rng, (8, 64), jnp.float32) for _ in range(3))

    def make(mod):
        def run(a, b, c):
            def step(_, abc):
                a, b, c = abc
                return (
                    jax.lax.pcast(mod.psum(a, "x") * 0.5, "x", to="varying"),
                    jax.lax.pcast(mod.psum(b, "y") * 0.25, "y", to="varying"),
                    mod.ppermute(c, ("x", "y"), _shift_perm(8)),
                )

            first = (mod.psum(a, "y"), mod.all_gather(b, "x"), mod.pmax(c, ("x", "y")))
            return first, jax.lax.fori_loop(0, 50, step, (a, b, c))

        return run

    _compare(mesh2x4, make, a, b, c, exact=False)


@pytest.mark.parametrize("axis_names", [("x", "x"), ("x", "y")], ids=["same-group", "two-groups"])
def test_many_independent_collectives_keep_order(mesh2x4, rng, monkeypatch, axis_names):
    # 12 collectives whose inputs are all ready at once, with buffers > 512 bytes: XLA:CPU's thunk
    # executor runs such a program as a dataflow graph (not in program order). Without jax_ark's
    # ordering dependency between collectives this deadlocked or mixed up calls of a group.
    monkeypatch.setenv("JAX_ARK_TIMEOUT_S", "20")  # a regression fails here instead of hanging
    a, b = (_random(rng, (8, 16384), jnp.float32) for _ in range(2))

    def make(mod):
        def run(a, b):
            return [mod.psum(jnp.sin(a * (k + 1)) + b * k, axis_names[k % 2]) for k in range(12)]

        return run

    _compare(mesh2x4, make, a, b, exact=False)


@pytest.mark.parametrize("nesting", ["fori_loop", "cond"])
def test_collectives_inside_and_outside_control_flow(mesh8, rng, monkeypatch, nesting):
    # Same-shape psums in loop / branch bodies and outside them, independent of each other. XLA:CPU
    # runs a while/cond as one thunk of the enclosing computation, so these start in different
    # orders on different devices (or concurrently); the runtime must still pair each psum with
    # the same psum on every device. Before call sites this mixed them up (timeouts, "two devices
    # claim rank", or wrong data). Inputs are small integers held in float32, so every sum is
    # exact whatever the summation order, and the results must equal jax.lax's bit for bit.
    monkeypatch.setenv("JAX_ARK_TIMEOUT_S", "20")  # a regression fails here instead of hanging
    pairs = 3

    def make(mod):
        def run(a, b):
            outs = []
            for k in range(pairs):
                # sin makes the inputs cost real time, so the thunks' start order varies.
                ak = jnp.round((jnp.sin(a * (k + 1)) + b * k) * 50)
                bk = jnp.round((jnp.sin(b * (k + 2)) + a * k) * 50)
                if nesting == "fori_loop":

                    def step(_, v):
                        return v + mod.psum(v % 7, "x") - 20

                    outs.append(jax.lax.fori_loop(0, 3, step, ak))
                else:
                    outs.append(
                        jax.lax.cond(
                            ak[0] > -1000,  # always true, unknown to XLA
                            lambda v: mod.psum(v * 3, "x"),
                            lambda v: mod.psum(v, "x") * 2,
                            ak,
                        )
                    )
                outs.append(mod.psum(bk, "x"))
            return outs

        return run

    for _ in range(4):
        a, b = (_random(rng, (8, 16384), jnp.float32) for _ in range(2))
        _compare(mesh8, make, a, b, exact=True)


# ---- pytrees, invariant inputs, check_vma=False -------------------------------------------------


def test_pytrees(mesh2x4, rng):
    tree = {
        "w": _random(rng, (8, 3, 4), jnp.float32),
        "steps": (_random(rng, (8, 4), jnp.int32), _random(rng, (8,), jnp.bfloat16)),
    }

    def make(mod):
        return lambda t: (
            mod.psum(t, "x"),
            mod.pmean(t["w"], "y"),
            mod.all_gather(t, ("x", "y"), axis=0),
            mod.ppermute(t, "y", _partial_perm(4)),
            mod.pmax(t, "y"),
        )

    _compare(mesh2x4, make, tree, exact=False)


def test_invariant_inputs(mesh2x4, rng):
    # A device-invariant value is made varying first (as jax.lax does): psum gives n * x.
    c = jnp.asarray(rng.standard_normal((5,)).astype(np.float32))
    x = _random(rng, (8, 5), jnp.float32)

    def make(mod):
        return lambda a: (
            mod.psum(c, "y"),
            jnp.asarray(mod.psum(2, ("x", "y")), jnp.int32),  # (jax.lax gives a Python int)
            mod.all_gather(c, "x"),
            mod.pmin(c, "y") + a,
            mod.psum_scatter(jnp.ones((4, 3)), "y"),
        )

    got, _ = _compare(mesh2x4, make, x, exact=False)
    np.testing.assert_allclose(np.asarray(got[0][0]), 4 * np.asarray(c), rtol=1e-6)
    assert np.all(np.asarray(got[1]) == 16)


def test_without_vma_checking(mesh2x4, rng):
    x = _random(rng, (8, 6, 4), jnp.float32)

    def make(mod):
        return lambda a: (
            mod.psum(a, "x"),
            mod.all_gather(a, "y", tiled=True),
            mod.psum_scatter(a, "y", scatter_dimension=1),
            mod.all_to_all(a, "y", 1, 0, tiled=True),
        )

    _compare(mesh2x4, make, x, exact=False, check_vma=False)


# ---- timeouts -----------------------------------------------------------------------------------


def test_timeout_names_op_rank_and_peer(cpu_devices, monkeypatch, rng):
    # A mesh of its own (unique axis name, hence its own comm_key), so the rendezvous state this
    # failure leaves behind is never shared with other tests.
    mesh = Mesh(np.array(cpu_devices), ("timeout_test",))
    monkeypatch.setenv("JAX_ARK_TIMEOUT_S", "0.5")
    x = _random(rng, (8, 4), jnp.float32)

    def body(a):
        # Rank 3 skips the collective: its peers wait for it until the timeout.
        def collect(v):
            return jax.lax.pcast(jax_ark.psum(v, "timeout_test"), "timeout_test", to="varying")

        skip = jax.lax.axis_index("timeout_test") == 3
        return jax.lax.cond(skip, lambda v: v, collect, a)

    fn = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("timeout_test"), out_specs=P("timeout_test"))
    )
    # The op, the waiting rank and the peer it waited for (rank 3) are all named.
    expected = (
        r"(?s)DEADLINE_EXCEEDED.*all_reduce timed out after 500 ms: rank (\d+) waited for rank 3\b"
    )
    with pytest.raises(Exception, match=expected) as info:
        jax.block_until_ready(fn(x))
    assert re.search(expected, str(info.value)).group(1) != "3"

    # The process stays usable: a healthy collective of another group right after works.
    monkeypatch.delenv("JAX_ARK_TIMEOUT_S")
    mesh8 = Mesh(np.array(cpu_devices), ("x",))
    ok = jax.jit(
        jax.shard_map(lambda a: jax_ark.psum(a, "x"), mesh=mesh8, in_specs=P("x"), out_specs=P())
    )(x)
    np.testing.assert_allclose(np.asarray(ok), np.asarray(x).reshape(8, 1, 4).sum(0), rtol=1e-5)
