"""One of two jax.distributed CPU processes running jax_ark collectives over a mesh that spans
both (test_lax_fallback.py). The CPU backend meets ranks inside one process only, so ark must run
jax.lax's collective there (with a FallbackWarning); results are checked against jax.lax.

Usage: python multiprocess_fallback_worker.py PROCESS_ID PORT. Prints WORKER_OK at the end.
"""

from __future__ import annotations

import sys
import warnings

import jax

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ark  # noqa: E402

devices = np.array(jax.devices()).reshape(2, 2)  # rows: processes
mesh = Mesh(devices, ("p", "d"))
rng = np.random.default_rng(7)
host = rng.standard_normal((4, 3)).astype(np.float32)  # same seed: same array in both processes
x = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P(("p", "d"))), lambda i: host[i])


def run(module):
    def body(v):
        return (
            module.psum(v, ("p", "d")),
            module.all_gather(v, "p", tiled=True),
            module.ppermute(v, ("p", "d"), [(i, (i + 1) % 4) for i in range(4)]),
        )

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=P(("p", "d")),
            out_specs=(P(), P("d"), P(("p", "d"))),
            check_vma=False,
        )
    )
    return [
        np.asarray(jax.experimental.multihost_utils.process_allgather(o, tiled=True)) for o in f(x)
    ]


import jax.experimental.multihost_utils  # noqa: E402

expected = run(jax.lax)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = run(jax_ark)
fallbacks = [w for w in caught if issubclass(w.category, jax_ark.FallbackWarning)]
assert fallbacks and "spanning several processes" in str(fallbacks[0].message), caught
for e, g in zip(expected, got, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
np.testing.assert_allclose(expected[0][0], host.sum(0), rtol=1e-5, atol=1e-5)
print(f"[{process_id}] WORKER_OK", flush=True)
