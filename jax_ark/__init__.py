"""jax_ark: GPU-driven collectives and persistent loop kernels for JAX (ARK, NSDI 2023).

Public API (everything else is internal):
- collectives, drop-in for jax.lax inside jax.shard_map: psum, pmax, pmin, pmean, all_gather,
  psum_scatter, ppermute, all_to_all (FallbackWarning where jax.lax runs instead); `check()`
  raises a failure recorded by an earlier GPU call.
- persistent loop kernel: persistent, plan, Plan, timeline (and the errors PlanError,
  UnsupportedError).
"""

from jax_ark._ffi import has_cuda, register_targets

register_targets()

# The FFI targets are registered before the modules that lower to them are imported.
from jax_ark._cuda_collectives import check  # noqa: E402
from jax_ark._persistent import Plan, PlanError, UnsupportedError, persistent, plan, timeline  # noqa: E402
from jax_ark.collectives import (  # noqa: E402
    FallbackWarning,
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
    "__version__",
    "has_cuda",
    "check",
    "FallbackWarning",
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
    "persistent",
    "plan",
    "Plan",
    "PlanError",
    "UnsupportedError",
    "timeline",
]
