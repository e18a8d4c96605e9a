"""Random numbers drawn inside ark.persistent (threefry keys as raw key data): the same bits as
jax.jit for both counter layouts, dropout in a flax model and in a tensor-parallel layer under
shard_map, token sampling; what is not supported is refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark as ark


def _values(x) -> np.ndarray:
    """x as numpy: a typed PRNG key as its key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _draws(logits, key):
    k_mask, k_rest = jax.random.split(key)
    k_int = jax.random.fold_in(k_rest, 7)
    keep = jax.random.bernoulli(k_mask, 0.75, logits.shape)
    return (
        keep,
        jax.random.uniform(jax.random.fold_in(k_rest, 8), logits.shape),
        jax.random.randint(k_int, (5, 7), -100, 1000),
        jax.random.bits(k_mask, (3, 9)),
        jax.random.categorical(k_int, logits),
        jax.random.split(k_rest, 3),
    )


@pytest.mark.parametrize("partitionable", [True, False])
def test_draws_are_bit_identical_to_jit(rng, partitionable):
    """split, fold_in, bernoulli, uniform, randint, bits, categorical: exactly jax.jit's values
    (uniform's float32 in [0, 1) too: it is built from the bits by exact operations; a scaled
    range is not compared bitwise, XLA may fuse its multiply-add)."""
    logits = rng.standard_normal((6, 33)).astype(np.float32)
    with jax.threefry_partitionable(partitionable):
        for seed in (0, 1234567):
            key = jax.random.PRNGKey(seed)
            got = jax.jit(ark.persistent(_draws))(logits, key)
            want = jax.jit(_draws)(logits, key)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_normal_draws(rng):
    """jax.random.normal (through erf_inv: within a few float32 ulps of XLA's, which fuses
    multiply-adds) and an initializer drawing through it."""

    def fn(x, key):
        k1, k2 = jax.random.split(key)
        return x + jax.random.normal(k1, x.shape), jax.nn.initializers.normal(0.02)(k2, (33, 17))

    x = rng.standard_normal((64, 33)).astype(np.float32)
    for key in (jax.random.PRNGKey(8), jax.random.key(9)):
        got, want = jax.jit(ark.persistent(fn))(x, key), jax.jit(fn)(x, key)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=1e-6)


def test_typed_key_arguments(rng):
    """Typed keys (jax.random.key) as arguments, alone or in a pytree, and as results: passed as
    their key data, wrapped back inside and on the way out; the same draws as jax.jit."""
    x = rng.standard_normal((6, 33)).astype(np.float32)
    for key in (jax.random.key(11), {"dropout": jax.random.key(12)}):
        fn = _draws if not isinstance(key, dict) else (lambda x, k: _draws(x, k["dropout"]))
        got = jax.jit(ark.persistent(fn))(x, key)
        want = jax.jit(fn)(x, key)
        assert jax.dtypes.issubdtype(got[-1].dtype, jax.dtypes.prng_key)  # keys come back keys
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(_values(g), _values(w))


def test_a_key_and_its_data_are_planned_apart(rng):
    """One persistent function called with a typed key, then with that key's data as a plain
    uint32 array: the same FFI operand, two different functions, two plans."""

    def mix(x, k):
        if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key):
            return x + jax.random.uniform(k, x.shape)
        return x + k.astype(jnp.float32).sum()

    x = rng.standard_normal((4, 5)).astype(np.float32)
    key = jax.random.key(3)
    data = jax.random.key_data(key)
    fast = ark.persistent(mix)
    np.testing.assert_array_equal(np.asarray(fast(x, key)), np.asarray(jax.jit(mix)(x, key)))
    np.testing.assert_allclose(np.asarray(fast(x, data)), np.asarray(mix(x, data)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fast(x, key)), np.asarray(jax.jit(mix)(x, key)))


