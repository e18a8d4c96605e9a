"""Scatters of many points (scatter folds) inside ark.persistent against jax.jit, one device.

Cases: an embedding's gradient (the backward of `emb[tokens]`: a scatter-add of every token's row
into a zero table, then an SGD update of the table), `segment_sum` of 16384 values into 64
segments, a 64-bin `histogram` of 65536 values, and the inverse of a permutation of 16384
(`.at[perm].set(arange)`). Prints milliseconds per call (median over --repeats rounds, each round
timing both back to back) and the ark/jax.jit ratio measured in the same run. Used for the table
in docs/benchmarks.md ("Scatter folds").

    python benchmarks/scatter_fold.py --repeats 5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ark.bench._timing import comparison_args, print_persistent_vs_jit


def embedding_sgd(table, tokens, w):
    """One SGD step of a bag-of-embeddings regressor: the table's gradient is a scatter-add."""

    def loss(table):
        return jnp.mean((jnp.tanh(table[tokens]).sum(axis=1) @ w) ** 2)

    return table - 0.1 * jax.grad(loss)(table)


def segment_sum(x, segments):
    return jax.ops.segment_sum(x, segments, 64)


def histogram(x):
    return jnp.histogram(x, bins=64, range=(-3.0, 3.0))[0]


def inverse_permutation(perm):
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def main() -> None:
    args = comparison_args(__doc__)
    rng = np.random.default_rng(0)
    vocab, d, batch, length = 8192, 128, 8, 256
    cases = [
        (
            f"embedding SGD {vocab}x{d}, {batch}x{length} tokens",
            embedding_sgd,
            (
                rng.standard_normal((vocab, d)).astype(np.float32),
                rng.integers(0, vocab, (batch, length)).astype(np.int32),
                rng.standard_normal(d).astype(np.float32),
            ),
        ),
        (
            "segment_sum 16384 -> 64",
            segment_sum,
            (
                rng.standard_normal(16384).astype(np.float32),
                rng.integers(0, 64, 16384).astype(np.int32),
            ),
        ),
        ("histogram 65536 -> 64 bins", histogram, (rng.standard_normal(65536).astype(np.float32),)),
        ("inverse permutation 16384", inverse_permutation, (np.int32(rng.permutation(16384)),)),
    ]
    print_persistent_vs_jit(cases, repeats=args.repeats, budget_s=args.budget, width=44)


if __name__ == "__main__":
    main()
