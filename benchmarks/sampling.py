"""Long running sums, sorts, top-k and integer matmuls inside ark.persistent against jax.jit,
one device: what a decode step's sampler and a W8A8 quantized layer plan into.

Cases: cumsum over 32,768 (a blocked scan), argsort of 32,000 logits (a radix sort), top_k(40) of
32,000 logits (a radix select), a top-k and a top-p (nucleus) sampler drawing one token from
32,000 logits, and an int8 x int8 -> int32 linear layer with its rescale (exact float32 chunks).
Prints milliseconds per call (median over --repeats rounds, each round timing both back to back)
and the ark/jax.jit ratio measured in the same run. Used for the table in docs/benchmarks.md
("Sampling and integer matmuls").

    python benchmarks/sampling.py --repeats 5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark.bench._timing import comparison_args, print_persistent_vs_jit


def top_k_sample(key, logits):
    values, index = jax.lax.top_k(logits, 40)
    return jnp.take_along_axis(index, jax.random.categorical(key, values)[:, None], axis=1)


def top_p_sample(key, logits):
    probs = jax.nn.softmax(logits, axis=-1)
    ranked = jnp.sort(probs, axis=-1)[:, ::-1]
    cutoff_at = jnp.argmax(jnp.cumsum(ranked, axis=-1) > 0.9, axis=-1)
    cutoff = jnp.take_along_axis(ranked, cutoff_at[:, None], axis=-1)
    return jax.random.categorical(key, jnp.where(probs >= cutoff, logits, -jnp.inf))


def w8a8_linear(x, w, w_scale):
    x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    xq = jnp.clip(jnp.round(x * (1.0 / x_scale)), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot(xq, w, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * w_scale


def main() -> None:
    args = comparison_args(__doc__)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1, 32000)) * 2).astype(np.float32)
    key = jax.random.key(0)
    d = 1024
    cases = [
        ("cumsum 32768", lambda x: jnp.cumsum(x), (rng.standard_normal(32768).astype(np.float32),)),
        ("argsort 32000 logits", lambda x: jnp.argsort(x, axis=-1), (logits,)),
        ("top_k(40) of 32000 logits", lambda x: jax.lax.top_k(x, 40), (logits,)),
        ("top-k sampler (k=40), 32000 logits", top_k_sample, (key, logits)),
        ("top-p sampler (p=0.9), 32000 logits", top_p_sample, (key, logits)),
        (
            f"W8A8 linear 16x{d} @ {d}x{d}",
            w8a8_linear,
            (
                rng.standard_normal((16, d)).astype(np.float32),
                rng.integers(-127, 128, (d, d)).astype(np.int8),
                rng.uniform(0.001, 0.02, d).astype(np.float32),
            ),
        ),
    ]
    print_persistent_vs_jit(cases, repeats=args.repeats, budget_s=args.budget, width=40)


if __name__ == "__main__":
    main()
