"""jax_ark collectives as a drop-in for jax.lax: the same arguments, results and error types,
and jax.lax's collective (with one FallbackWarning) wherever ark has no fast path.

Every result is compared with jax.lax on fresh random inputs (exact for integers).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from two_processes import run_two_workers

import jax_ark
from jax_ark import collectives as ark_collectives

ROWS = P("x")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the one-time fallback warnings afresh (and no strict mode from outside)."""
    monkeypatch.setattr(ark_collectives, "_warned", set())
    monkeypatch.delenv("JAX_ARK_STRICT", raising=False)


def _run(mesh, body, *args, in_specs=ROWS, out_specs=ROWS, **kwargs):
    f = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)
    return jax.jit(f)(*args)


def _uses_ark(mesh, body, *args, **kwargs) -> bool:
    in_specs = kwargs.pop("in_specs", ROWS)
    out_specs = kwargs.pop("out_specs", ROWS)
    f = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)
    return "ark_collective" in str(jax.make_jaxpr(f)(*args))


def _assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        if np.issubdtype(w.dtype, np.inexact):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, w)


# Every collective, as (name, call(module, v) -> result, out_specs) over mesh axis "x".
OPS = [
    ("psum", lambda m, v: m.psum(v, "x"), P()),
    ("pmax", lambda m, v: m.pmax(v, "x"), P()),
    ("pmin", lambda m, v: m.pmin(v, "x"), P()),
    ("pmean", lambda m, v: m.pmean(v, "x"), P()),
    ("all_gather", lambda m, v: m.all_gather(v, "x", axis=1, tiled=True), ROWS),
    ("psum_scatter", lambda m, v: m.psum_scatter(v, "x", scatter_dimension=1, tiled=True), ROWS),
    ("ppermute", lambda m, v: m.ppermute(v, "x", [(i, (i + 3) % 8) for i in range(8)]), ROWS),
    ("all_to_all", lambda m, v: m.all_to_all(v, "x", 1, 0, tiled=True), ROWS),
]
OP_IDS = [name for name, _, _ in OPS]


# ---- item 8: no leaked trace under jax.checking_leaks() ---------------------------------------


@pytest.mark.parametrize("name,call,out_specs", OPS, ids=OP_IDS)
def test_no_leaked_trace(mesh8, rng, name, call, out_specs):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    with jax.checking_leaks():
        got = _run(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
    _assert_same(got, _run(mesh8, lambda v: call(jax.lax, v), x, out_specs=out_specs))


def test_no_leaked_trace_with_grad_and_loop(mesh8, rng):
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)

    def body(m):
        def loss(v):
            v = jax.lax.fori_loop(0, 2, lambda i, u: m.psum(u, "x") * 0.5, v)
            return m.all_gather(v, "x", tiled=True).sum()

        return jax.grad(loss)

    with jax.checking_leaks():
        got = _run(mesh8, lambda v: body(jax_ark)(v), x, check_vma=False)
    _assert_same(got, _run(mesh8, lambda v: body(jax.lax)(v), x, check_vma=False))


# ---- item 7: custom_vjp with optimize_remat under remat + grad ----------------------------------


def _remat_grad(m, v):
    @jax.custom_vjp
    def f(u):
        return m.psum(jnp.sin(u), "x")

    def fwd(u):
        return f(u), jnp.cos(u)

    def bwd(cos_u, ct):
        return (cos_u * ct,)

    f.defvjp(fwd, bwd, optimize_remat=True)
    return jax.grad(lambda u: (jax.checkpoint(f)(u) ** 2).sum())(v)


def test_custom_vjp_optimize_remat_under_remat_and_grad(mesh8, rng):
    x = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    got = _run(mesh8, lambda v: _remat_grad(jax_ark, v), x, check_vma=False)
    _assert_same(got, _run(mesh8, lambda v: _remat_grad(jax.lax, v), x, check_vma=False))


# ---- item 9: jax.lax's signatures and behaviour ---------------------------------------------


