"""The persistent loop kernel: a JAX function traced into tile tasks run by one FFI call."""

from jax_ark.persistent._format import Plan, PlanError
from jax_ark.persistent._trace import UnsupportedError

__all__ = ["Plan", "PlanError", "UnsupportedError"]
