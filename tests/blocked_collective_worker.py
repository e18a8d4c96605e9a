"""Blocks in a CPU collective that one rank never reaches, then waits to be interrupted.

Run by test_collectives_cancel.py: prints BLOCKED once the collective is waiting; the test then
sends SIGINT and times how long the process takes to exit (the collective's timeout is 60 s).
"""

from __future__ import annotations

import os
import sys
import threading
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ark  # noqa: E402

mesh = Mesh(np.array(jax.devices()[:4]), ("x",))


def body(v):
    # Rank 0 skips the collective, so ranks 1..3 wait for it until their timeout.
    rank = jax.lax.axis_index("x")
    return jax.lax.cond(rank == 0, lambda u: u, lambda u: jax_ark.psum(u, "x"), v)


f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
x = jnp.arange(8.0)
threading.Timer(1.0, lambda: print("BLOCKED", flush=True)).start()
start = time.monotonic()
try:
    f(x).block_until_ready()
except KeyboardInterrupt:
    print(f"INTERRUPTED after {time.monotonic() - start:.1f} s", flush=True)
    sys.exit(130)
print("FINISHED (the collective was expected to block)", flush=True)