GROUPS_NONE = [
    ("psum", lambda m, v: m.psum(v, "x", axis_index_groups=None), P()),
    ("pmax", lambda m, v: m.pmax(v, "x", axis_index_groups=None), P()),
    ("pmin", lambda m, v: m.pmin(v, "x", axis_index_groups=None), P()),
    ("pmean", lambda m, v: m.pmean(v, "x", axis_index_groups=None), P()),
    ("all_gather", lambda m, v: m.all_gather(v, "x", axis_index_groups=None, tiled=True), ROWS),
    (
        "psum_scatter",
        lambda m, v: m.psum_scatter(
            v, "x", axis_index_groups=None, scatter_dimension=1, tiled=True
        ),
        ROWS,
    ),
    (
        "all_to_all",
        lambda m, v: m.all_to_all(v, "x", 1, 0, axis_index_groups=None, tiled=True),
        ROWS,
    ),
]


@pytest.mark.parametrize("name,call,out_specs", GROUPS_NONE, ids=[n for n, _, _ in GROUPS_NONE])
def test_axis_index_groups_none_is_accepted(mesh8, rng, name, call, out_specs):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    assert _uses_ark(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
    got = _run(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
    _assert_same(got, _run(mesh8, lambda v: call(jax.lax, v), x, out_specs=out_specs))


def test_axis_index_groups_run_lax(mesh8, rng, monkeypatch):
    # jax.lax supports groups for all_gather inside shard_map and rejects them for psum; ark
    # hands both to it.
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def gather(m):
        return lambda v: m.all_gather(v, "x", axis_index_groups=groups, tiled=True)

    with pytest.warns(jax_ark.FallbackWarning, match="axis_index_groups"):
        got = _run(mesh8, gather(jax_ark), x)
    _assert_same(got, _run(mesh8, gather(jax.lax), x))
    with pytest.raises(NotImplementedError):
        _run(mesh8, lambda v: jax.lax.psum(v, "x", axis_index_groups=groups), x)
    with pytest.warns(jax_ark.FallbackWarning), pytest.raises(NotImplementedError):
        _run(mesh8, lambda v: jax_ark.psum(v, "x", axis_index_groups=groups), x)
    monkeypatch.setenv("JAX_ARK_STRICT", "1")
    with pytest.raises(NotImplementedError, match="jax_ark.all_gather: axis_index_groups"):
        _run(mesh8, gather(jax_ark), x)


def test_axis_index_groups_under_vmap_is_lax(rng):
    # jax.lax itself rejects groups under vmap (NotImplementedError); ark hands them to it.
    x = jnp.asarray(rng.integers(-50, 50, (4, 3)), jnp.int32)
    groups = [[0, 2], [1, 3]]
    with pytest.raises(NotImplementedError) as lax_error:
        jax.vmap(lambda v: jax.lax.psum(v, "i", axis_index_groups=groups), axis_name="i")(x)
    with pytest.warns(jax_ark.FallbackWarning, match="vmap/pmap"):
        with pytest.raises(NotImplementedError) as ark_error:
            jax.vmap(lambda v: jax_ark.psum(v, "i", axis_index_groups=groups), axis_name="i")(x)
    assert str(ark_error.value) == str(lax_error.value)


def test_all_gather_to(mesh8, rng):
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    varying = lambda m, v: m.all_gather(v, "x", to="varying", tiled=True)  # noqa: E731
    assert _uses_ark(mesh8, lambda v: varying(jax_ark, v), x)
    _assert_same(
        _run(mesh8, lambda v: varying(jax_ark, v), x), _run(mesh8, lambda v: varying(jax.lax, v), x)
    )
    # An invariant result (checked by out_specs=P() under check_vma) is jax.lax's all_gather.
    invarying = lambda m, v: m.all_gather(v, "x", to="invarying", tiled=True)  # noqa: E731
    with pytest.warns(jax_ark.FallbackWarning, match="to='invarying'"):
        got = _run(mesh8, lambda v: invarying(jax_ark, v), x, out_specs=P())
    _assert_same(got, _run(mesh8, lambda v: invarying(jax.lax, v), x, out_specs=P()))
    with pytest.raises(ValueError, match="to='sideways'"):
        _run(mesh8, lambda v: jax_ark.all_gather(v, "x", to="sideways"), x, out_specs=P())


def test_unreduced_input(mesh8, rng):
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)

    def body(m):
        return lambda v: m.psum(jax.lax.pcast(v, "x", to="unreduced"), "x")

    with pytest.warns(jax_ark.FallbackWarning, match="unreduced"):
        got = _run(mesh8, body(jax_ark), x, out_specs=P())
    _assert_same(got, _run(mesh8, body(jax.lax), x, out_specs=P()))


def test_unreduced_input_strict_is_a_clear_error(mesh8, monkeypatch):
    monkeypatch.setenv("JAX_ARK_STRICT", "1")
    x = jnp.zeros((8, 3), jnp.float32)
    with pytest.raises(ValueError, match="jax_ark.all_gather: the input is unreduced"):
        _run(
            mesh8,
            lambda v: jax_ark.all_gather(jax.lax.pcast(v, "x", to="unreduced"), "x"),
            x,
            out_specs=P(),
        )


@pytest.mark.parametrize("axes", [("x", "y"), ("y", "x")], ids=["mesh_order", "reversed"])
def test_ppermute_over_a_tuple_of_axes_matches_lax(mesh2x4, rng, axes):
    # jax.lax.ppermute numbers ranks in mesh order whatever the tuple's order (axis_index does
    # not); ark matches ppermute (docs/lax_compat.md).
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    perm = [(i, (i * 3 + 1) % 8) for i in range(8)]
    spec = P(("x", "y"))

    def body(m):
        return lambda v: m.ppermute(v, axes, perm)

    got = _run(mesh2x4, body(jax_ark), x, in_specs=spec, out_specs=spec)
    _assert_same(got, _run(mesh2x4, body(jax.lax), x, in_specs=spec, out_specs=spec))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, v: m.ppermute(v, "x", [(0, 1), (0, 2)]),
        lambda m, v: m.ppermute(v, "x", [(0, 9)]),
        lambda m, v: m.psum_scatter(v, "x", scatter_dimension=1, tiled=True),
        lambda m, v: m.all_to_all(v, "x", 1, 0, tiled=True),
    ],
    ids=["perm_duplicate_source", "perm_out_of_range", "scatter_indivisible", "split_indivisible"],
)
def test_error_types_match_lax(mesh8, call):
    x = jnp.zeros((8, 12), jnp.float32)  # 12 is not divisible by 8
    with pytest.raises(Exception) as lax_error:
        _run(mesh8, lambda v: call(jax.lax, v), x, check_vma=False)
    with pytest.raises(lax_error.type):
        _run(mesh8, lambda v: call(jax_ark, v), x, check_vma=False)


