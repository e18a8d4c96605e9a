"""A mixture-of-experts layer as ONE ark.persistent call per device (plan v3 puts), 8 CPU devices.

One expert per device (expert weights sharded over the mesh axis). all_to_all dispatch -> the
local expert's MLP (matmul, gelu, matmul) -> all_to_all combine, compared with
`jax.jit(jax.shard_map(fn))` running jax.lax's all_to_all on the same fresh random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from persistent_models import assert_close, random_args

import jax_ark as ark

TOL = 2e-5
EXPERTS = 8  # one per device of mesh8
AXIS = "x"


def moe_bucketed(xb, w1, w2):
    """Fixed-capacity (GShard-style) dispatch: xb[e] holds this device's C tokens routed to expert
    e. all_to_all sends bucket e to device e, the local expert runs on the C tokens of every
    device, a second all_to_all sends the results back to their devices' buckets."""
    xe = jax.lax.all_to_all(xb, AXIS, 0, 0, tiled=True)  # [E, C, D]: bucket of device j at j
    h = jax.nn.gelu(xe.reshape(-1, xe.shape[-1]) @ w1[0])
    y = (h @ w2[0]).reshape(xe.shape)
    return jax.lax.all_to_all(y, AXIS, 0, 0, tiled=True)


def moe_top1(x, wr, w1, w2, capacity: int):
    """Top-1 routing computed in the plan: router logits, argmax expert, softmax gate, each
    token's slot in its expert's bucket (a lower-triangular matmul counts the earlier tokens with
    the same expert; tokens beyond the capacity are dropped), one-hot dispatch and combine
    einsums around the two all_to_alls."""
    tokens, d = x.shape
    logits = x @ wr  # [T, E]
    expert = jnp.argmax(logits, axis=-1)
    onehot = (expert[:, None] == jnp.arange(EXPERTS)[None, :]).astype(jnp.float32)
    gate = jnp.sum(jax.nn.softmax(logits, axis=-1) * onehot, axis=-1)
    earlier = (jnp.arange(tokens)[:, None] >= jnp.arange(tokens)[None, :]).astype(jnp.float32)
    slot_of = earlier @ onehot - 1.0  # [T, E]: exact small integers in float32
    slots = jnp.arange(capacity, dtype=jnp.float32)
    dispatch = onehot[:, :, None] * (slot_of[:, :, None] == slots[None, None, :])  # [T, E, C]
    xb = jnp.einsum("tec,td->ecd", dispatch, x)
    xe = jax.lax.all_to_all(xb, AXIS, 0, 0, tiled=True)
    h = jax.nn.gelu(xe.reshape(-1, d) @ w1[0])
    y = jax.lax.all_to_all((h @ w2[0]).reshape(xe.shape), AXIS, 0, 0, tiled=True)
    return jnp.einsum("tec,ecd->td", dispatch * gate[:, None, None], y)


def moe_top2(x, wr, w1, w2, capacity: int):
    """Top-2 routing as Mixtral / GShard write it: lax.top_k of the router logits, a softmax over
    the two chosen logits as the gates, each (token, choice) in the next free slot of its
    expert's bucket by a cumsum over the one-hot choices (every first choice before any second
    one), choices beyond the capacity dropped; dispatch and combine einsums around the two
    all_to_alls."""
    tokens, d = x.shape
    top, experts = jax.lax.top_k(x @ wr, 2)  # [T, 2]
    gates = jax.nn.softmax(top, axis=-1)
    onehot = jax.nn.one_hot(experts, EXPERTS, dtype=jnp.float32)  # [T, 2, E]
    by_choice = onehot.transpose(1, 0, 2).reshape(2 * tokens, EXPERTS)
    slot = (jnp.cumsum(by_choice, axis=0) - 1.0).reshape(2, tokens, EXPERTS).transpose(1, 0, 2)
    slots = jnp.arange(capacity, dtype=jnp.float32)
    dispatch = onehot[..., None] * (slot[..., None] == slots)  # [T, 2, E, C]
    xb = jnp.einsum("tkec,td->ecd", dispatch, x)
    xe = jax.lax.all_to_all(xb, AXIS, 0, 0, tiled=True)
    h = jax.nn.gelu(xe.reshape(-1, d) @ w1[0])
    y = jax.lax.all_to_all((h @ w2[0]).reshape(xe.shape), AXIS, 0, 0, tiled=True)
    return jnp.einsum("tkec,ecd->td", dispatch * gates[:, :, None, None], y)


BUCKETED_SPECS = {"in_specs": (P(AXIS), P(AXIS), P(AXIS)), "out_specs": P(AXIS)}
TOP1_SPECS = {"in_specs": (P(AXIS), P(), P(AXIS), P(AXIS)), "out_specs": P(AXIS)}


