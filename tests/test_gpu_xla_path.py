"""The XLA path of the GPU collectives on ONE GPU: jit(shard_map) over a 1-device mesh.

A group of one rank still goes through everything the harness skips: the "cuda" lowering (concrete
mesh lookup, FFI attributes), the bootstrap (comm_create / comm_connect with a "self" peer), the
FFI handler (attribute decoding, stream -> device -> rank state) and the kernels' LL and chunked
paths. Cheap bring-up check before the multi-process test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_mesh():
    return Mesh(np.array(jax.devices("gpu")[:1]), ("x",))


def _run(mesh, fn, x):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    return np.asarray(f(jax.device_put(x, jax.devices("gpu")[0])))


# 300_000 float32 = 1.2 MB per rank: beyond the 64 KiB LL limit, so the chunked path runs too.
@pytest.mark.parametrize("count", [1, 77, 300_000], ids=["one", "ll", "chunked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32], ids=str)
def test_one_rank_ops(rng, gpu_mesh, count, dtype):
    import jax_ark

    x = rng.standard_normal((1, count)) * 100
    x = x.astype(np.int32) if dtype == jnp.int32 else x.astype(dtype)
    for name, fn in [
        ("psum", lambda a: jax_ark.psum(a, "x")),
        ("pmax", lambda a: jax_ark.pmax(a, "x")),
        ("all_gather", lambda a: jax_ark.all_gather(a, "x", axis=0, tiled=True)),
        ("psum_scatter", lambda a: jax_ark.psum_scatter(a, "x", scatter_dimension=0, tiled=True)),
        ("ppermute", lambda a: jax_ark.ppermute(a, "x", perm=[(0, 0)])),
        ("all_to_all", lambda a: jax_ark.all_to_all(a, "x", 0, 0, tiled=True)),
    ]:
        got = _run(gpu_mesh, fn, x)
        np.testing.assert_array_equal(got, np.asarray(x), err_msg=name)
    # Also the real thing against jax.lax on the same inputs (identity for one rank, but through
    # the same FFI call as n ranks); then no failure may have been recorded.
    want = _run(gpu_mesh, lambda a: jax.lax.psum(a * 2, "x"), x)
    got = _run(gpu_mesh, lambda a: jax_ark.psum(a * 2, "x"), x)
    np.testing.assert_array_equal(got, want)
    from jax_ark import _cuda_collectives

    _cuda_collectives.check()


def test_many_calls_in_one_program(rng, gpu_mesh):
    # Several collectives of one communicator inside one jitted program, LL and chunked mixed:
    # epochs advance per call inside the program and halves alternate between protocols.
    import jax_ark

    small = rng.standard_normal((1, 33)).astype(np.float32)
    big = rng.standard_normal((1, 200_000)).astype(np.float32)

    def fn(a, b):
        for _ in range(5):
            a = jax_ark.psum(a, "x") * 0.5 + 1.0
            b = jax_ark.all_gather(b, "x", axis=0, tiled=True) * 0.5 + 1.0
        return a, b

    f = jax.jit(
        jax.shard_map(fn, mesh=gpu_mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x")))
    )
    got_a, got_b = (np.asarray(v) for v in f(small, big))
    want_a, want_b = small, big
    for _ in range(5):
        want_a = want_a * np.float32(0.5) + np.float32(1.0)
        want_b = want_b * np.float32(0.5) + np.float32(1.0)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-6)


def test_cpu_ordering_dependency_folds_away_on_gpu(gpu_mesh):
    # On CPU each collective's `color` operand depends on the previous collective's result, through
    # lax.platform_dependent (a `case` on a constant index) and `bits * optimization_barrier(0)`.
    # On GPU it must fold away at compile time: an XLA:GPU conditional copies its branch index to
    # the host (a stream sync per collective), and a leftover `c + z * 0` is a kernel launch.
    import re

    import jax_ark

    def fn(a):
        return jax_ark.psum(jax_ark.psum(a, "x") * 2.0, "x")

    f = jax.jit(jax.shard_map(fn, mesh=gpu_mesh, in_specs=P("x"), out_specs=P("x")))
    hlo = f.lower(jnp.ones((1, 8), jnp.float32)).compile().as_text()
    assert len(re.findall(r'custom_call_target="ark_collective_cuda"', hlo)) == 2, hlo
    assert not re.search(r"\b(conditional|opt-barrier)\(", hlo), hlo


def test_cuda_graph_target_replays_exactly(rng, gpu_mesh, monkeypatch):
    # JAX_ARK_CUDA_GRAPHS=1: the collectives are lowered to the command-buffer-compatible target,
    # so XLA may record them (with the fusions between them) into one CUDA graph and replay it on
    # later calls without running the FFI handler. Each replay must read a fresh epoch from device
    # memory: three executions of a program with 8 chained collectives (LL and chunked) stay exact.
    import re

    import jax_ark
    from jax_ark import _cuda_collectives

    monkeypatch.setenv("JAX_ARK_CUDA_GRAPHS", "1")
    small = rng.standard_normal((1, 33)).astype(np.float32)
    big = rng.standard_normal((1, 200_000)).astype(np.float32)

    def fn(a, b):
        for _ in range(4):
            a = jax_ark.psum(a, "x") * 0.5 + 1.0
            b = jax_ark.all_gather(b, "x", axis=0, tiled=True) * 0.5 + 1.0
        return a, b

    f = jax.jit(
        jax.shard_map(fn, mesh=gpu_mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x")))
    )
    hlo = f.lower(small, big).compile().as_text()
    assert len(re.findall(r'custom_call_target="ark_collective_cuda_graph"', hlo)) == 8, hlo
    want_a, want_b = small, big
    for _ in range(4):
        want_a = want_a * np.float32(0.5) + np.float32(1.0)
        want_b = want_b * np.float32(0.5) + np.float32(1.0)
    for _ in range(3):
        got_a, got_b = (np.asarray(v) for v in f(small, big))
        np.testing.assert_allclose(got_a, want_a, rtol=1e-6)
        np.testing.assert_allclose(got_b, want_b, rtol=1e-6)
    _cuda_collectives.check()
