"""`group_run` (jax_ark/_persistent/_gpu_group.py), the Python side of the single-GPU multi-rank
harness of the persistent kernel, without a GPU: every argument is checked before the CUDA module
is needed, with messages naming the call, the rank and the input; the bytes it sends and decodes
are checked through a stand-in module that runs the reference interpreter on them.

The runs on a GPU are tests/test_gpu_persistent_comm.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from group_models import lax_outputs, local_inputs, plan_for_gpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark import _ffi
from jax_ark._persistent._format import PlanError, np_dtype
from jax_ark._persistent._gpu_group import group_run
from jax_ark._persistent._reference import interpret_group

N = 4
SCALE = np.linspace(-2.0, 2.0, 24, dtype=np.float32)  # a constant operand of the plan
SPECS = {"in_specs": (P("x"), P()), "out_specs": (P(), P("x"))}


def model(v, k):
    s = jax.lax.psum(v * SCALE, "x")
    return s, jax.lax.ppermute(k, "x", [(i, (i + 1) % N) for i in range(N)]) * 3


@pytest.fixture(scope="module")
def mesh4(cpu_devices):
    return Mesh(np.array(cpu_devices[:N]), ("x",))


def _args(rng):
    v = rng.standard_normal((N * 5, 24)).astype(np.float32)
    k = rng.integers(-1000, 1000, (6, 3)).astype(np.int32)
    return [v, k]


@pytest.fixture(scope="module")
def plan(mesh4):
    rng = np.random.default_rng(0)
    return plan_for_gpu(mesh4, model, _args(rng), SPECS, num_workers=2)


def _inputs(mesh4, plan, rng):
    return local_inputs(mesh4, plan, _args(rng), SPECS["in_specs"])


class _StandIn:
    """A `_ark_cuda` with the harness's signature that runs interpret_group on the bytes it gets,
    after checking that they are the plan's words, the inputs and the constants in order."""

    def __init__(self, plan, resident=64, cut_output=False):
        self.plan, self.resident, self.cut_output = plan, resident, cut_output
        self.seen: list = []

    def persistent_max_workers(self, device):
        return self.resident

    def persistent_group_run(self, words, n_ranks, inputs, timeout_ms, chaos_seed, skip_rank):
        p = self.plan
        self.seen.append((n_ranks, timeout_ms, chaos_seed, skip_rank))
        assert isinstance(words, bytes)
        assert np.array_equal(np.frombuffer(words, "<i4"), p.to_binary())
        out = []
        for call in inputs:
            per_rank = []
            for blobs in call:
                assert len(blobs) == len(p.args) and all(isinstance(b, bytes) for b in blobs)
                arrays = [
                    np.frombuffer(b, np_dtype(p.tensors[t].dtype)).reshape(p.tensors[t].shape)
                    for b, t in zip(blobs, p.args, strict=True)
                ]
                for a, t in zip(arrays[p.num_inputs :], p.args[p.num_inputs :], strict=True):
                    np.testing.assert_array_equal(a, p.constants[t])
                per_rank.append(arrays[: p.num_inputs])
            outs = interpret_group(p, per_rank)
            blobs = [[np.ascontiguousarray(o).tobytes() for o in rank] for rank in outs]
            if self.cut_output:
                blobs[1][0] = blobs[1][0][:-4]
            out.append(blobs)
        return out


def test_plan_has_a_constant_and_a_group(plan):
    assert plan.comm is not None and plan.comm.group_size == N
    assert len(plan.args) == plan.num_inputs + 1  # SCALE travels as a constant operand


def test_bytes_round_trip_through_the_harness_signature(mesh4, plan, rng, monkeypatch):
    """Three calls with different inputs: each call's outputs, decoded with the plan's shapes and
    dtypes, equal jax.lax's (float32 within rounding, int32 exactly)."""
    stand_in = _StandIn(plan)
    monkeypatch.setattr(_ffi, "cuda_module", lambda: stand_in)
    arg_sets = [_args(rng) for _ in range(3)]
    calls = [local_inputs(mesh4, plan, a, SPECS["in_specs"]) for a in arg_sets]
    got = group_run(plan, calls, timeout_ms=1234, chaos_seed=7)
    assert stand_in.seen == [(N, 1234, 7, -1)]
    assert len(got) == 3 and all(len(ranks) == N for ranks in got)
    for c, args in enumerate(arg_sets):
        want = lax_outputs(mesh4, plan, model, args, SPECS)
        for r in range(N):
            s, k = got[c][r]
            assert s.dtype == np.float32 and s.shape == (5, 24) and s.flags.writeable
            assert k.dtype == np.int32 and k.shape == (6, 3)
            np.testing.assert_allclose(s, want[r][0], rtol=2e-5, atol=2e-5)
            np.testing.assert_array_equal(k, want[r][1])


def _bad(plan, mesh4, rng, case):
    calls = [_inputs(mesh4, plan, rng)]
    if case == "ranks":
        calls[0] = calls[0][:-1]
    elif case == "inputs":
        calls[0][2] = calls[0][2][:1]
    elif case == "shape":
        calls[0][3][0] = calls[0][3][0].T
    elif case == "dtype":
        calls[0][1][1] = calls[0][1][1].astype(np.int64)
    elif case == "float64":
        calls[0][0][0] = calls[0][0][0].astype(np.float64)
    elif case == "second_call":
        calls.append(_inputs(mesh4, plan, rng))
        calls[1][2][1] = np.zeros((6, 4), np.int32)
    elif case == "not_a_list":
        calls[0][1] = calls[0][1][0]
    return calls


