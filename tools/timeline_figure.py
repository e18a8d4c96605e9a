"""Draws docs/timeline.png: the Gantt chart of a profiled ark.persistent run on the CPU executor.

Usage: PYTHONPATH=$PWD python tools/timeline_figure.py [out.png] (from a checkout with a dev build).
The block is an RMSNorm + MLP at batch 8, d=256, planned for the default CPU workers with
32-column tiles so the tasks are many enough to see the schedule. Of several runs it keeps the
one with the shortest span: on a shared machine a thread the OS parks for milliseconds would
otherwise fill the picture.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("PJRT_NPROC", "16")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

import jax_ark as ark  # noqa: E402

matplotlib.use("Agg")


def block(x, g, w1, w2):
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g
    return x + jax.nn.gelu(h @ w1) @ w2


def main(out: str = "docs/timeline.png", runs: int = 7) -> None:
    keys = jax.random.split(jax.random.key(0), 4)
    d, hidden = 256, 512
    args = (
        jax.random.normal(keys[0], (8, d)),
        1 + 0.1 * jax.random.normal(keys[1], (d,)),
        jax.random.normal(keys[2], (d, hidden)) / np.sqrt(d),
        jax.random.normal(keys[3], (hidden, d)) / np.sqrt(hidden),
    )
    profiled = ark.persistent(block, profile=True, tile_n=32)
    fn = jax.jit(profiled)
    best = None
    for _ in range(runs):
        y, profile = fn(*args)
        tl = ark.timeline(profile, profiled.plan(*args))
        span = max(r["end"] for r in tl.records)
        if best is None or span < best[0]:
            best = (span, tl)
    np.testing.assert_allclose(y, jax.jit(block)(*args), rtol=1e-4, atol=1e-4)
    fig = best[1].gantt()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}: {len(best[1].records)} tasks, span {best[0] / 1e3:.0f} us")


if __name__ == "__main__":
    main(*sys.argv[1:2])