def test_flax_linen_dropout_in_training_mode(rng):
    nn = pytest.importorskip("flax.linen")

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dropout(0.2, deterministic=not train)(nn.gelu(nn.Dense(64)(x)))
            return nn.Dense(16)(h)

    model = Mlp()
    x = rng.standard_normal((8, 16)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x, False)

    def step(params, x, key):
        return model.apply(params, x, True, rngs={"dropout": key})

    for seed in (3, 4):
        key = jax.random.PRNGKey(seed)
        got = np.asarray(jax.jit(ark.persistent(step))(params, x, key))
        want = np.asarray(jax.jit(step)(params, x, key))
        # A different mask would differ by O(1); XLA divides by the keep rate as a multiply.
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert not np.allclose(want, np.asarray(jax.jit(step)(params, x, jax.random.PRNGKey(9))))


def test_dropout_in_a_tensor_parallel_mlp_under_shard_map(mesh8, rng):
    """Megatron MLP with dropout on the hidden activations: each device folds its index into the
    key, so its shard of the hidden layer gets its own mask; psum after the row-parallel matmul."""

    def layer(x, w1, w2, key):
        key = jax.random.fold_in(key, jax.lax.axis_index("x"))
        h = jax.nn.gelu(x @ w1)
        keep = jax.random.bernoulli(key, 0.9, h.shape)
        return jax.lax.psum(jnp.where(keep, h, 0.0) @ w2, "x")

    x = rng.standard_normal((16, 32)).astype(np.float32)
    w1 = (rng.standard_normal((32, 128)) / 6).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) / 11).astype(np.float32)
    specs = (P(), P(None, "x"), P("x", None), P())

    def sharded(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh8, in_specs=specs, out_specs=P()))

    key = jax.random.PRNGKey(5)
    want = np.asarray(sharded(layer)(x, w1, w2, key))
    got = np.asarray(sharded(ark.persistent(layer))(x, w1, w2, key))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_normal_draws(rng):
    """jax.random.truncated_normal (its bounds through nextafter, then erf / erf_inv): within a
    few float32 ulps of jax.jit, and inside the bounds."""

    def fn(x, key):
        return x * jax.random.truncated_normal(key, -1.5, 2.0, x.shape)

    x = rng.uniform(0.5, 2.0, (16, 300)).astype(np.float32)
    key = jax.random.key(5)
    got, want = jax.jit(ark.persistent(fn))(x, key), jax.jit(fn)(x, key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=4e-6, atol=4e-6)
    draws = np.asarray(got) / x
    assert draws.min() >= -1.5 and draws.max() <= 2.0


