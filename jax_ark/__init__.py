"""jax_ark: GPU-driven collectives and persistent loop kernels for JAX (ARK, NSDI 2023).

Public API (everything else is internal):
- collectives, drop-in for jax.lax inside jax.shard_map: psum, pmax, pmin, pmean, all_gather,
  psum_scatter, ppermute, all_to_all; `check()` raises a failure recorded by an earlier GPU call.
- persistent loop kernel: persistent, plan, Plan, timeline.
"""

from jax_ark._ffi import has_cuda, register_targets

register_targets()

from jax_ark.collectives import (  # noqa: E402  (the FFI targets are registered first)
    all_gather,
    all_to_all,
    pmax,
    pmean,
    pmin,
    ppermute,
    psum,
    psum_scatter,
)

__version__ = "0.1.0"

__all__ = [
    "has_cuda",
    "__version__",
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
]
