"""One of two jax.distributed CPU processes (4 devices each) running jax_ark reductions over a
mesh ("p", "d") whose axis "p" spans the processes and "d" stays inside each (test_lax_dropin.py).

With the mesh set by jax.set_mesh (ark sees its devices while tracing), psum/pmax/pmin/pmean over
("p", "d") run hierarchically: ark over "d" inside each process, then jax.lax over "p" across
them; over "d" alone they are ark's only; over "p" alone jax.lax runs (a FallbackWarning). So do
all_gather, psum_scatter, ppermute and all_to_all (ark's over "d", jax.lax's over "p"). Every
result is compared with jax.lax's on the same random inputs; the jaxprs show which ran.

Usage: python multiprocess_hierarchical_worker.py PROCESS_ID PORT. Prints WORKER_OK at the end.
"""

from __future__ import annotations

import os
import sys
import warnings

import jax

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)

import jax.experimental.multihost_utils  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ark  # noqa: E402

assert jax.local_device_count() == 4 and jax.device_count() == 8
devices = np.array(jax.devices()).reshape(2, 4)
assert all(d.process_index == row for row in range(2) for d in devices[row])
mesh = Mesh(devices, ("p", "d"))
rng = np.random.default_rng(11)  # same seed: the same arrays in both processes
floats = rng.standard_normal((8, 5)).astype(np.float32)
ints = rng.integers(-1000, 1000, size=(8, 5)).astype(np.int32)
spec = P(("p", "d"))
inputs = [
    jax.make_array_from_callback(h.shape, NamedSharding(mesh, spec), lambda i, h=h: h[i])
    for h in (floats, ints)
]
REDUCTIONS = ("psum", "pmax", "pmin", "pmean")


def program(module, axes):
    def body(f, i):
        return tuple(getattr(module, name)(v, axes) for name in REDUCTIONS for v in (f, i))

    # Every device's own result, gathered: the (8, 5) result shows each group's reduction.
    return jax.jit(
        jax.shard_map(body, in_specs=(spec, spec), out_specs=(spec,) * 8, check_vma=False)
    )


def run(module, axes):
    outs = program(module, axes)(*inputs)
    return [
        np.asarray(jax.experimental.multihost_utils.process_allgather(o, tiled=True)) for o in outs
    ]


def primitives(axes) -> str:
    return str(program(jax_ark, axes).trace(*inputs).jaxpr)


with jax.set_mesh(mesh):
    for axes in (("p", "d"), "d", "p"):
        expected = run(jax.lax, axes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run(jax_ark, axes)
            jaxpr = primitives(axes)
        fallbacks = [w for w in caught if issubclass(w.category, jax_ark.FallbackWarning)]
        if axes == "p":
            # Only the process-spanning axis: nothing for ark to do inside a process.
            assert fallbacks and "spanning several processes" in str(fallbacks[0].message)
            assert "ark_collective" not in jaxpr, jaxpr
        else:
            assert not fallbacks, [str(w.message) for w in fallbacks]
            assert jaxpr.count("ark_collective") == 8, jaxpr
            if axes == ("p", "d"):  # the cross-process half is jax.lax's
                assert "psum" in jaxpr and "pmax" in jaxpr and "pmin" in jaxpr, jaxpr
        for name_dtype, e, g in zip(
            [(n, t) for n in REDUCTIONS for t in ("f32", "i32")], expected, got, strict=True
        ):
            if name_dtype[1] == "i32" and name_dtype[0] != "pmean":
                np.testing.assert_array_equal(g, e, err_msg=f"{name_dtype} over {axes}")
            else:
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"{name_dtype}")
    # Against numpy as well: the global sum over both processes' rows.
    total = run(jax_ark, ("p", "d"))
    for row in range(8):
        np.testing.assert_allclose(total[0][row], floats.sum(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(total[1][row], ints.sum(0))
        np.testing.assert_array_equal(total[3][row], ints.max(0))

    # With check_vma (the default) the result is typed invariant over both axes: out_specs=P().
    # The gradient runs through both halves (ark's transpose and jax.lax's).
    def loss(module):
        def body(v):
            return module.psum(jax.numpy.sin(v) * v, ("p", "d")).sum()

        smap = jax.shard_map(body, in_specs=spec, out_specs=P())
        return jax.jit(jax.value_and_grad(smap))

    (value_e, grad_e), (value_g, grad_g) = (loss(m)(inputs[0]) for m in (jax.lax, jax_ark))
    assert "ark_collective" in str(loss(jax_ark).trace(inputs[0]).jaxpr)
    np.testing.assert_allclose(float(value_g), float(value_e), rtol=1e-5)
    np.testing.assert_allclose(
        jax.experimental.multihost_utils.process_allgather(grad_g, tiled=True),
        jax.experimental.multihost_utils.process_allgather(grad_e, tiled=True),
        rtol=1e-5,
        atol=1e-5,
    )

    # The other collectives over the process-local axis "d" are ark's alone; over "p" jax.lax's.
    def movers(module, axis):
        def body(v):
            return (
                module.all_gather(v, axis, tiled=True),
                module.psum_scatter(module.all_gather(v, axis, tiled=True), axis, tiled=True),
                module.ppermute(
                    v, axis, [(i, (i + 1) % mesh.shape[axis]) for i in range(mesh.shape[axis])]
                ),
                module.all_to_all(module.all_gather(v, axis, tiled=True), axis, 0, 0, tiled=True),
            )

        return jax.jit(jax.shard_map(body, in_specs=spec, out_specs=(spec,) * 4, check_vma=False))

    for axis in ("d", "p"):
        expected = [
            np.asarray(jax.experimental.multihost_utils.process_allgather(o, tiled=True))
            for o in movers(jax.lax, axis)(inputs[0])
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jax_ark.FallbackWarning)
            f = movers(jax_ark, axis)
            got = [
                np.asarray(jax.experimental.multihost_utils.process_allgather(o, tiled=True))
                for o in f(inputs[0])
            ]
            jaxpr = str(f.trace(inputs[0]).jaxpr)
        assert jaxpr.count("ark_collective") == (6 if axis == "d" else 0), jaxpr
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6, err_msg=axis)

    # Strict mode: the hierarchical reduction is no fallback and runs; over "p" alone it raises.
    os.environ["JAX_ARK_STRICT"] = "1"
    strict_total = run(jax_ark, ("p", "d"))
    np.testing.assert_array_equal(strict_total[1], total[1])
    try:
        program(jax_ark, "p").trace(*inputs)
    except NotImplementedError as e:
        assert "span processes" in str(e), e
    else:
        raise AssertionError("JAX_ARK_STRICT=1: psum over the process-spanning axis ran")
    del os.environ["JAX_ARK_STRICT"]

# Without jax.set_mesh ark cannot see which process holds which device: jax.lax runs.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    f = jax.jit(
        jax.shard_map(
            lambda v: jax_ark.psum(v, ("p", "d")),
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
            check_vma=False,
        )
    )
    unset = np.asarray(jax.experimental.multihost_utils.process_allgather(f(inputs[0]), tiled=True))
assert "ark_collective" not in str(f.trace(inputs[0]).jaxpr)  # (warned once already, above)
np.testing.assert_allclose(unset[0], floats.sum(0), rtol=1e-5, atol=1e-5)
print(f"[{process_id}] WORKER_OK", flush=True)
