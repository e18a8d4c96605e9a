"""The persistent loop kernel: a JAX function traced into tile tasks run by one FFI call.

Public: persistent, plan, Plan, timeline (re-exported by jax_ark). The rest is internal.
"""

from jax_ark._persistent._call import persistent, plan
from jax_ark._persistent._format import Plan, PlanError
from jax_ark._persistent._timeline import Timeline, timeline
from jax_ark._persistent._trace import UnsupportedError

__all__ = ["Plan", "PlanError", "Timeline", "UnsupportedError", "persistent", "plan", "timeline"]