BAD_INPUTS = {
    "ranks": r"call 0 has inputs for 3 ranks; the plan's group \(x\) has 4 ranks",
    "inputs": r"call 0, rank 2: 1 inputs; the plan takes 2 \(v, k\)",
    "shape": r"call 0, rank 3, input 0 \(v\): the plan takes float32\[5, 24\], got \w+\[24, 5\]",
    "dtype": r"call 0, rank 1, input 1 \(k\): the plan takes int32\[6, 3\], got int64\[6, 3\]",
    "float64": r"call 0, rank 0, input 0 \(v\): the plan takes float32\[5, 24\], got float64",
    "second_call": r"call 1, rank 2, input 1 \(k\): the plan takes int32\[6, 3\], got \w+\[6, 4\]",
    "not_a_list": r"call 0, rank 1: ndarray inputs; the plan takes 2",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_named_before_the_module_is_needed(mesh4, plan, rng, monkeypatch, case):
    def no_module():
        raise AssertionError("the module was asked for before the inputs were checked")

    monkeypatch.setattr(_ffi, "cuda_module", no_module)
    with pytest.raises(ValueError, match=BAD_INPUTS[case]):
        group_run(plan, _bad(plan, mesh4, rng, case))


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"timeout_ms": 0}, ValueError, r"timeout_ms = 0 is not in 1\.\."),
        ({"timeout_ms": 1.5}, TypeError, "timeout_ms must be an integer, got float"),
        ({"chaos_seed": -1}, ValueError, r"chaos_seed = -1 is not in 0\.\."),
        ({"skip_rank": N}, ValueError, r"skip_rank = 4 is not in -1\.\.3"),
        ({"skip_rank": True}, TypeError, "skip_rank must be an integer, got bool"),
    ],
)
def test_bad_options_are_refused(mesh4, plan, rng, monkeypatch, kw, error, match):
    monkeypatch.setattr(_ffi, "cuda_module", lambda: None)
    with pytest.raises(error, match=match):
        group_run(plan, [_inputs(mesh4, plan, rng)], **kw)


def test_bad_calls_and_plans_are_refused(mesh4, plan, rng):
    with pytest.raises(ValueError, match="calls is empty"):
        group_run(plan, [])
    with pytest.raises(TypeError, match="calls must be a list .* got ndarray"):
        group_run(plan, np.zeros((1, N, 2)))
    with pytest.raises(TypeError, match="plan must be a jax_ark Plan"):
        group_run(plan.to_json(), [_inputs(mesh4, plan, rng)])
    single = ark.plan(lambda v: v * 2.0, np.ones((4, 4), np.float32), num_workers=1)
    with pytest.raises(PlanError, match="no communication group"):
        group_run(single, [[[np.ones((4, 4), np.float32)]]])
    broken = plan.copy()
    broken.tasks[0].deps.append(len(broken.tasks) + 5)
    with pytest.raises(PlanError):  # the plan is validated before anything is sent
        group_run(broken, [_inputs(mesh4, plan, rng)])


def test_missing_cuda_module_is_a_clear_error(mesh4, plan, rng, monkeypatch):
    calls = [_inputs(mesh4, plan, rng)]
    monkeypatch.setattr(_ffi, "cuda_module", lambda: None)
    with pytest.raises(RuntimeError, match=r"needs the CUDA runtime of jax_ark \(jax_ark._ark_cu"):
        group_run(plan, calls)

    class OldBuild:
        pass

    monkeypatch.setattr(_ffi, "cuda_module", lambda: OldBuild())
    with pytest.raises(RuntimeError, match="has no persistent_group_run"):
        group_run(plan, calls)


def test_too_many_blocks_for_one_launch_is_refused(mesh4, plan, rng, monkeypatch):
    monkeypatch.setattr(_ffi, "cuda_module", lambda: _StandIn(plan, resident=7))
    with pytest.raises(PlanError, match=r"4 ranks x 2 workers = 8 blocks .* keeps only 7"):
        group_run(plan, [_inputs(mesh4, plan, rng)])


def test_wrong_output_bytes_from_the_module_are_named(mesh4, plan, rng, monkeypatch):
    monkeypatch.setattr(_ffi, "cuda_module", lambda: _StandIn(plan, cut_output=True))
    with pytest.raises(RuntimeError, match=r"call 0, rank 1, output 0: 476 bytes.* has 480"):
        group_run(plan, [_inputs(mesh4, plan, rng)])


def test_gpu_shaped_comm_plans_run_on_the_cpu_executor(cpu_devices, rng):
    """The plans the GPU tests send (platform "gpu", few workers, small tiles) are sound: the CPU
    executor runs them equal to jax.lax, so a GPU failure on them points at the CUDA executor."""
    from test_gpu_persistent_comm import SP_SPECS, TILES, sp_mlp

    mesh = Mesh(np.array(cpu_devices), ("x",))
    args = [
        (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
        for s in [(8 * 8, 48), (48, 8 * 16), (8 * 16, 48)]
    ]
    plan = plan_for_gpu(mesh, sp_mlp, args, SP_SPECS, num_workers=3, **TILES)
    got = jax.jit(jax.shard_map(ark.persistent(sp_mlp, plan=plan), mesh=mesh, **SP_SPECS))(*args)
    want = jax.jit(jax.shard_map(sp_mlp, mesh=mesh, **SP_SPECS))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
