"""Timing helpers shared by the benchmarks and the demo."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


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


def compare(
    ark_fn: Callable[..., Any],
    base_fn: Callable[..., Any],
    *args: Any,
    repeats: int,
    budget_s: float,
) -> dict[str, float]:
    """Times ark against its baseline in `repeats` rounds, each round timing both back to back
    (alternating which goes first, so drift in machine load hits both alike).

    Returns medians over rounds (seconds) and the per-round ratio's median, 25th and 75th
    percentiles. `budget_s` is the timing time per executor per round.
    """
    iters = iters_for(median_seconds(base_fn, *args, warmup=1, iters=3), budget_s)
    jax.block_until_ready(ark_fn(*args))
    ark_s, base_s = [], []
    for i in range(repeats):
        pair = [(ark_fn, ark_s), (base_fn, base_s)]
        for fn, out in pair if i % 2 else pair[::-1]:
            out.append(median_seconds(fn, *args, warmup=1, iters=iters))
    ratios = np.array(ark_s) / np.array(base_s)
    return {
        "ark_s": float(np.median(ark_s)),
        "base_s": float(np.median(base_s)),
        "ratio": float(np.median(ratios)),
        "ratio_p25": float(np.percentile(ratios, 25)),
        "ratio_p75": float(np.percentile(ratios, 75)),
        "repeats": repeats,
        "iters": iters,
    }


def comparison_args(doc: str):
    """The command line of a script that prints print_persistent_vs_jit's table: --repeats
    rounds, --budget seconds per executor per round."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per executor per round")
    return parser.parse_args()


def print_persistent_vs_jit(
    cases: list[tuple[str, Callable[..., Any], tuple]],
    *,
    repeats: int,
    budget_s: float,
    tol: float = 1e-4,
    width: int = 44,
) -> None:
    """For each (name, fn, args): checks jax.jit(ark.persistent(fn)) against jax.jit(fn) (a fast
    wrong answer is no answer), then prints both times and their ratio (`compare`) as a row."""
    import jax_ark as ark

    print(f"{'case':{width}s} {'jax.jit ms':>11s} {'ark ms':>9s} {'ark/jit':>8s} {'IQR':>13s}")
    for name, fn, fn_args in cases:
        ark_fn, base_fn = jax.jit(ark.persistent(fn)), jax.jit(fn)
        for got, want in zip(
            jax.tree.leaves(ark_fn(*fn_args)), jax.tree.leaves(base_fn(*fn_args)), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
        r = compare(ark_fn, base_fn, *fn_args, repeats=repeats, budget_s=budget_s)
        print(
            f"{name:{width}s} {r['base_s'] * 1e3:11.3f} {r['ark_s'] * 1e3:9.3f} {r['ratio']:8.2f} "
            f"{r['ratio_p25']:6.2f}-{r['ratio_p75']:<6.2f}"
        )
