"""The runtime's binary-plan check run on the host before the call (the GPU path: its handler
cannot read the plan operand in device memory without a stream sync). Runs on the CPU here: the
check is the same C++ (plan_check.hpp) the CPU handler runs, called at trace time instead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close, random_args

import jax_ark as ark
from jax_ark._persistent import PlanError
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import View

OPS_AT, CODE_AT = 14, 21  # header words (docs/plan_format.md)


def _fn(x, w):
    return jnp.tanh(x @ w) * 2.0 + jnp.sum(x, axis=-1, keepdims=True)


@pytest.fixture
def setup(rng):
    args = random_args(rng, [(8, 16), (16, 12)])
    plan = ark.plan(_fn, *args, num_workers=2, tile_m=4, tile_n=8)
    return plan, args, np.asarray(jax.jit(_fn)(*args))


def test_host_check_accepts_a_valid_plan(setup):
    plan, args, want = setup
    out = run_plan(plan, args, check_on_host=True)[0][0]
    assert_close(out, want, 2e-5)


def _matmul(plan) -> int:
    return next(i for i, op in enumerate(plan.ops) if op.kind == "matmul")


@pytest.mark.parametrize("edit", ["stride_overflow", "opcode", "num_workers", "operand_too_small"])
def test_host_check_refuses_before_anything_runs(setup, edit):
    plan, args, _ = setup
    p = plan.copy()
    words = None
    if edit == "stride_overflow":
        a = p.ops[_matmul(p)].a_view
        p.views[a] = View(p.views[a].tensor, 0, (0, 1 << 60, 7 << 60))
    elif edit == "opcode":
        words = p.to_binary()
        op_at = int(words[OPS_AT]) + 40 * _matmul(p)
        words[int(words[CODE_AT]) + 4 * int(words[op_at + 10])] = 99
    elif edit == "num_workers":
        words = p.to_binary()
        words[4] = 5000
    else:
        args = [args[0][:4], args[1]]  # the plan reads 8 rows of x
    # Traced, never run: the refusal comes while the call is being built.
    with pytest.raises(PlanError, match="the runtime's check refuses this plan"):
        jax.jit(lambda *a: run_plan(p, list(a), words=words, check_on_host=True)[0]).trace(*args)


def test_host_check_knows_in_place_results(rng):
    """A result aliased to its operand (in-place cache update) passes the host check, and a plan
    whose words claim a different buffer for it is refused."""

    def write(cache, row, pos):
        return jax.lax.dynamic_update_slice(cache, jnp.tanh(row), (0, pos, 0))

    cache = rng.standard_normal((2, 16, 8)).astype(np.float32)
    row = rng.standard_normal((2, 1, 8)).astype(np.float32)
    args = [cache, row, np.int32(5)]
    p = ark.plan(write, *args, platform="cpu")
    assert p.tensors[p.outputs[0]].alias == 0
    out = jax.jit(lambda *a: run_plan(p, list(a), check_on_host=True)[0][0])(*args)
    assert_close(out, jax.jit(write)(*args), 1e-6)
    bad = p.copy()
    bad.tensors[bad.outputs[0]].alias = -1  # the words say "own buffer"; XLA is told to alias
    words = bad.to_binary()
    with pytest.raises(PlanError, match="the runtime's check refuses this plan"):
        jax.jit(lambda *a: run_plan(p, list(a), words=words, check_on_host=True)[0]).trace(*args)
