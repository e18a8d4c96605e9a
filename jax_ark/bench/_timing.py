"""Timing helpers shared by the benchmarks and the demo."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[..., Any], *args: Any, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of `fn(*args)` including dispatch, waiting for the result each time."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def iters_for(seconds_per_call: float, budget_s: float = 1.0, lo: int = 3, hi: int = 200) -> int:
    """How many timed iterations fit a time budget, given one call's rough duration."""
    return max(lo, min(hi, int(budget_s / max(seconds_per_call, 1e-7))))
