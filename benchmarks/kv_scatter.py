"""The KV-cache write `cache.at[:, pos].set(kv)` inside ark.persistent against jax.jit, one device.

Four functions: a decode step (write one position, then read the cache back with an einsum) at
two cache sizes, the same step with each sequence at its own position (`.at[arange(B), pos]`),
and a fori_loop of 16 tokens (tanh(x @ w), the write, softmax attention over the cache); then
two matrix-vector products alone (one output column: the attention scores of a batch of
single-token queries, and a GEMV); last the 8 MiB step with the cache donated, as a decode loop
calls it. Prints microseconds per call (median of --calls calls, every call waited for) and the
ark/jax.jit ratio measured in the same process. Used for
the table in docs/benchmarks.md ("KV-cache writes with `.at[].set` and matrix-vector products").

    python benchmarks/kv_scatter.py --calls 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_ark as ark
from jax_ark.bench._timing import median_seconds


def step(cache, k, pos):
    cache = cache.at[:, pos].set(k)
    return cache, jnp.einsum("btd,bd->bt", cache, k)


def ragged_step(cache, k, pos):
    """Each sequence of the batch writes at its own position (pos[b])."""
    cache = cache.at[jnp.arange(cache.shape[0]), pos].set(k)
    return cache, jnp.einsum("btd,bd->bt", cache, k)


def decode(cache, x, w):
    def body(pos, carry):
        cache, x = carry
        k = jnp.tanh(x @ w)
        cache = cache.at[:, pos].set(k)
        s = jax.nn.softmax(jnp.einsum("btd,bd->bt", cache, k) / 8, -1)
        return cache, jnp.einsum("bt,btd->bd", s, cache)

    return jax.lax.fori_loop(0, 16, body, (cache, x))


def scores(cache, q):
    return jnp.einsum("btd,bd->bt", cache, q)


def gemv(m, v):
    return m @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    calls = parser.parse_args().calls
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale)

    cases = []
    for b, t, d in [(4, 512, 64), (8, 2048, 128)]:
        cases.append((f"step {b}x{t}x{d}", step, (normal(b, t, d), normal(b, d), jnp.int32(7))))
    b, t, d = 8, 2048, 128
    cases.append(
        (
            f"ragged step {b}x{t}x{d}",
            ragged_step,
            (normal(b, t, d), normal(b, d), jnp.arange(b, dtype=jnp.int32) * 100),
        )
    )
    cases.append(
        (
            "decode loop 16 tokens 4x256x64",
            decode,
            (normal(4, 256, 64), normal(4, 64), normal(64, 64, scale=0.125)),
        )
    )
    cases.append(("matvec btd,bd->bt 8x2048x128", scores, (normal(8, 2048, 128), normal(8, 128))))
    cases.append(("matvec 4096x256 @ 256", gemv, (normal(4096, 256), normal(256))))
    for name, fn, args in cases:
        ours, base = jax.jit(ark.persistent(fn)), jax.jit(fn)
        err = max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(ours(*args)), jax.tree.leaves(base(*args)), strict=True)
        )
        if not err < 1e-4:
            raise SystemExit(f"{name}: ark differs from jax.jit by {err}")
        iters = max(3, calls // 4) if name.startswith("decode") else calls
        ark_s = median_seconds(ours, *args, iters=iters)
        jit_s = median_seconds(base, *args, iters=iters)
        times = f"ark {ark_s * 1e6:.0f} us, jax.jit {jit_s * 1e6:.0f} us"
        print(f"{name}: {times}, ark/jit {ark_s / jit_s:.2f}")
    b, t, d = 8, 2048, 128
    k = normal(b, d)
    ours = donated_step_us(
        jax.jit(ark.persistent(step), donate_argnums=(0,)), normal(b, t, d), k, calls
    )
    base = donated_step_us(jax.jit(step, donate_argnums=(0,)), normal(b, t, d), k, calls)
    times = f"ark {ours:.0f} us, jax.jit {base:.0f} us"
    print(f"step {b}x{t}x{d}, cache donated: {times}, ark/jit {ours / base:.2f}")


def donated_step_us(fn, cache, k, calls: int) -> float:
    """Median time of `cache, _ = fn(cache, k, pos)` with the cache donated (the way a decode
    loop calls a step: no copy of the cache), every call waited for."""
    times = []
    for i in range(calls + 20):
        start = time.perf_counter()
        cache, scores = fn(cache, k, jnp.int32(i % cache.shape[1]))
        jax.block_until_ready(scores)
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1e6


if __name__ == "__main__":
    main()
