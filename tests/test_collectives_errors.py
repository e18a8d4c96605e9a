"""Bad input to the jax_ark collectives fails at trace time, with a message that says what is wrong.

Nothing here runs a collective: every error must come before anything launches (tracing only).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark

ROWS = P("x")


@pytest.fixture
def strict(monkeypatch):
    """JAX_ARK_STRICT=1: the cases where ark would run jax.lax's collective raise instead (the
    fallback itself is tested in test_lax_fallback.py)."""
    monkeypatch.setenv("JAX_ARK_STRICT", "1")


def _trace(mesh, body, x, in_specs=ROWS, out_specs=ROWS, **kwargs):
    """Traces body inside shard_map over `mesh` (no compile, no run)."""
    return jax.make_jaxpr(
        jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)
    )(x)


X8 = jnp.zeros((8, 6), jnp.float32)
X2x4 = jnp.zeros((8, 8), jnp.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: jax_ark.psum(x, "z"),
        lambda x: jax_ark.pmax(x, ("x", "nope")),
        lambda x: jax_ark.all_gather(x, "z"),
        lambda x: jax_ark.psum_scatter(x, "z", tiled=True),
        lambda x: jax_ark.ppermute(x, "z", [(0, 1)]),
        lambda x: jax_ark.all_to_all(x, "z", 0, 0, tiled=True),
    ],
    ids=["psum", "pmax", "all_gather", "psum_scatter", "ppermute", "all_to_all"],
)
def test_unbound_axis_name(mesh8, call):
    with pytest.raises(NameError, match=r"axis name '(z|nope)' is not bound.*\('x',\)"):
        _trace(mesh8, call, X8)


def test_vmap_axis_name_is_rejected(mesh8, strict):
    def body(x):
        return jax.vmap(lambda row: jax_ark.psum(row, "batch"), axis_name="batch")(x)

    with pytest.raises(NameError, match=r"'batch' is not bound.*not over vmap/pmap axis names"):
        _trace(mesh8, body, X8)


def test_outside_shard_map():
    with pytest.raises(NameError, match=r"axis name 'x' is not bound.*not called inside"):
        jax.make_jaxpr(lambda x: jax_ark.psum(x, "x"))(X8)


def test_partially_manual_shard_map(mesh2x4, strict):
    body = lambda x: jax_ark.psum(x, "x")  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"mesh axes \('y',\) are not manual"):
        _trace(mesh2x4, body, X2x4, axis_names={"x"})


@pytest.mark.parametrize("axis_name", [(), ("x", "x")], ids=["empty", "duplicate"])
def test_bad_axis_name_tuple(mesh8, axis_name):
    with pytest.raises(ValueError, match="axis_name"):
        _trace(mesh8, lambda x: jax_ark.psum(x, axis_name), X8)


@pytest.mark.parametrize(
    "dtype", [jnp.bool_, jnp.int8, jnp.uint32, jnp.complex64, jnp.int16], ids=str
)
def test_unsupported_dtype(mesh8, strict, dtype):
    x = jnp.zeros((8, 4), dtype)
    expected = rf"unsupported dtype {np.dtype(dtype).name}; supported dtypes are float32, "
    expected += "bfloat16, float16, int32"
    with pytest.raises(TypeError, match=expected):
        _trace(mesh8, lambda v: jax_ark.all_gather(v, "x", tiled=True), x, out_specs=P())


def test_unsupported_dtype_in_a_pytree_leaf(mesh8, strict):
    tree = {"ok": jnp.zeros((8, 4), jnp.float32), "bad": jnp.zeros((8, 4), jnp.uint8)}
    with pytest.raises(TypeError, match=r"jax_ark.psum: unsupported dtype uint8"):
        _trace(mesh8, lambda t: jax_ark.psum(t, "x"), tree, in_specs=P("x"), out_specs=P())


def test_mixed_dtype_pytree_is_fine(mesh8):
    # Each leaf is its own collective, so leaves of different supported dtypes may mix.
    tree = (jnp.zeros((8, 4), jnp.float32), jnp.zeros((8, 2), jnp.int32))
    jaxpr = _trace(mesh8, lambda t: jax_ark.psum(t, "x"), tree, out_specs=P())
    assert str(jaxpr).count("ark_collective") == 2


@pytest.mark.parametrize("tiled", [False, True])
def test_scatter_dimension_not_divisible(mesh8, tiled):
    x = jnp.zeros((8, 12), jnp.float32)  # 12 is not 8 and not a multiple of 8
    match = "not divisible by the size 8" if tiled else "must equal the size 8"
    with pytest.raises(
        ValueError, match=rf"psum_scatter: scatter dimension 1 has size 12.*{match}"
    ):
        _trace(mesh8, lambda v: jax_ark.psum_scatter(v, "x", scatter_dimension=1, tiled=tiled), x)


@pytest.mark.parametrize("tiled", [False, True])
def test_split_axis_not_divisible(mesh2x4, tiled):
    x = jnp.zeros((2, 6 * 4), jnp.float32)  # per device (1, 6): 6 is not a multiple of 4
    match = "not divisible by the size 4" if tiled else "must equal the size 4"
    with pytest.raises(ValueError, match=rf"all_to_all: split_axis 1 has size 6.*{match}"):
        _trace(
            mesh2x4,
            lambda v: jax_ark.all_to_all(v, "y", 1, 0, tiled=tiled),
            x,
            in_specs=P("x", "y"),
            out_specs=P("x", "y"),
        )


@pytest.mark.parametrize(
    ("perm", "error", "match"),
    [
        ([(0, 1), (0, 2)], ValueError, "source 0 appears more than once"),
        ([(0, 1), (2, 1)], ValueError, "destination 1 appears more than once"),
        ([(0, 8)], ValueError, r"\(0, 8\) is out of range: indices must lie in 0..7"),
        ([(-1, 0)], ValueError, r"\(-1, 0\) is out of range"),
        ([(0, 1, 2)], ValueError, "is not a \\(source, destination\\) pair"),
        ([(0.5, 1)], TypeError, "must hold ints"),
        (3, TypeError, "perm must be a sequence of \\(source, destination\\) pairs"),
    ],
    ids=["dup-source", "dup-dest", "out-of-range", "negative", "triple", "float", "not-a-list"],
)
def test_bad_permutation(mesh8, perm, error, match):
    with pytest.raises(error, match=rf"jax_ark.ppermute: .*{match}"):
        _trace(mesh8, lambda v: jax_ark.ppermute(v, "x", perm), X8)


def test_all_gather_axis_out_of_range(mesh8):
    with pytest.raises(ValueError, match=r"all_gather: axis=3 is out of range .* rank 3"):
        _trace(mesh8, lambda v: jax_ark.all_gather(v, "x", axis=3), X8, out_specs=P())
    with pytest.raises(ValueError, match=r"all_gather: axis=2 is out of range .* rank 2"):
        _trace(mesh8, lambda v: jax_ark.all_gather(v, "x", axis=2, tiled=True), X8, out_specs=P())


@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_pmax_pmin_are_not_differentiable(mesh8, op):
    # jax.lax.pmax/pmin have no differentiation rule either; ours says so by name.
    fn = jax.shard_map(
        lambda v: getattr(jax_ark, op)(v, "x"), mesh=mesh8, in_specs=P("x"), out_specs=P()
    )
    with pytest.raises(NotImplementedError, match=rf"jax_ark.{op} is not differentiable"):
        jax.make_jaxpr(jax.grad(lambda v: fn(v).sum()))(X8)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_bad_timeout_environment(mesh8, monkeypatch, value):
    monkeypatch.setenv("JAX_ARK_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=r"JAX_ARK_TIMEOUT_S="):
        _trace(mesh8, lambda v: jax_ark.psum(v, "x"), X8, out_specs=P())


def test_timeout_is_read_at_trace_time(mesh8, monkeypatch):
    monkeypatch.setenv("JAX_ARK_TIMEOUT_S", "2.5")
    hlo = (
        jax.jit(
            jax.shard_map(
                lambda v: jax_ark.psum(v, "x"), mesh=mesh8, in_specs=P("x"), out_specs=P()
            )
        )
        .lower(X8)
        .as_text()
    )
    assert "timeout_ms = 2500" in hlo
    monkeypatch.delenv("JAX_ARK_TIMEOUT_S")
    hlo = (
        jax.jit(
            jax.shard_map(
                lambda v: jax_ark.pmax(v, "x"), mesh=mesh8, in_specs=P("x"), out_specs=P()
            )
        )
        .lower(X8)
        .as_text()
    )
    assert "timeout_ms = 60000" in hlo


def test_comm_key_is_stable_across_processes(tmp_path):
    # Python's hash() is salted per process; the key must not be, or processes would disagree.
    code = (
        "from jax_ark.collectives import _comm_key;print(_comm_key((('x', 2), ('y', 4)), ('y',)))"
    )
    keys = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,  # not the checkout: its source folder would shadow the installed package
        )
        keys.add(out.stdout.strip())
    assert len(keys) == 1, keys
    (key,) = keys
    assert -(2**63) <= int(key) < 2**63


def test_comm_key_names_the_group():
    from jax_ark.collectives import _comm_key

    mesh_axes = (("x", 2), ("y", 4))
    keys = {
        _comm_key(mesh_axes, ("x",)),
        _comm_key(mesh_axes, ("y",)),
        _comm_key(mesh_axes, ("x", "y")),
        _comm_key(mesh_axes, ("y", "x")),
        _comm_key((("x", 4), ("y", 2)), ("x",)),
        _comm_key((("x", 8),), ("x",)),
    }
    assert len(keys) == 6


def test_eager_bind_is_rejected():
    from jax_ark import _collective_primitive as prim

    with pytest.raises(RuntimeError, match="inside jax.shard_map under jax.jit"):
        prim.bind(
            jnp.zeros(3),
            jnp.int32(0),
            jnp.int32(0),
            op=prim.Op.all_reduce,
            axes=("x",),
            group_size=1,
            comm_key=0,
            timeout_ms=1000,
        )
