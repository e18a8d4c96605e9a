"""Model functions and comparison helpers shared by the persistent-kernel tests (CPU and GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def random_args(rng, shapes, dtype=np.float32):
    """Fresh normal arrays scaled by 1/sqrt(rows), so deep chains stay in range."""
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype) for s in shapes]


def assert_close(got, want, tol: float):
    """Relative tolerance, with an absolute floor scaled to the largest reference value."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def mlp_chain(x, ws):
    for w in ws:
        x = jax.nn.gelu(x @ w)
    return x


def rms_mlp(x, g, w1, w2):
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g
    return x + jax.nn.silu(h @ w1) @ w2


def attention(x, wq, wk, wv):
    q, k, v = x @ wq, x @ wk, x @ wv
    s = q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])).astype(x.dtype)
    return jax.nn.softmax(s, axis=-1) @ v
