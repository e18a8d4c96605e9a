"""One of two JAX processes sharing ONE GPU (spawned by test_gpu_multiprocess.py).

Usage: python gpu_multiprocess_worker.py PROCESS_ID PORT. Runs jitted shard_maps with jax_ark's
collectives, and ark.persistent plans with jax.lax collectives inside, over the 2-process mesh (the
GPU collectives and the plans' puts go through CUDA IPC; XLA's own NCCL path refuses two processes
on one GPU) and checks each local result against numpy. Prints WORKER_OK.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=120,
)

from jax._src import distributed  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ark  # noqa: E402
from jax_ark import _cuda_collectives  # noqa: E402

assert jax.process_count() == 2 and len(jax.local_devices()) == 1, jax.devices()
mesh = jax.make_mesh((2,), ("x",))
rng = np.random.default_rng(1234)  # identical global data in both processes


def barrier(name: str) -> None:
    # The other process may still be compiling; meet before launching so the GPU-side waits
    # (bounded by the collectives' timeout) do not include the other side's compile time.
    distributed.global_state.client.wait_at_barrier(f"jax_ark_test/{name}", 120_000)


def run(name, fn, global_x, expected):
    """Runs fn on three inputs (global_x scaled by 1, -2, 3), all dispatched before any result
    is read, and checks each call's local result against expected(global input): epochs advance,
    scratch halves alternate, and a call that consumed what an earlier call left in scratch
    (calls 1 and 3 share a half) shows up as wrong data, not as a pass on repeated inputs."""
    sharding = NamedSharding(mesh, P("x"))
    inputs = [(global_x * k).astype(global_x.dtype) for k in (1, -2, 3)]
    xs = [
        jax.make_array_from_process_local_data(sharding, g[process_id : process_id + 1])
        for g in inputs
    ]
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    compiled = f.lower(xs[0]).compile()
    barrier(name)
    ys = [compiled(x) for x in xs]
    for k, (g, y) in enumerate(zip(inputs, ys, strict=True)):
        got, want = np.asarray(y.addressable_data(0)), expected(g)
        message = f"{name}, call {k}"
        if want.dtype.kind == "i":
            np.testing.assert_array_equal(got, want, err_msg=message)
        else:
            np.testing.assert_allclose(
                got.astype(np.float32),
                want.astype(np.float32),
                rtol=1e-2,
                atol=1e-2,
                err_msg=message,
            )
    print(f"[{process_id}] {name} ok", flush=True)


def summed(g):
    """This process's block of psum over the two processes (16-bit floats summed in float32)."""
    return (g[0].astype(np.float32) + g[1].astype(np.float32)).astype(g.dtype)[None]


def summed_int(g):
    return (g[0] + g[1])[None]


g = rng.standard_normal((2, 6, 5)).astype(np.float32)
run("psum", lambda a: jax_ark.psum(a, "x"), g, summed)
gi = rng.integers(-100, 100, size=(2, 7, 3), dtype=np.int32)
run("psum_int32", lambda a: jax_ark.psum(a, "x"), gi, summed_int)
gb = rng.standard_normal((2, 9)).astype(jax.numpy.bfloat16)
run("psum_bf16", lambda a: jax_ark.psum(a, "x"), gb, summed)
run("all_gather", lambda a: jax_ark.all_gather(a, "x", axis=0, tiled=True), g, lambda v: v)
run(
    "psum_scatter",
    lambda a: jax_ark.psum_scatter(a, "x", scatter_dimension=1, tiled=True),
    g,
    lambda v: summed(v)[:, 3 * process_id : 3 * process_id + 3],
)
run(
    "ppermute",
    lambda a: jax_ark.ppermute(a, "x", perm=[(0, 1), (1, 0)]),
    g,
    lambda v: v[1 - process_id][None],
)
big = rng.standard_normal((2, 300_000)).astype(np.float32)  # beyond the LL path: chunked rounds
run("psum_large", lambda a: jax_ark.psum(a, "x"), big, summed)
# ark.persistent plans with collectives inside: put tasks into the other process's symmetric region
# (CUDA IPC), one kernel per call and process. Few workers: both processes' kernels share the GPU.
w = rng.standard_normal((5, 7)).astype(np.float32)


def tp_layer(a):
    return jax.lax.psum(jax.numpy.tanh(a @ w), "x")


run(
    "persistent_matmul_psum",
    jax_ark.persistent(tp_layer, num_workers=2),
    g,
    lambda v: summed(np.tanh(v @ w)),
)
run(
    "persistent_all_gather",
    jax_ark.persistent(lambda a: jax.lax.all_gather(a * 2, "x", axis=1, tiled=True), num_workers=2),
    g,
    lambda v: np.concatenate([v[0] * 2, v[1] * 2], axis=0)[None],
)
run(
    "persistent_ppermute",
    jax_ark.persistent(
        lambda a: jax.lax.ppermute(a - 1, "x", perm=[(0, 1), (1, 0)]), num_workers=2
    ),
    g,
    lambda v: (v[1 - process_id] - 1)[None],
)
_cuda_collectives.check()  # no failure recorded by any call
print(f"[{process_id}] WORKER_OK", flush=True)
jax.distributed.shutdown()
