"""jax.nn.gelu's tanh form, fused by the CPU executor: its eight float32 instructions run as one
pass per segment (persistent_fusion.hpp). The fused pass must give the interpreter's bits: each
plan is run as planned (fused) and edited so that the executor cannot fuse it (operands of one
multiplication swapped, or an intermediate register read later), on random values and special
ones, and the results compared bit for bit; against jax.jit within float32 tolerance."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from persistent_models import assert_close

import jax_ark as ark
from jax_ark._ffi import cpu_module
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import Instr

SPECIAL = np.array(
    [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30, 1e-45, 0.625, -0.625, 10.0, -10.0, 3e38],
    np.float32,
)


def _inputs(rng, rows: int, cols: int) -> np.ndarray:
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    x.flat[: SPECIAL.size] = SPECIAL
    return x


def _fused(plan) -> list[int]:
    return list(cpu_module()._gelu_tanh_starts(plan.to_binary()))


def _gelu_op(plan) -> tuple[int, int]:
    """(op index, program index of INTEGER_POW) of the plan's one gelu."""
    for i, op in enumerate(plan.ops):
        for k, ins in enumerate(op.epilogue):
            if ins.op == "integer_pow" and ins.b == 3:
                return i, k
    raise AssertionError("no gelu in the plan")


def _swapped(plan):
    """The plan with c1 * x^3 computed as x^3 * c1 (the same bits): not the fused pattern."""
    p = plan.copy()
    i, k = _gelu_op(p)
    mul = p.ops[i].epilogue[k + 1]
    p.ops[i].epilogue[k + 1] = dataclasses.replace(mul, a=mul.b, b=mul.a)
    return p.validate()


def _tanh_read_later(plan):
    """The plan with the gelu's tanh register also read after it: result - (tanh * 0)^2, the same
    value for every input (a square of a signed zero is +0, and x - +0 keeps x's sign)."""
    p = plan.copy()
    i, k = _gelu_op(p)
    prog = p.ops[i].epilogue
    assert len(prog) == k + 8, "the gelu is the program's last value"
    n = len(prog)
    prog += [
        Instr("const", "float32", 0.0),
        Instr("mul", "float32", k + 4, n),
        Instr("mul", "float32", n + 1, n + 1),
        Instr("sub", "float32", n - 1, n + 2),
    ]
    return p.validate()


def _bits(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.where(np.isnan(x), np.uint32(0x7FC00000), x.view(np.uint32))  # any NaN as one


def gelu_of_product(x, w):
    return jax.nn.gelu(x @ w)


def gelu_in_a_scan(x, ws):
    return jax.lax.scan(lambda h, w: (jax.nn.gelu(h @ w), None), x, ws)[0]


CASES = {
    "map": (jax.nn.gelu, lambda rng: [_inputs(rng, 64, 96)]),
    "matmul epilogue": (
        gelu_of_product,
        lambda rng: [_inputs(rng, 48, 32), (rng.standard_normal((32, 80)) / 4).astype(np.float32)],
    ),
    "scan body": (
        gelu_in_a_scan,
        lambda rng: [
            (rng.standard_normal((8, 64)) * 2).astype(np.float32),
            (rng.standard_normal((3, 64, 64)) / 6).astype(np.float32),
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("edit", [_swapped, _tanh_read_later])
def test_fused_gelu_keeps_the_interpreters_bits(rng, case, edit):
    fn, make = CASES[case]
    args = make(rng)
    plan = ark.plan(fn, *args, num_workers=2, platform="cpu")
    assert len(_fused(plan)) == 1
    unfused = edit(plan)
    assert _fused(unfused) == []
    got = np.asarray(run_plan(plan, args)[0][0])
    np.testing.assert_array_equal(_bits(got), _bits(run_plan(unfused, args)[0][0]))
    want = np.asarray(jax.jit(fn)(*args))
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert_close(got[finite], want[finite], 2e-5)


def test_a_bfloat16_gelu_is_not_fused(rng):
    """The fused pass computes in float32 only; a bf16 gelu rounds every step to bf16."""
    x = jnp.asarray(_inputs(rng, 16, 32), jnp.bfloat16)
    plan = ark.plan(jax.nn.gelu, x, num_workers=1, platform="cpu")
    assert _fused(plan) == []
    assert_close(
        np.asarray(jax.jit(ark.persistent(jax.nn.gelu))(x), np.float32)[2:],
        np.asarray(jax.jit(jax.nn.gelu)(x), np.float32)[2:],
        2e-2,
    )
