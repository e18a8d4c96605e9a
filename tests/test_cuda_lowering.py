"""The "cuda" lowering of `ark_collective`, checked on CPU (no GPU needed).

The bootstrap is stubbed and the program exported for platform cuda: the custom call must carry
exactly the attributes the FFI handler binds (xla_ffi/gpu/collective_handler.cc), and the
bootstrap's rank order must equal `lax.axis_index(axes)`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark
from jax_ark import _collective_primitive, _cuda_collectives

# name -> MLIR type, as collective_handler.cc binds them (.Attr<int32_t>("op"), ...).
HANDLER_ATTRS = {
    "op": "i32",
    "reduce": "i32",
    "group_size": "i64",
    "comm_key": "i64",
    "timeout_ms": "i64",
    "send_to": "tensor<?xi64>",
    "recv_from": "tensor<?xi64>",
    "comm_id": "i64",
    "site": "i64",
}


@pytest.fixture
def stub_bootstrap(monkeypatch):
    seen = []

    def fake(mesh, axes, group_size):
        seen.append((axes, _cuda_collectives._groups(mesh, axes), group_size))
        return 4242

    monkeypatch.setattr(_cuda_collectives, "_communicator", fake)
    _cuda_collectives.register_lowering(_collective_primitive.ark_collective_p)
    return seen


def _attributes(config: str) -> dict[str, str]:
    out = {}
    for name, value in re.findall(r"(\w+) = ((?:dense<[^>]*> : tensor<[^>]*>)|[^,}]+)", config):
        if value.startswith("dense<"):
            out[name] = "tensor<?x" + value.split("tensor<")[1].split("x")[-1].rstrip(">") + ">"
        else:
            out[name] = value.split(":")[-1].strip()
    return out


def test_cuda_custom_call_attributes_and_rank_order(mesh2x4, stub_bootstrap):
    def body(a):
        s = jax_ark.psum(a, ("y", "x"))
        return jax_ark.ppermute(s, "y", perm=[(0, 1), (1, 2), (2, 3), (3, 0)])

    spec = P(("x", "y"))
    f = jax.jit(jax.shard_map(body, mesh=mesh2x4, in_specs=spec, out_specs=spec))
    x = jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
    exported = jax.export.export(
        f,
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ark_collective_cuda")],
    )(x)
    configs = re.findall(
        r"custom_call @ark_collective_cuda\(.*?mhlo.backend_config = \{(.*?)\}",
        exported.mlir_module(),
    )
    assert len(configs) == 2
    for config in configs:
        assert _attributes(config) == HANDLER_ATTRS
    assert (
        "comm_id = 4242" in configs[0] and "op = 0" in configs[0] and "group_size = 8" in configs[0]
    )
    assert "send_to = dense<[1, 2, 3, 0]>" in configs[1] and "op = 3" in configs[1]

    # The bootstrap's group table: column = rank. It must be lax.axis_index(axes) on each device.
    (axes, groups, size), (axes2, groups2, size2) = stub_bootstrap
    assert (axes, size, axes2, size2) == (("y", "x"), 8, ("y",), 4)
    for axes_, table in [(axes, groups), (axes2, groups2)]:
        index = jax.jit(
            jax.shard_map(
                lambda a, axes_=axes_: jnp.full((1,), jax.lax.axis_index(axes_)),
                mesh=mesh2x4,
                in_specs=spec,
                out_specs=spec,
            )
        )(x)
        rank_of = {s.device.id: int(np.asarray(s.data)[0]) for s in index.addressable_shards}
        for row in table:
            assert [rank_of[d.id] for d in row] == list(range(len(row)))


def test_cuda_graph_target_is_opt_in(mesh2x4, stub_bootstrap, monkeypatch):
    # JAX_ARK_CUDA_GRAPHS=1 (read at lowering) selects the command-buffer-compatible target with
    # the same attributes; without it the default target, which XLA never records into a graph.
    def body(a):
        return jax_ark.psum(a, "x")

    spec = P(("x", "y"))
    x = jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
    for value, target in [("1", "ark_collective_cuda_graph"), ("0", "ark_collective_cuda")]:
        monkeypatch.setenv("JAX_ARK_CUDA_GRAPHS", value)
        f = jax.jit(jax.shard_map(body, mesh=mesh2x4, in_specs=spec, out_specs=spec))
        exported = jax.export.export(
            f,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(x)
        configs = re.findall(
            rf"custom_call @{target}\(.*?mhlo.backend_config = \{{(.*?)\}}",
            exported.mlir_module(),
        )
        assert len(configs) == 1, (value, exported.mlir_module())
        assert _attributes(configs[0]) == HANDLER_ATTRS


def _persistent_mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2 + 1.0


def test_persistent_graph_target_is_opt_in(monkeypatch):
    # A plan without put tasks lowers to the command-buffer-compatible ark_persistent_graph under
    # JAX_ARK_CUDA_GRAPHS=1 (read at lowering, as for the collectives), else to ark_persistent.
    rng = np.random.default_rng(5)
    args = [rng.standard_normal(s).astype(np.float32) for s in [(8, 16), (16, 32), (32, 16)]]
    for value, target in [("1", "ark_persistent_graph"), ("0", "ark_persistent")]:
        monkeypatch.setenv("JAX_ARK_CUDA_GRAPHS", value)
        f = jax.jit(jax_ark.persistent(_persistent_mlp, num_workers=2))
        exported = jax.export.export(
            f,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(*args)
        targets = re.findall(r"custom_call @(\w+)\(", exported.mlir_module())
        assert targets == [target], (value, targets)


def test_persistent_graph_target_runs_on_cpu(monkeypatch):
    # One ffi_call names one target for every platform, so the CPU backend registers the graph
    # name too (the same handler): a program lowered with JAX_ARK_CUDA_GRAPHS=1 runs here, equal
    # to jax.jit on fresh inputs, call after call.
    monkeypatch.setenv("JAX_ARK_CUDA_GRAPHS", "1")
    rng = np.random.default_rng(6)
    f = jax.jit(jax_ark.persistent(_persistent_mlp))
    shapes = [(8, 16), (16, 32), (32, 16)]
    assert "ark_persistent_graph" in f.lower(*(np.zeros(s, np.float32) for s in shapes)).as_text()
    for _ in range(3):
        args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        np.testing.assert_allclose(
            np.asarray(f(*args)), np.asarray(jax.jit(_persistent_mlp)(*args)), rtol=2e-5, atol=2e-5
        )


@pytest.mark.skipif(not jax_ark.has_cuda(), reason="jax_ark built without the CUDA runtime")
def test_cuda_module_registers_both_targets():
    from jax_ark import _ffi

    names = set(_ffi.cuda_module().registrations())
    want = {"ark_collective_cuda", "ark_collective_cuda_graph", "ark_persistent"}
    graphs = {"ark_persistent_graph", "ark_persistent_comm", "ark_persistent_comm_graph"}
    assert want | graphs <= names, names
