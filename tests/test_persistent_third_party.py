"""Code we did not write inside ark.persistent: optax optimizers' update steps and losses; a
Megatron tensor-parallel MLP written with flax.linen layers trained by optax.adamw, its forward,
backward, psum and optimizer update planned as ONE persistent call per device; a flax.nnx
transformer block and its gradient; flax.nnx's MultiHeadAttention decoding with its own KV
cache; equinox's recurrent cells in a scan. Each against jax.jit (with jax.lax's collectives
inside jax.shard_map) on fresh random inputs and optimizer states.

The first run of these found a silent error: lax.pow with an int32 exponent (optax's bias
correction `b1 ** count`) read the exponent's bits as a float, and adam's parameters came out
inf / NaN; is_finite (jax.nn.logsumexp, optax's integer-label cross entropy) and split (the
block's fused gate / up projection) were refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close

import jax_ark as ark

optax = pytest.importorskip("optax")
TOL = 2e-5


def _assert_matches(got, want, tol: float = TOL) -> None:
    """Every leaf of got finite and equal to want's: integers exactly, floats within tol."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert np.isfinite(g).all()
        if np.issubdtype(w.dtype, np.integer):
            np.testing.assert_array_equal(g, w)
        else:
            assert_close(g, w, tol)


def _random_state(rng, state):
    """The optimizer state with fresh random moments (nu positive) and a step count of 7, so the
    bias corrections are not those of step 1."""

    def fill(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.integer):
            return np.full(x.shape, 7, x.dtype)
        return np.abs(rng.standard_normal(x.shape)).astype(x.dtype) * 0.1

    return jax.tree.map(fill, state)


@pytest.mark.parametrize(
    "name", ["sgd_momentum", "adam", "adamw", "lion", "adabelief", "rmsprop", "lamb", "clipped"]
)
def test_optax_update_step_matches_jit(rng, name):
    tx = {
        "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
        "adam": lambda: optax.adam(1e-2),
        "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
        "lion": lambda: optax.lion(1e-3),
        "adabelief": lambda: optax.adabelief(1e-2),
        "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.9),
        "lamb": lambda: optax.lamb(1e-2),
        "clipped": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
    }[name]()
    params = {
        "w": rng.standard_normal((16, 24)).astype(np.float32),
        "b": rng.standard_normal((24,)).astype(np.float32),
    }
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    state = _random_state(rng, tx.init(params))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    want = jax.jit(step)(params, state, grads)
    got = jax.jit(ark.persistent(step))(params, state, grads)
    _assert_matches(got, want)


@pytest.mark.parametrize("exponent_dtype", [np.int32, np.uint32])
def test_pow_with_an_integer_exponent(rng, exponent_dtype):
    """lax.pow(float, int): the exponent is converted to the base's dtype, as XLA does."""
    x = np.abs(rng.standard_normal((6, 5))).astype(np.float32) + 0.5
    n = rng.integers(0 if exponent_dtype == np.uint32 else -4, 5, (6, 5)).astype(exponent_dtype)
    fn = jax.lax.pow
    assert_close(jax.jit(ark.persistent(fn))(x, n), jax.jit(fn)(x, n), TOL)


