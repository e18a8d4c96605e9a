"""`jax-ark demo` (or `python -m jax_ark demo`): ark collectives and a persistent kernel, side by
side with jax.lax / jax.jit, on the GPUs when present and on 8 virtual CPU devices otherwise."""

from __future__ import annotations

import argparse
import sys

from jax_ark._env import configure_host_devices


def _pick_devices(platform: str):
    import jax

    import jax_ark

    if platform == "auto":
        platform = "gpu" if jax_ark.has_cuda() and jax.devices()[0].platform == "gpu" else "cpu"
    devices = jax.devices(platform)
    return devices if platform == "gpu" else devices[:8]


def demo_collectives(devices) -> None:
    from functools import partial

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_ark as ark
    from jax_ark.bench._timing import median_seconds

    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    ring = [(i, (i + 1) % n) for i in range(n)]
    cases = [
        ("psum", partial(ark.psum, axis_name="x"), partial(jax.lax.psum, axis_name="x"), P()),
        (
            "all_gather",
            partial(ark.all_gather, axis_name="x", tiled=True),
            partial(jax.lax.all_gather, axis_name="x", tiled=True),
            P("x"),
        ),
        (
            "psum_scatter",
            partial(ark.psum_scatter, axis_name="x", tiled=True),
            partial(jax.lax.psum_scatter, axis_name="x", tiled=True),
            P("x"),
        ),
        (
            "ppermute",
            partial(ark.ppermute, axis_name="x", perm=ring),
            partial(jax.lax.ppermute, axis_name="x", perm=ring),
            P("x"),
        ),
    ]
    x = jax.device_put(
        np.random.default_rng(0).standard_normal(n * 4096).astype(np.float32),
        NamedSharding(mesh, P("x")),
    )
    print(
        f"== collectives inside jax.shard_map over {n} {devices[0].platform} devices "
        f"(4096 float32 per device)"
    )
    print(f"{'op':>14}  {'max |ark - lax|':>15}  {'ark ms':>8}  {'lax ms':>8}")
    for name, ark_body, lax_body, out_spec in cases:
        ark_fn, lax_fn = (
            jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=out_spec))
            for body in (ark_body, lax_body)
        )
        err = float(np.max(np.abs(np.asarray(ark_fn(x)) - np.asarray(lax_fn(x)))))
        print(
            f"{name:>14}  {err:15.2e}  {1e3 * median_seconds(ark_fn, x):8.3f}"
            f"  {1e3 * median_seconds(lax_fn, x):8.3f}"
        )


def demo_persistent(device) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_ark as ark
    from jax_ark.bench._timing import median_seconds

    def block(x, w1, w2):
        return x + jax.nn.gelu(x @ w1) @ w2

    rng = np.random.default_rng(1)
    d, hidden = 256, 512
    x, w1, w2 = (
        jax.device_put(jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32), device)
        for shape, scale in (((8, d), 1.0), ((d, hidden), d**-0.5), ((hidden, d), hidden**-0.5))
    )
    print("\n== ark.persistent: x + gelu(x @ w1) @ w2 as ONE kernel launch")
    print(ark.plan(block, x, w1, w2).summary())
    fast, reference = jax.jit(ark.persistent(block)), jax.jit(block)
    err = float(np.max(np.abs(np.asarray(fast(x, w1, w2)) - np.asarray(reference(x, w1, w2)))))
    print(
        f"max |ark - jax.jit| = {err:.2e};  ark {1e3 * median_seconds(fast, x, w1, w2):.3f} ms, "
        f"jax.jit {1e3 * median_seconds(reference, x, w1, w2):.3f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jax-ark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the collectives and persistent-kernel demo")
    demo.add_argument("--platform", choices=["auto", "cpu", "gpu"], default="auto")
    args = parser.parse_args(argv)
    configure_host_devices()  # before any jax backend starts
    devices = _pick_devices(args.platform)
    demo_collectives(devices)
    demo_persistent(devices[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
