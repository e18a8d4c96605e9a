"""Plan v3 has two optional parts, loops and communication (put tasks), merged under one version
number. A plan with both is not supported: every layer refuses it with a clear error."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_persistent_comm import TP_SPECS, _run, _tp_args, _tp_plan

import jax_ark as ark
from jax_ark._persistent._call import run_plan
from jax_ark._persistent._format import PLAN_VERSION, Loop, PlanError
from jax_ark._persistent._reference import interpret_group
from jax_ark._persistent._trace import UnsupportedError

SPECS = {"in_specs": (P("x"),), "out_specs": P("x")}


def _body_scan(v):
    def step(c, _):
        return jax.lax.psum(c * 2.0, "x"), None

    return jax.lax.scan(step, v, None, length=3)[0]


def _scan_then_psum(v):
    c = jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0 + 1.0, v)
    return jax.lax.psum(c, "x")


def test_one_version_for_loops_and_comm():
    assert PLAN_VERSION == 3


def test_tracer_refuses_a_collective_inside_a_loop_body(mesh8, rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    f = jax.jit(jax.shard_map(ark.persistent(_body_scan), mesh=mesh8, check_vma=False, **SPECS))
    with pytest.raises(UnsupportedError, match="inside a loop body"):
        f(x)


def test_tracer_refuses_loops_and_collectives_in_one_function(mesh8, rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    f = jax.jit(
        jax.shard_map(ark.persistent(_scan_then_psum), mesh=mesh8, check_vma=False, **SPECS)
    )
    with pytest.raises(UnsupportedError, match="both a loop .* and collectives"):
        f(x)


def test_loops_and_comm_each_still_work_alone(mesh8, rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)

    def loop_only(v):
        return jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0 + 1.0, v)

    def comm_only(v):
        return jax.lax.psum(v * 2.0, "x")

    for fn in (loop_only, comm_only):
        got = jax.jit(jax.shard_map(ark.persistent(fn), mesh=mesh8, check_vma=False, **SPECS))(x)
        want = jax.jit(jax.shard_map(fn, mesh=mesh8, check_vma=False, **SPECS))(x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def _comm_plan_with_a_loop(mesh8, rng):
    plan = _tp_plan(mesh8, rng)
    bad = plan.copy()
    bad.loops = [Loop(trip_count=2, first_op=0, end_op=1)]
    bad.ops[0].loop = 0
    return plan, bad


def test_validate_and_reference_refuse_loops_with_comm(mesh8, rng):
    _, bad = _comm_plan_with_a_loop(mesh8, rng)
    with pytest.raises(PlanError, match="both loops and put tasks"):
        bad.validate()
    with pytest.raises(PlanError, match="both loops and put tasks"):
        interpret_group(bad, [[]] * bad.comm.group_size)


def test_runtime_check_refuses_loops_with_comm(mesh8, rng):
    """plan_check.hpp: header.loops_at (word 30) and group_size (word 31) both set."""
    plan = _tp_plan(mesh8, rng)
    words = plan.to_binary()
    assert words[30] == 0 and words[31] == 8
    args = _tp_args(rng)
    bad = words.copy()
    bad[30] = 32  # any offset: the header check refuses the pair before the section is read

    def body(*local):
        outs, _ = run_plan(plan, list(local), words=bad)
        return outs[0]

    with pytest.raises(Exception, match="both a loop section and put tasks"):
        jax.block_until_ready(_run(mesh8, body, args, TP_SPECS, check_vma=False))
