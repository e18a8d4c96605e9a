"""A whole token-generation loop as ONE persistent call: a two-layer transformer decoding 24
tokens with its KV cache in a `lax.scan`, each step sampling the next token greedily, from the
top 40 (top_k: a radix select) or from the top-p nucleus (a sort of the vocabulary, its running
sum, a categorical draw). The tokens equal jax.jit's exactly: every step's choice depends on the
previous ones, so one wrong logit rank or draw would change the rest of the sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ark as ark

VOCAB, DIM, HEADS, LAYERS, STEPS = 2048, 32, 4, 2, 24


def _params(rng):
    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    layers = [
        {
            name: dense(*shape)
            for name, shape in [
                ("q", (DIM, DIM)),
                ("k", (DIM, DIM)),
                ("v", (DIM, DIM)),
                ("o", (DIM, DIM)),
                ("up", (DIM, 4 * DIM)),
                ("down", (4 * DIM, DIM)),
            ]
        }  # fmt: skip
        for _ in range(LAYERS)
    ]
    return {"embed": dense(VOCAB, DIM) * 3.0, "layers": layers}


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _logits(params, caches, token, pos):
    x = params["embed"][token]
    updated = []
    for layer, (k_cache, v_cache) in zip(params["layers"], caches, strict=True):
        h = _rms(x)
        q, k, v = h @ layer["q"], h @ layer["k"], h @ layer["v"]
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None], (pos, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None], (pos, 0))
        heads = lambda t: t.reshape(-1, HEADS, DIM // HEADS)  # noqa: E731
        scores = jnp.einsum("hd,thd->ht", heads(q)[0], heads(k_cache)) / np.sqrt(DIM // HEADS)
        scores = jnp.where(jnp.arange(STEPS)[None] <= pos, scores, -1e30)
        mixed = jnp.einsum("ht,thd->hd", jax.nn.softmax(scores, axis=-1), heads(v_cache))
        x = x + mixed.reshape(DIM) @ layer["o"]
        x = x + jax.nn.gelu(_rms(x) @ layer["up"]) @ layer["down"]
        updated.append((k_cache, v_cache))
    return _rms(x) @ params["embed"].T, updated


def _next_token(logits, key, sampler: str):
    if sampler == "greedy":
        return jnp.argmax(logits)
    if sampler == "top_k":
        values, index = jax.lax.top_k(logits, 40)
        return index[jax.random.categorical(key, values / 0.8)]
    probs = jax.nn.softmax(logits)
    ranked = jnp.sort(probs)[::-1]
    cutoff = ranked[jnp.argmax(jnp.cumsum(ranked) > 0.9)]
    return jax.random.categorical(key, jnp.where(probs >= cutoff, logits, -jnp.inf))


def _generate(sampler):
    def generate(params, key, first_token):
        caches = [(jnp.zeros((STEPS, DIM)), jnp.zeros((STEPS, DIM))) for _ in range(LAYERS)]

        def step(carry, pos):
            caches, token, key = carry
            logits, caches = _logits(params, caches, token, pos)
            key, draw = jax.random.split(key)
            token = _next_token(logits, draw, sampler).astype(jnp.int32)
            return (caches, token, key), token

        return jax.lax.scan(step, (caches, first_token, key), jnp.arange(STEPS))[1]

    return generate


@pytest.mark.parametrize("sampler", ["greedy", "top_k", "top_p"])
def test_a_sampling_decode_loop_is_one_call_with_jits_tokens(rng, sampler):
    params, key = _params(rng), jax.random.key(int(rng.integers(1 << 30)))
    generate = _generate(sampler)
    want = np.asarray(jax.jit(generate)(params, key, jnp.int32(7)))
    assert len(set(want.tolist())) > 3  # the sampler moves: a sequence, not one repeated token
    plan = ark.plan(generate, params, key, jnp.int32(7))
    assert sum(1 for loop in plan.loops if loop.parent < 0) == 1  # one scan over the steps
    got = np.asarray(jax.jit(ark.persistent(generate))(params, key, jnp.int32(7)))
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["greedy", "top_k", "top_p"])
def test_gpu_sampling_decode_loop(rng, sampler):
    """The same decode loops on the CUDA executor: one launch per call, jax.jit's tokens (the
    GPU plans were checked through the reference interpreter on the CPU: equal)."""
    params, key = _params(rng), jax.random.key(int(rng.integers(1 << 30)))
    generate = _generate(sampler)
    with jax.default_matmul_precision("highest"):  # XLA:GPU's TF32 dots could flip a token
        want = np.asarray(jax.jit(generate)(params, key, jnp.int32(7)))
    got = np.asarray(jax.jit(ark.persistent(generate))(params, key, jnp.int32(7)))
    np.testing.assert_array_equal(got, want)
