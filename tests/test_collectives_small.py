"""The CPU backend's two paths, side by side: inputs up to 16 KiB per rank are staged and met once
(each rank computes its own output), larger ones are met twice around shared work units. Sizes on
both sides of the threshold, in one program and in a loop, must equal jax.lax exactly (int32) or
to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark as ark

# int32 elements per device: 16 KiB is the last size of the staged path, 16 KiB + 4 B the first of
# the shared one.
SIZES = (1, 1000, 4096, 4097, 20000)


def _ops(n: int):
    ring = [(i, (i + 1) % n) for i in range(n)]
    return {
        "psum": (lambda m, v: m.psum(v, "x"), P()),
        "pmax": (lambda m, v: m.pmax(v, "x"), P()),
        "all_gather": (lambda m, v: m.all_gather(v, "x", tiled=True), P("x")),
        "psum_scatter": (lambda m, v: m.psum_scatter(v, "x", tiled=True), P("x")),
        "ppermute": (lambda m, v: m.ppermute(v, "x", ring), P("x")),
        "all_to_all": (
            lambda m, v: m.all_to_all(v, "x", 0, 0, tiled=True),
            P("x"),
        ),
    }


@pytest.mark.parametrize("op", sorted(_ops(8)))
def test_both_paths_in_one_program_match_lax(mesh8, op):
    body, out_spec = _ops(8)[op]
    rng = np.random.default_rng(len(op))
    # psum_scatter / all_to_all split the per-device block in 8: sizes are multiples of 8.
    xs = [jnp.asarray(rng.integers(-1000, 1000, 8 * 8 * ((s + 7) // 8)), jnp.int32) for s in SIZES]

    def make(mod):
        def run(*vs):
            outs = [body(mod, v) for v in vs]

            # A loop re-entering each site: the staged path alternates its two buffers.
            def step(i, acc):
                return [a + body(mod, v % 97 + i) for a, v in zip(acc, vs, strict=True)]

            return jax.lax.fori_loop(0, 7, step, outs)

        spec = [out_spec] * len(xs)
        return jax.jit(jax.shard_map(run, mesh=mesh8, in_specs=(P("x"),) * len(xs), out_specs=spec))

    for got, want in zip(make(ark)(*xs), make(jax.lax)(*xs), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_small_float_reductions_fold_in_rank_order(mesh8):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal(8 * 512), jnp.float32)
    f = jax.jit(
        jax.shard_map(lambda v: ark.psum(v, "x"), mesh=mesh8, in_specs=P("x"), out_specs=P())
    )
    want = np.zeros(512, np.float32)
    for r in range(8):  # the documented order: ranks 0, 1, ..., 7, float32 throughout
        want = want + np.asarray(x[r * 512 : (r + 1) * 512])
    np.testing.assert_array_equal(np.asarray(f(x)), want)