# ---- item 10: jax.lax where ark has no fast path ---------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.uint32, jnp.complex64, jnp.int8], ids=str)
@pytest.mark.parametrize("name,call,out_specs", OPS, ids=OP_IDS)
def test_dtype_without_fast_path_runs_lax(mesh8, rng, dtype, name, call, out_specs):
    raw = rng.integers(0, 100, (8, 16))
    if dtype == jnp.complex64:
        x = jnp.asarray(raw + 1j * rng.integers(0, 100, (8, 16)), dtype)
    else:
        x = jnp.asarray(raw % 2 if dtype == jnp.bool_ else raw, dtype)
    if name in ("pmax", "pmin") and dtype == jnp.complex64:
        x = x.real.astype(jnp.float32) + 0  # lax has no complex max/min either; use a float
        assert _uses_ark(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
        return
    try:
        want = _run(mesh8, lambda v: call(jax.lax, v), x, out_specs=out_specs)
    except TypeError as lax_error:  # e.g. psum_scatter of bool: jax.lax fails, so must ark
        with pytest.warns(jax_ark.FallbackWarning), pytest.raises(TypeError) as ark_error:
            _run(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
        assert str(ark_error.value) == str(lax_error)
        return
    with pytest.warns(jax_ark.FallbackWarning, match=f"dtype {np.dtype(dtype).name}"):
        got = _run(mesh8, lambda v: call(jax_ark, v), x, out_specs=out_specs)
    _assert_same(got, want)


def test_fallback_warns_once_and_strict_raises(mesh8, rng, monkeypatch):
    x = jnp.asarray(rng.integers(0, 9, (8, 4)), jnp.uint32)
    body = lambda v: jax_ark.psum(v, "x")  # noqa: E731
    with pytest.warns(jax_ark.FallbackWarning):
        _run(mesh8, body, x, out_specs=P())
    with warnings.catch_warnings():
        warnings.simplefilter("error", jax_ark.FallbackWarning)
        _run(mesh8, lambda v: jax_ark.psum(v * 2, "x"), x, out_specs=P())  # no second warning
    monkeypatch.setenv("JAX_ARK_STRICT", "1")
    with pytest.raises(TypeError, match="unsupported dtype uint32"):
        _run(mesh8, lambda v: jax_ark.psum(v * 3, "x"), x, out_specs=P())


def test_mixed_pytree_uses_ark_where_it_can(mesh8, rng):
    tree = {
        "f": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
        "b": jnp.asarray(rng.integers(0, 2, (8, 4)), jnp.bool_),
    }
    body = lambda m: lambda t: m.pmax(t, "x")  # noqa: E731
    with pytest.warns(jax_ark.FallbackWarning, match="dtype bool"):
        got = _run(mesh8, body(jax_ark), tree, out_specs=P())
    _assert_same(got, _run(mesh8, body(jax.lax), tree, out_specs=P()))
    assert _uses_ark(mesh8, body(jax_ark), tree, out_specs=P())


@pytest.mark.parametrize("name,call,out_specs", OPS, ids=OP_IDS)
def test_vmap_axis_name_runs_lax(rng, name, call, out_specs):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    call_i = lambda m: lambda v: call(m, v[None])  # noqa: E731  (a leading dim to split/gather)

    def over_vmap(m):
        # The same call with the vmap axis named "x".
        return jax.vmap(call_i(m), axis_name="x")

    with pytest.warns(jax_ark.FallbackWarning, match="vmap/pmap"):
        got = over_vmap(jax_ark)(x)
    _assert_same(got, over_vmap(jax.lax)(x))


def test_partially_manual_shard_map_runs_lax(mesh2x4, rng):
    x = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)

    def body(m):
        return lambda v: m.psum(v, "x")

    def run(m):
        f = jax.shard_map(body(m), mesh=mesh2x4, in_specs=P("x"), out_specs=P(), axis_names={"x"})
        return jax.jit(f)(x)

    with pytest.warns(jax_ark.FallbackWarning, match="partially manual"):
        got = run(jax_ark)
    _assert_same(got, run(jax.lax))


def test_mesh_spanning_two_processes_runs_lax():
    worker = Path(__file__).with_name("multiprocess_fallback_worker.py")
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_ARK_TIMEOUT_S="10",  # before the fallback, ark's CPU rendezvous waited for the
    )  # other process's ranks, which are not in this process, until this timeout
    run = run_two_workers(worker, env, deadline_s=120)
    assert not run.timed_out, f"workers did not finish within 120 s\n{run.report()}"
    for pid, rc in enumerate(run.returncodes):
        assert rc == 0 and f"[{pid}] WORKER_OK" in run.outputs[pid], run.report()


def test_mesh_spanning_two_processes_reduces_hierarchically():
    # 2 processes x 4 CPU devices: ark inside each process, jax.lax across (the worker checks
    # results against jax.lax and numpy, and the jaxprs for which one ran).
    worker = Path(__file__).with_name("multiprocess_hierarchical_worker.py")
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_ARK_TIMEOUT_S="20",
    )
    env.pop("JAX_ARK_STRICT", None)
    run = run_two_workers(worker, env, deadline_s=180)
    assert not run.timed_out, f"workers did not finish within 180 s\n{run.report()}"
    for pid, rc in enumerate(run.returncodes):
        assert rc == 0 and f"[{pid}] WORKER_OK" in run.outputs[pid], run.report()
