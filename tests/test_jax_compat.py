"""The jax-version-sensitive paths (jax 0.10.2 here, 0.11.2 on the GPU machine), on CPU.

Each guarded place is exercised on both of its branches where this jax can reach them: the vma
representation (`aval.mat` / `manual_axis_type` vs the older `aval.vma`), the trace stack the
call-site ids need (refused loudly when missing), which call primitives the persistent planner
inlines (and that loops are refused, not mistranslated), the concrete mesh the CUDA lowering
bootstraps from, and registering a "CUDA" FFI target on a jax without the CUDA plugin.
"""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ark
import jax_ark as ark
from jax_ark import _collective_primitive, _cuda_collectives
from jax_ark._persistent import UnsupportedError, _call, _trace

# ---- vma: both representations ------------------------------------------------------------------


class _OldAval:
    """An aval as jax releases before the ManualAxisType spelled it (`aval.vma`)."""

    def __init__(self, shape, vma):
        self.shape, self.vma = shape, frozenset(vma)

    def update(self, *, shape, weak_type, vma):
        assert weak_type is False
        return _OldAval(shape, vma)


def test_varying_axes_old_vma_spelling():
    old = _OldAval((4,), {"x", "y"})
    assert _collective_primitive.varying_axes(old) == frozenset({"x", "y"})
    out = _collective_primitive._with_shape_and_vma(old, (2, 4), frozenset({"y"}))
    assert (out.shape, out.vma) == ((2, 4), frozenset({"y"}))
    assert _call._varying_axes([old, _OldAval((1,), {"z"})]) == ("x", "y", "z")


def test_varying_axes_of_this_jax(mesh2x4):
    seen = {}

    def body(a):
        aval = jax.typeof(a)
        seen["collective"] = _collective_primitive.varying_axes(aval)
        out = _collective_primitive._with_shape_and_vma(aval, (3, *aval.shape), frozenset({"x"}))
        seen["updated"] = (out.shape, _collective_primitive.varying_axes(out))
        return a

    f = jax.shard_map(body, mesh=mesh2x4, in_specs=P("x", "y"), out_specs=P("x", "y"))
    jax.eval_shape(f, jax.ShapeDtypeStruct((4, 8), jnp.float32))
    assert seen["collective"] == frozenset({"x", "y"})
    assert seen["updated"] == ((3, 2, 2), frozenset({"x"}))


# ---- the trace stack behind call-site ids and ordering -------------------------------------------


def test_trace_stack_api_present_and_used():
    assert _collective_primitive._TRACE_API is not None, jax.__version__
    depths = []

    @jax.jit
    def f(x):
        depths.append(len(_collective_primitive._trace_chain()))
        return jax.lax.fori_loop(
            0, 2, lambda i, c: (depths.append(len(_collective_primitive._trace_chain())), c)[1], x
        )

    f(jnp.ones(3))
    assert depths[0] >= 1 and depths[1] > depths[0]  # the loop body's trace nests in jit's
    assert _collective_primitive._trace_chain() == []  # nothing traced here


def test_missing_trace_stack_is_refused(mesh2x4, monkeypatch):
    monkeypatch.setattr(_collective_primitive, "_TRACE_API", None)
    f = jax.shard_map(lambda a: jax_ark.psum(a, "x"), mesh=mesh2x4, in_specs=P("x"), out_specs=P())
    with pytest.raises(RuntimeError, match="trace stack"):
        jax.jit(f).trace(jnp.ones((8, 2), jnp.float32))


# ---- persistent: which sub-jaxprs are inlined ----------------------------------------------------


@jax.custom_jvp
def _soft(x):
    return jnp.tanh(x) * 0.5


_soft.defjvp(lambda p, t: (_soft(p[0]), t[0]))


@jax.custom_vjp
def _scaled(x):
    return x * 1.5 + 0.25


_scaled.defvjp(lambda x: (_scaled(x), None), lambda _, g: (g * 1.5,))


def _calls(x, w):
    y = jax.jit(lambda a, b: a @ b)(x, w)
    y = _soft(y) + _scaled(y)
    return jax.checkpoint(lambda z: jnp.exp(-z * z))(y)


def test_call_primitives_are_inlined(rng):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32) / 4
    names = {e.primitive.name for e in jax.make_jaxpr(_calls)(x, w).jaxpr.eqns}
    assert names <= _trace._INLINE_CALLS | {"add"}, names  # this jax's spelling of calls is known
    got = jax.jit(ark.persistent(_calls, num_workers=2))(x, w)
    np.testing.assert_allclose(got, jax.jit(_calls)(x, w), rtol=2e-5, atol=2e-6)


def _scan_sum(x):
    return jax.lax.scan(lambda c, xi: (c + xi, c), x[0], x)[0]


