"""jax_ark: GPU-driven collectives and persistent loop kernels for JAX (ARK, NSDI 2023).

Public API (everything else is internal):
- collectives, drop-in for jax.lax inside jax.shard_map: psum, pmax, pmin, pmean, all_gather,
  psum_scatter, ppermute, all_to_all; `check()` raises a failure recorded by an earlier GPU call.
- persistent loop kernel: persistent, plan, Plan, timeline.
"""

from jax_ark._ffi import has_cuda, register_targets
from jax_ark.persistent import Plan, persistent, plan, timeline

register_targets()

__version__ = "0.1.0"

__all__ = ["has_cuda", "__version__", "Plan", "persistent", "plan", "timeline"]
