"""What one meeting of the 8 CPU devices costs, next to the tensor-parallel layer of issue 7.

Under `jax.jit(jax.shard_map(...))` on 8 virtual CPU devices, times per call (median of --calls
calls, every call waited for, --rounds rounds in one process):
- `x + 1`: a program with no collective (XLA's dispatch of 8 device programs);
- `x + 1` followed by a no-op rendezvous of the 8 devices (benchmarks/rendezvous_floor.cc,
  compiled here with the C++ compiler against jax's FFI headers), three ways: the others sleep
  until the last arrival wakes them (block), they poll yielding the core (spin), or no thread
  waits at all (async: every call returns an XLA FFI Future that the last arrival completes);
- a psum of 2 KiB per device with jax.lax and with ark.persistent;
- the tp layer psum(gelu(x @ w1) @ w2) at --size RxDxH (8x64x256 by default) with jax.lax and
  with ark.persistent.
Any layer with a collective pays at least a rendezvous; issue 7's CPU target (ark <= 0.6x
jax.lax) for the tp layer is printed next to the rendezvous times. Used for docs/benchmarks.md
("What a meeting of 8 devices costs").

    python benchmarks/rendezvous_floor.py --calls 400 --rounds 3
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark.bench._timing import median_seconds

_AXIS = "x"
_SOURCE = Path(__file__).with_name("rendezvous_floor.cc")
_TARGETS = {"block": "RendezvousBlock", "spin": "RendezvousSpin", "async": "RendezvousAsync"}


def _build_targets(out_dir: Path) -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise SystemExit("rendezvous_floor.py needs a C++ compiler (c++ or g++, or set CXX)")
    library = out_dir / "librendezvous_floor.so"
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w"]
    command += [f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(library)]
    subprocess.run(command, check=True)
    return ctypes.cdll.LoadLibrary(str(library))


def _rendezvous(target: str, ranks: int):
    def fn(x):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.ffi.ffi_call(target, out)(x, ranks=np.int64(ranks))

    return fn


def _tp(x, w1, w2):
    return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, _AXIS)


def _psum(x):
    return jax.lax.psum(x, _AXIS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="8x64x256", help="RxDxH of the tp layer")
    options = parser.parse_args()
    rows, dim, hidden = (int(v) for v in options.size.split("x"))
    devices = jax.devices()
    if len(devices) != 8:
        raise SystemExit(f"needs 8 devices, found {len(devices)} (XLA_FLAGS set before jax?)")
    mesh = jax.make_mesh((8,), (_AXIS,))
    rng = np.random.default_rng(0)

    def normal(shape, spec, scale=1.0):
        data = rng.standard_normal(shape).astype(np.float32) * scale
        return jax.device_put(data, NamedSharding(mesh, spec))

    def sharded(fn, in_specs, out_spec):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec))

    with tempfile.TemporaryDirectory() as tmp:
        library = _build_targets(Path(tmp))
        for kind, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(f"rendezvous_{kind}", capsule, platform="cpu")

    one = normal((8 * 8, 64), P(_AXIS))  # 8 x 64 float32 = 2 KiB per device
    tp_args = (
        normal((rows, dim), P()),
        normal((dim, hidden), P(None, _AXIS), 1 / np.sqrt(dim)),
        normal((hidden, dim), P(_AXIS, None), 1 / np.sqrt(hidden)),
    )
    tp_specs = (P(), P(None, _AXIS), P(_AXIS, None))
    expected_one = np.asarray(one) + 1
    expected_psum = np.tile(np.asarray(one).reshape(8, 8, 64).sum(axis=0), (8, 1))
    # name -> (function, arguments, expected result; None for the jax.lax tp layer, the baseline)
    cases = {"x + 1": (sharded(lambda x: x + 1, P(_AXIS), P(_AXIS)), (one,), expected_one)}
    for kind in _TARGETS:
        fn = sharded(_rendezvous(f"rendezvous_{kind}", 8), P(_AXIS), P(_AXIS))
        cases[f"x + 1, rendezvous ({kind})"] = (fn, (one,), expected_one)
    cases["psum 2 KiB, jax.lax"] = (sharded(_psum, P(_AXIS), P(_AXIS)), (one,), expected_psum)
    psum_ark = sharded(ark.persistent(_psum), P(_AXIS), P(_AXIS))
    cases["psum 2 KiB, ark"] = (psum_ark, (one,), expected_psum)
    lax_tp, ark_tp = f"tp {options.size}, jax.lax", f"tp {options.size}, ark"
    lax_tp_fn = sharded(_tp, tp_specs, P())
    cases[lax_tp] = (lax_tp_fn, tp_args, None)
    ark_tp_fn = sharded(ark.persistent(_tp), tp_specs, P())
    cases[ark_tp] = (ark_tp_fn, tp_args, np.asarray(lax_tp_fn(*tp_args)))
    for name, (fn, args, expected) in cases.items():
        if expected is not None and not np.allclose(np.asarray(fn(*args)), expected, 1e-4, 1e-4):
            raise SystemExit(f"{name}: wrong result")

    for r in range(options.rounds):
        times = {
            name: median_seconds(fn, *args, warmup=50, iters=options.calls) * 1e6
            for name, (fn, args, _) in cases.items()
        }
        print(f"round {r}: " + ", ".join(f"{name} {us:.0f} us" for name, us in times.items()))
        lax_us = times[lax_tp]
        floor = min(times[f"x + 1, rendezvous ({kind})"] for kind in _TARGETS)
        print(
            f"round {r}: tp ark/lax {times[ark_tp] / lax_us:.2f}; "
            f"0.6x lax = {0.6 * lax_us:.0f} us; fastest rendezvous / lax tp {floor / lax_us:.2f}"
        )


if __name__ == "__main__":
    main()