def test_scan_is_a_loop_not_inlined(rng):
    # Once: scan's body was inlined as one call, which ran one step and returned a wrong sum.
    # Now it is a plan loop run x.shape[0] times; while_loop a plan while loop.
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    plan = ark.plan(_scan_sum, x, num_workers=2)
    assert [loop.trip_count for loop in plan.loops] == [4]
    got = jax.jit(ark.persistent(_scan_sum, num_workers=2))(x)
    np.testing.assert_allclose(got, jax.jit(_scan_sum)(x), rtol=1e-6, atol=1e-6)

    def doubling(x):
        return jax.lax.while_loop(lambda c: c[0, 0] < 3, lambda c: c * 2, x)

    got = jax.jit(ark.persistent(doubling, num_workers=2))(jnp.abs(x) + 0.01)
    np.testing.assert_array_equal(got, jax.jit(doubling)(jnp.abs(x) + 0.01))


def test_known_call_with_unknown_params_is_refused():
    eqn = types.SimpleNamespace(
        primitive=types.SimpleNamespace(name="jit"), params={"body": None}, invars=[], outvars=[]
    )
    with pytest.raises(UnsupportedError, match="cannot inline 'jit'"):
        _trace._call_body(eqn)


# ---- CUDA lowering: the mesh it bootstraps from ----------------------------------------------


def _ctx(mesh):
    return types.SimpleNamespace(
        module_context=types.SimpleNamespace(axis_context=types.SimpleNamespace(mesh=mesh))
    )


def test_concrete_mesh_from_context_or_set_mesh(mesh2x4, cpu_devices):
    assert _cuda_collectives._concrete_mesh(_ctx(mesh2x4)) is mesh2x4
    abstract = mesh2x4.abstract_mesh
    with pytest.raises(ValueError, match="concrete Mesh"):
        _cuda_collectives._concrete_mesh(_ctx(abstract))
    with jax.set_mesh(mesh2x4):
        assert _cuda_collectives._concrete_mesh(_ctx(abstract)) is mesh2x4
    other = jax.sharding.Mesh(np.array(cpu_devices).reshape(4, 2), ("x", "y"))
    with jax.set_mesh(other), pytest.raises(ValueError, match="concrete Mesh"):
        _cuda_collectives._concrete_mesh(_ctx(abstract))  # a different mesh: not used


def test_cuda_lowering_over_abstract_mesh_is_a_clear_error(mesh2x4, monkeypatch):
    monkeypatch.setattr(_cuda_collectives, "_communicator", lambda *a: 1)
    _cuda_collectives.register_lowering(_collective_primitive.ark_collective_p)
    f = jax.jit(
        jax.shard_map(
            lambda a: jax_ark.psum(a, ("x", "y")),
            mesh=mesh2x4.abstract_mesh,
            in_specs=P(("x", "y")),
            out_specs=P(),
        )
    )
    arg = jax.ShapeDtypeStruct(
        (8, 4), jnp.float32, sharding=jax.sharding.NamedSharding(mesh2x4, P(("x", "y")))
    )
    with pytest.raises(ValueError, match="concrete Mesh"):
        jax.export.export(
            f,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ark_collective_cuda")],
        )(arg)


# ---- FFI registration for CUDA on a jax without the CUDA plugin ------------------------------


def test_cuda_target_registration_without_plugin_is_silent():
    if any(d.platform == "gpu" for d in jax.devices()) or _has_backend("cuda"):
        pytest.skip("a CUDA plugin is loaded: registration goes to it (checked on the GPU)")
    from jax_ark import _ffi

    name, capsule = next(iter(_ffi.cpu_module().registrations().items()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.ffi.register_ffi_target(f"jax_ark_compat_probe_{name}", capsule, platform="CUDA")
    # Held for a CUDA plugin that may register later, as jaxlib's own GPU targets are.
    from jax._src.lib import xla_client

    pending = getattr(xla_client, "_custom_callback", {}).get("CUDA", [])
    assert any(entry[0] == f"jax_ark_compat_probe_{name}" for entry in pending)


def _has_backend(name: str) -> bool:
    try:
        jax.devices(name)
    except RuntimeError:
        return False
    return True


@pytest.mark.gpu
def test_cuda_targets_reach_the_plugin_and_sm_count_is_known():
    from jax._src.lib import xla_client

    from jax_ark import _ffi
    from jax_ark._persistent import _target

    gpu = jax.devices("gpu")[0]  # initializes the CUDA plugin, which takes the pending targets
    assert "cuda" in _ffi.register_targets()
    names = set(_ffi.cuda_module().registrations())
    pending = {entry[0] for entry in getattr(xla_client, "_custom_callback", {}).get("CUDA", [])}
    assert not names & pending, f"never handed to the CUDA plugin: {names & pending}"
    core_count = int(getattr(gpu, "core_count", 0) or 0)
    sms = int(_ffi.cuda_module().device_sm_count(gpu.local_hardware_id))
    assert core_count in (0, sms), (core_count, sms)  # 0: this jax has no core_count (fallback)
    assert _target.default_workers(_target.GPU, gpu) <= sms
