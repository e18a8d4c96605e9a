"""One of two CPU processes running the CUDA bootstrap's handle exchange (test_cuda_bootstrap.py).

Usage: python cuda_bootstrap_worker.py PROCESS_ID PORT. The CUDA module is replaced by a recorder
(comm_create returns a handle naming its process and rank), the jax.distributed key-value store is
real. Prints one JSON line: the mesh layout as (process, local id) and every recorded call.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)

from jax_ark import _cuda_collectives  # noqa: E402


class Recorder:
    def __init__(self):
        self.calls = []
        self.sizes = {}

    def comm_create(
        self, comm_id, device, rank, n_ranks, blocks, piece_bytes, ll_bytes, extra_bytes=0
    ):
        self.calls.append(["create", comm_id, device, rank, n_ranks])
        self.sizes[str(comm_id)] = [blocks, piece_bytes, ll_bytes, extra_bytes]
        return f"p{process_id}r{rank}".encode()

    def comm_connect(self, comm_id, device, peers):
        self.calls.append(["connect", comm_id, device, [[k, d, h.decode()] for k, d, h in peers]])


recorder = Recorder()
_cuda_collectives._module = lambda: recorder

# A mesh whose order is not the device order, with groups inside and across processes:
# (process, local id) [[(1, 1), (0, 0)], [(0, 1), (1, 0)]].
# (local_hardware_id is None for the other process's devices: its devices are named by position.)
owner = {
    (p, i): d
    for p in (0, 1)
    for i, d in enumerate(
        sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    )
}
layout = [[(1, 1), (0, 0)], [(0, 1), (1, 0)]]
mesh = jax.sharding.Mesh(np.array([[owner[p] for p in row] for row in layout]), ("x", "y"))
ids = {}
for axes in [("x",), ("y",), ("x", "y"), ("y", "x")]:
    ids[",".join(axes)] = _cuda_collectives._communicator(mesh, axes, 4 if len(axes) == 2 else 2)
again = _cuda_collectives._communicator(mesh, ("x",), 2)  # cached: no second bootstrap
# A persistent plan's call site: its own communicator over the same group, with a region.
plan_id = _cuda_collectives.plan_communicator(mesh, ("x", "y"), 4, site=77, region_bytes=12288)
plan_again = _cuda_collectives.plan_communicator(mesh, ("x", "y"), 4, site=77, region_bytes=12288)
other_site = _cuda_collectives.plan_communicator(mesh, ("x", "y"), 4, site=78, region_bytes=12288)
ids["plan"] = plan_id
print(
    json.dumps(
        {
            "layout": layout,
            "ids": ids,
            "again": again,
            "plan_again": plan_again,
            "other_site": other_site,
            "sizes": recorder.sizes,
            "calls": recorder.calls,
        }
    )
)
jax.distributed.shutdown()
