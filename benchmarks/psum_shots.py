"""One-shot vs two-shot psum inside ark.persistent, against jax.lax, on 8 CPU devices.

A fori_loop of 16 psums of a (rows x cols) float32 value per rank, as ONE persistent call per
device, with the planner's two-shot threshold forced each way; the same loop under jax.jit with
jax.lax.psum is the baseline. Prints ms per psum (median of --calls calls). Used for the table in
docs/benchmarks.md ("Two-shot all-reduce in persistent plans").

    python benchmarks/psum_shots.py --shapes 8x32,8x256,64x256,256x256
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark._persistent import _comm

PSUMS = 16


def _loop(y):
    def body(i, h):  # the sum re-marked varying, as the carry it replaces
        return jax.lax.pcast(jax.lax.psum(h, "x") * 0.125, "x", to="varying")

    return jax.lax.fori_loop(0, PSUMS, body, y)


def _ms_per_psum(fn, y, calls: int) -> float:
    jax.block_until_ready(fn(y))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(y))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3 / PSUMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x32,8x128,8x256,32x256,64x256,256x256")
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("x",))

    def sharded(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))

    rng = np.random.default_rng(0)
    print("per rank         lax ms  one-shot ms  two-shot ms")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        y = rng.standard_normal((8 * rows, cols)).astype(np.float32)
        y = jax.device_put(y, NamedSharding(mesh, P("x")))  # on the devices: time the psums only
        base = sharded(_loop)
        want = np.asarray(base(y))
        ms = {}
        for form, threshold in (("one", 1 << 62), ("two", 0)):
            saved = _comm._TWO_SHOT_BYTES["cpu"]
            _comm._TWO_SHOT_BYTES["cpu"] = threshold
            try:
                fast = sharded(ark.persistent(_loop))
                np.testing.assert_allclose(np.asarray(fast(y)), want, rtol=1e-4, atol=1e-4)
                ms[form] = _ms_per_psum(fast, y, args.calls)
            finally:
                _comm._TWO_SHOT_BYTES["cpu"] = saved
        lax_ms = _ms_per_psum(base, y, args.calls)
        kib = rows * cols * 4 // 1024
        print(f"{kib:4d} KiB {shape:>9}  {lax_ms:6.3f}  {ms['one']:11.3f}  {ms['two']:11.3f}")


if __name__ == "__main__":
    main()