def _bucketed_args(rng, capacity=16, d=32, hidden=64):
    return random_args(
        rng,
        [(8 * EXPERTS, capacity, d), (EXPERTS, d, hidden), (EXPERTS, hidden, d)],
    )


def _run(mesh, fn, args, specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, **specs))(*args)


@pytest.mark.parametrize("workers", [1, 2])
def test_bucketed_moe_equals_lax(mesh8, rng, workers):
    args = _bucketed_args(rng)
    want = _run(mesh8, moe_bucketed, args, BUCKETED_SPECS)
    got = _run(mesh8, ark.persistent(moe_bucketed, num_workers=workers), args, BUCKETED_SPECS)
    assert got.shape == want.shape
    assert_close(got, want, TOL)


def test_bucketed_moe_is_one_plan_with_two_puts_and_chaos_safe(mesh8, rng, monkeypatch):
    """Both all_to_alls are put ops of the one plan; chaos mode (adversarial orders, poisoned
    workspace) gives the plain run's bits."""
    args = _bucketed_args(rng, capacity=8)
    pf = ark.persistent(moe_bucketed, num_workers=2)
    plans = []

    def body(*local):
        plans.append(pf.plan(*local))
        return pf(*local)

    base = np.asarray(_run(mesh8, body, args, BUCKETED_SPECS))
    assert [op.kind for op in plans[0].ops].count("put") == 2
    monkeypatch.setenv("JAX_ARK_PERSISTENT_CHAOS", "3")
    got = _run(mesh8, ark.persistent(moe_bucketed, num_workers=2), args, BUCKETED_SPECS)
    np.testing.assert_array_equal(np.asarray(got), base)


def test_all_to_all_result_returned_as_is(mesh8, rng):
    """An all_to_all whose result is the inbox unchanged: the inbox stays in the symmetric
    workspace (peers write into it), the output is a copy (was: the inbox moved into the result
    buffer, which the executor's plan check refused)."""
    fn = lambda x: jax.lax.all_to_all(x, AXIS, 0, 0, tiled=True)  # noqa: E731
    x = rng.standard_normal((8 * 8, 4, 16)).astype(np.float32)
    specs = {"in_specs": (P(AXIS),), "out_specs": P(AXIS)}
    want = _run(mesh8, fn, [x], specs)
    np.testing.assert_array_equal(np.asarray(_run(mesh8, ark.persistent(fn), [x], specs)), want)


def test_top1_routed_moe_equals_lax(mesh8, rng):
    tokens, d, hidden, capacity = 32, 24, 48, 8
    args = random_args(
        rng,
        [(8 * tokens, d), (d, EXPERTS), (EXPERTS, d, hidden), (EXPERTS, hidden, d)],
    )

    def fn(x, wr, w1, w2):
        return moe_top1(x, wr, w1, w2, capacity)

    want = _run(mesh8, fn, args, TOP1_SPECS)
    got = _run(mesh8, ark.persistent(fn, num_workers=2), args, TOP1_SPECS)
    assert_close(got, want, TOL)
    # some tokens were dropped (capacity 8 < the busiest expert's tokens) and most were not
    dropped = np.all(np.asarray(want) == 0.0, axis=-1)
    assert 0 < dropped.sum() < dropped.size // 2


def test_top2_routed_moe_equals_lax(mesh8, rng):
    """The router's lax.top_k runs inside the plan (k rounds of reductions over the experts),
    with tied logits: some tokens' rows are copies, and two experts' router columns are equal,
    so their logits tie and jax.jit's top_k picks the lower expert."""
    tokens, d, hidden, capacity = 32, 24, 48, 8
    x, wr, w1, w2 = random_args(
        rng,
        [(8 * tokens, d), (d, EXPERTS), (EXPERTS, d, hidden), (EXPERTS, hidden, d)],
    )
    wr = np.asarray(wr).copy()
    wr[:, 5] = wr[:, 2]
    x = np.asarray(x).copy()
    x[1::7] = x[0]
    args = [x, wr, w1, w2]

    def fn(x, wr, w1, w2):
        return moe_top2(x, wr, w1, w2, capacity)

    want = _run(mesh8, fn, args, TOP1_SPECS)
    got = _run(mesh8, ark.persistent(fn, num_workers=2), args, TOP1_SPECS)
    assert_close(got, want, TOL)
    top = np.asarray(jax.lax.top_k(jnp.asarray(x) @ wr, 2)[1])
    assert ((top == 2) & (np.roll(top, 1, axis=1) == 5)).any()  # a tie, resolved to expert 2
    # capacity binds: on some device an expert got more than `capacity` choices
    per_device = top.reshape(8, tokens * 2)
    assert max(np.bincount(row, minlength=EXPERTS).max() for row in per_device) > capacity