def test_flax_tensor_parallel_mlp_adamw_step_is_one_persistent_call(mesh8, rng):
    nn = pytest.importorskip("flax.linen")
    d, hidden, batch = 16, 64, 8

    class TensorParallelMLP(nn.Module):
        """Column-parallel up projection (hidden / 8 columns per device), row-parallel down
        projection, psum, then a replicated bias."""

        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(hidden // 8, name="up")(x))
            y = nn.Dense(d, use_bias=False, name="down")(h)
            return jax.lax.psum(y, "x") + self.param("bias", nn.initializers.zeros, (d,))

    model, tx = TensorParallelMLP(), optax.adamw(1e-2)

    def train_step(params, opt_state, x, target):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def normal(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {
        "up": {"kernel": normal(d, hidden), "bias": normal(hidden, scale=0.1)},
        "down": {"kernel": normal(hidden, d)},
        "bias": normal(d, scale=0.1),
    }
    param_specs = {
        "up": {"kernel": P(None, "x"), "bias": P("x")},
        "down": {"kernel": P("x", None)},
        "bias": P(),
    }
    opt_state = _random_state(rng, tx.init(params))
    adam_state, *rest = opt_state
    state_specs = (
        type(adam_state)(count=P(), mu=param_specs, nu=param_specs),
        *[jax.tree.map(lambda _: P(), r) for r in rest],
    )
    specs = {
        "mesh": mesh8,
        "in_specs": (param_specs, state_specs, P(), P()),
        "out_specs": (param_specs, state_specs, P()),
    }
    args = (params, opt_state, normal(batch, d, scale=1.0), normal(batch, d, scale=1.0))
    want = jax.jit(jax.shard_map(train_step, **specs))(*args)
    got = jax.jit(jax.shard_map(ark.persistent(train_step), **specs))(*args)
    _assert_matches(got, want)


def test_optax_losses_and_logsumexp_match_jit(rng):
    logits = rng.standard_normal((8, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, (8,)).astype(np.int32)

    def losses(logits, labels):
        return (
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
            jax.nn.logsumexp(logits, axis=-1),
            optax.sigmoid_binary_cross_entropy(logits, (logits > 0).astype(jnp.float32)).mean(),
        )

    want = jax.jit(losses)(logits, labels)
    got = jax.jit(ark.persistent(losses))(logits, labels)
    _assert_matches(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_is_finite_of_specials_is_exact(rng, dtype):
    x = rng.standard_normal(64).astype(dtype)
    x[::5], x[1::7], x[2::9] = np.inf, -np.inf, np.nan
    got = jax.jit(ark.persistent(jnp.isfinite))(x)
    np.testing.assert_array_equal(np.asarray(got), np.isfinite(x))


def test_flax_nnx_transformer_block_and_its_gradient(rng):
    """Pre-norm block of flax.nnx layers: LayerNorm, causal MultiHeadAttention, and a gated MLP
    whose gate / up projection is one Linear split in halves; forward and jax.grad of the
    parameters, each as one persistent call."""
    nnx = pytest.importorskip("flax.nnx")
    d = 32

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.gate_up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(2 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(x[..., 0]))
            gate, up = jnp.split(self.gate_up(self.ln2(x)), 2, axis=-1)
            return x + self.down(nnx.silu(gate) * up)

    graphdef, state = nnx.split(Block(nnx.Rngs(int(rng.integers(1 << 30)))))
    x = rng.standard_normal((2, 8, d)).astype(np.float32)

    def forward(x, state):
        return nnx.merge(graphdef, state)(x)

    def grads(x, state):
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x) ** 2))(state)

    for fn, tol in ((forward, TOL), (grads, 1e-4)):
        got, want = jax.jit(ark.persistent(fn))(x, state), jax.jit(fn)(x, state)
        _assert_matches(got, want, tol)


def test_flax_nnx_attention_decode_with_its_kv_cache(rng):
    """flax.nnx.MultiHeadAttention(decode=True) writes each step's key / value into its own cache
    variables: ark runs the step as one persistent call, updating the cache buffers in place
    (window stores), and five steps in a row equal jax.jit's outputs and caches."""
    nnx = pytest.importorskip("flax.nnx")
    b, t, d = 2, 16, 32
    mha = nnx.MultiHeadAttention(
        num_heads=4,
        in_features=d,
        qkv_features=d,
        decode=True,
        rngs=nnx.Rngs(int(rng.integers(99))),
    )
    mha.init_cache((b, t, d))
    graphdef, state = nnx.split(mha)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, nnx.state(m)

    x0 = rng.standard_normal((b, 1, d)).astype(np.float32)
    plan = ark.plan(step, state, x0, platform="cpu")
    assert sum(op.store_view >= 0 for op in plan.ops) == 2  # the key and value cache writes
    ours, base = jax.jit(ark.persistent(step, num_workers=2)), jax.jit(step)
    s_ours = s_base = state
    for _ in range(5):
        x = rng.standard_normal((b, 1, d)).astype(np.float32)
        y_ours, s_ours = ours(s_ours, x)
        y_base, s_base = base(s_base, x)
        _assert_matches(y_ours, y_base)
        _assert_matches(s_ours, s_base)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_equinox_recurrent_cells_scanned(rng, cell):
    eqx = pytest.importorskip("equinox")
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    if cell == "gru":
        module = eqx.nn.GRUCell(32, 16, key=key)
        init = jnp.zeros(16)
    else:
        module = eqx.nn.LSTMCell(32, 16, key=key)
        init = (jnp.zeros(16), jnp.zeros(16))
    params, static = eqx.partition(module, eqx.is_array)

    def run(xs, params):
        step = eqx.combine(params, static)
        return jax.lax.scan(lambda h, xi: (step(xi, h), None), init, xs)[0]

    xs = rng.standard_normal((12, 32)).astype(np.float32)
    got, want = jax.jit(ark.persistent(run))(xs, params), jax.jit(run)(xs, params)
    _assert_matches(got, want)
