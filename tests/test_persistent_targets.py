"""Planner defaults per platform: GPU plans (one worker per SM, about one GEMV column tile per
SM) are picked from the platform, explicit arguments win, and GPU-shaped plans run correctly on
the CPU executor (equal to jax.jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from persistent_models import assert_close as _close
from persistent_models import attention, rms_mlp

import jax_ark as ark
from jax_ark._persistent import _target
from jax_ark._persistent._reference import interpret

H100_SMS = 132
BF16 = ml_dtypes.bfloat16


def chain(x, *ws):
    for w in ws:
        x = jax.nn.gelu(x @ w)
    return x


def batched(a, b):
    return jnp.tanh(jnp.einsum("bmk,bkn->bmn", a, b))


def test_gpu_workers_one_per_sm_capped_by_residency():
    assert _target.gpu_workers(H100_SMS) == H100_SMS
    assert _target.gpu_workers(H100_SMS, max_resident=2 * H100_SMS) == H100_SMS
    assert _target.gpu_workers(H100_SMS, max_resident=100) == 100
    assert _target.normalize_platform("cuda") == _target.normalize_platform("gpu") == "gpu"
    with pytest.raises(ValueError, match="not on 'tpu'"):
        _target.normalize_platform("tpu")


@pytest.mark.parametrize(
    "d,batch,tile_m,tile_n,tiles",
    [(1024, 1, 1, 8, 128), (4096, 1, 1, 32, 128), (256, 1, 1, 8, 32), (1024, 16, 16, 8, 128)],
)
def test_gpu_plan_of_decode_chain_splits_each_layer_over_the_sms(d, batch, tile_m, tile_n, tiles):
    x = jax.ShapeDtypeStruct((batch, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, d), jnp.bfloat16)
    p = ark.plan(chain, x, w, w, platform="gpu", num_workers=_target.gpu_workers(H100_SMS))
    assert p.num_workers == H100_SMS
    for i, op in enumerate(p.ops):
        assert (op.tile_m, op.tile_n) == (tile_m, tile_n)
        assert sum(t.op == i for t in p.tasks) == tiles
    # each layer's tiles land on distinct workers (one tile per SM per layer)
    for i in range(len(p.ops)):
        owners = [w for w, q in enumerate(p.queues) for t in q if p.tasks[t].op == i]
        assert len(set(owners)) == tiles


def test_cpu_defaults_unchanged_and_explicit_arguments_win(rng):
    x = rng.standard_normal((1, 256)).astype(np.float32)
    w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    cpu = ark.plan(chain, x, w)  # numpy arguments: jax's default backend, CPU here
    assert cpu.num_workers == _target.cpu_workers()
    assert cpu.ops[0].tile_n == max(64, -(-256 // cpu.num_workers // 64) * 64)
    assert ark.persistent(chain).plan(x, w).to_binary().tobytes() == cpu.to_binary().tobytes()
    explicit = ark.plan(chain, x, w, platform="gpu", num_workers=5, tile_n=24)
    assert explicit.num_workers == 5 and explicit.ops[0].tile_n == 24
    with pytest.raises(ValueError, match="pass num_workers"):
        ark.plan(chain, x, w, platform="gpu")  # no GPU in this process


def test_cpu_default_workers_share_the_cores_inside_shard_map(mesh2x4, rng, monkeypatch):
    """8 device programs on this host each get cores // 8 workers (at least 1); results match."""
    monkeypatch.delenv("JAX_ARK_PERSISTENT_WORKERS", raising=False)
    monkeypatch.setattr(_target.os, "cpu_count", lambda: 16)
    x = rng.standard_normal((8 * 2, 256)).astype(np.float32)
    w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    fast = ark.persistent(chain)
    seen = []

    def body(x, w):
        seen.append(fast.plan(x, w).num_workers)
        return fast(x, w)

    P = jax.sharding.PartitionSpec
    run = jax.jit(
        jax.shard_map(body, mesh=mesh2x4, in_specs=(P(("x", "y")), P()), out_specs=P(("x", "y")))
    )
    _close(run(x, w), jax.jit(chain)(x, w), 2e-5)
    assert seen == [16 // 8]
    assert ark.plan(chain, x, w).num_workers == 8  # outside shard_map: min(cores, 8)


def test_platform_from_argument_devices():
    x = jax.device_put(jnp.ones((2, 8)), jax.devices("cpu")[0])
    assert _target.platform_of([x])[0] == "cpu"
    assert _target.platform_of([np.ones(3)])[0] == _target.normalize_platform(jax.default_backend())


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (BF16, 3e-2)])
def test_gpu_shaped_plans_run_on_the_cpu_executor(rng, dtype, tol):
    d, layers = 256, 4
    x = rng.standard_normal((1, d)).astype(dtype)
    ws = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype) for _ in range(layers)]
    p = ark.plan(chain, x, *ws, platform="gpu", num_workers=H100_SMS)
    assert p.ops[0].tile_n == 8
    got = jax.jit(ark.persistent(chain, plan=p))(x, *ws)
    _close(got, jax.jit(chain)(x, *ws), tol)


def test_gpu_shaped_gemm_reduce_and_batched_plans_run_on_the_cpu_executor(rng):
    x = rng.standard_normal((40, 96)).astype(np.float32)
    g = rng.standard_normal(96).astype(np.float32)
    w1 = (rng.standard_normal((96, 200)) / 10).astype(np.float32)
    w2 = (rng.standard_normal((200, 96)) / 14).astype(np.float32)
    for fn, args in (
        (rms_mlp, (x, g, w1, w2)),
        (attention, (x, w1[:, :96], w2[:96], w1[:, 100:196])),
        (batched, (x.reshape(8, 5, 96), rng.standard_normal((8, 96, 24)).astype(np.float32))),
    ):
        p = ark.plan(fn, *args, platform="gpu", num_workers=24)
        want = jax.jit(fn)(*args)
        _close(jax.jit(ark.persistent(fn, plan=p))(*args), want, 2e-5)
        _close(interpret(p, *args)[0], want, 2e-5)