def test_what_is_not_supported_is_refused_by_name(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    key = jax.random.PRNGKey(0)

    with pytest.raises(ark.UnsupportedError, match="select_n .*operation on a PRNG key"):

        def pick(x, k):  # a select between typed keys
            k = jnp.where(x[0, 0] > 0, k, jax.random.fold_in(k, 1))
            return jax.random.uniform(k, (2,))

        ark.plan(pick, x, jax.random.key(0))
    with pytest.raises(ark.UnsupportedError, match="gamma sampler"):  # beta / dirichlet too
        ark.plan(lambda x, k: x + jax.random.gamma(k, 2.0, (4,)), x, key)
    with pytest.raises(ark.UnsupportedError, match="8-bit draws"):  # bfloat16 values from 8 bits
        ark.plan(lambda x, k: x + jax.random.uniform(k, (4,), jnp.bfloat16), x, key)


@pytest.mark.parametrize("seed", [np.int32(0), np.int32(-7), np.uint32(4_000_000_000)])
def test_keys_seeded_inside_the_function(rng, seed):
    """jax.random.key / PRNGKey(seed) inside the function, from a constant and from an argument
    (negative and above 2**31 too): jax's own threefry seeding, the same bits as jax.jit."""
    x = rng.standard_normal((4, 8)).astype(np.float32)

    def fn(x, s):
        noise = jax.random.uniform(jax.random.fold_in(jax.random.key(s), 3), x.shape)
        mask = jax.random.bernoulli(jax.random.PRNGKey(42), 0.5, x.shape)
        return jnp.where(mask, x + noise, 0.0), jax.random.key_data(jax.random.key(s))

    for g, w in zip(jax.jit(ark.persistent(fn))(x, seed), jax.jit(fn)(x, seed), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_flax_nnx_dropout_with_its_rng_state(rng):
    """nnx.Dropout draws from the module's Rngs (a typed key and a counter in its state): two
    steps, each returning the advanced state, equal jax.jit's outputs and states."""
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(16, 32, rngs=rngs)
            self.dropout = nnx.Dropout(0.25, rngs=rngs)

        def __call__(self, x):
            return self.dropout(jax.nn.relu(self.linear(x)))

    graphdef, state = nnx.split(Block(nnx.Rngs(params=0, dropout=1)))

    def step(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    x = rng.standard_normal((8, 16)).astype(np.float32)
    fast, slow = jax.jit(ark.persistent(step)), jax.jit(step)
    got_state = want_state = state
    outputs = []
    for _ in range(2):
        got, got_state = fast(got_state, x)
        want, want_state = slow(want_state, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
            np.testing.assert_array_equal(_values(g), _values(w))
        outputs.append(np.asarray(want))
    assert not np.array_equal(outputs[0] == 0, outputs[1] == 0)  # the counter moved the mask


def test_draws_inside_loops_and_conds(rng):
    """A decode loop sampling a token per step (fold_in of the step into the key, categorical),
    a scan over layers with dropout carrying its key (split each layer), a while_loop and a cond
    that draw: the same values as jax.jit."""
    logits = rng.standard_normal((3, 40)).astype(np.float32)
    w = (rng.standard_normal((4, 40, 40)) / 7).astype(np.float32)

    def decode(logits, key):
        def step(t, carry):
            h, tokens = carry
            token = jax.random.categorical(jax.random.fold_in(key, t), h)
            h = h + jax.nn.one_hot(token, h.shape[-1]) * 0.5
            return h, tokens.at[:, t].set(token)

        return jax.lax.fori_loop(0, 5, step, (logits, jnp.zeros((3, 5), jnp.int32)))

    def layers(x, key):
        def layer(carry, wl):
            h, k = carry
            k, sub = jax.random.split(k)
            h = jnp.tanh(h @ wl)
            return (jnp.where(jax.random.bernoulli(sub, 0.8, h.shape), h, 0.0), k), h.sum()

        return jax.lax.scan(layer, (x, key), w)

    def until(x, key):
        def body(c):
            i, k, acc = c
            k, sub = jax.random.split(k)
            return i + 1, k, acc + jax.random.uniform(sub, acc.shape)

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, key, x))[2]

    def branch(x, key):
        return jax.lax.cond(
            x.sum() > 0,
            lambda: jax.random.uniform(key, x.shape),
            lambda: -x,
        )

    for fn in (decode, layers, until, branch):
        for key in (jax.random.PRNGKey(4), jax.random.key(5)):
            got = jax.jit(ark.persistent(fn))(logits, key)
            want = jax.jit(fn)(logits, key)
            for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(_values(g), _values(w_), rtol=2e-6, atol=2e-6)


def test_draws_with_arrays_of_keys(rng):
    """vmap over split keys (an ensemble's or a batch of environments' own streams): each key
    draws as the single-key implementation does, also inside a vmapped while_loop (its batched
    predicate: an element whose loop ended keeps its carry). Bits and uniform draws are
    bit-identical, normal ones within an ulp of XLA's erf_inv."""
    key = jax.random.key(int(rng.integers(1 << 30)))
    limits = rng.uniform(0.5, 3.0, 6).astype(np.float32)

    def draws(key, limits):
        keys = jax.random.split(key, 6)
        bits = jax.vmap(lambda k: jax.random.bits(k, (3,)))(keys)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (2, 4)))(keys)
        normal = jax.vmap(lambda k: jax.random.normal(k, (5,)))(keys)
        folded = jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys))

        def walk(k, limit):  # draws until the running sum passes this element's limit
            def body(c):
                k, total, n = c
                k, sub = jax.random.split(k)
                return k, total + jax.random.uniform(sub), n + 1

            return jax.lax.while_loop(lambda c: c[1] < limit, body, (k, 0.0, 0))[1:]

        return bits, uniform, normal, folded, jax.vmap(walk)(keys, limits)

    got = jax.tree.leaves(jax.jit(ark.persistent(draws))(key, limits))
    want = jax.tree.leaves(jax.jit(draws)(key, limits))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if i == 2:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-7, atol=2e-7)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
