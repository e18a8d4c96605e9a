"""Runs single-GPU harness collectives many times and prints every wrong element with its bits.

For chasing results that are wrong only now and then (a race shows in one test run out of
several): each line names the configuration, call, rank, element, the bits got and wanted, and
each rank's input bits there. Needs the CUDA build and a GPU.

    python tools/collective_stress.py [--reps 5] [--only 'reduce_scatter bfloat16 n=2']
"""

from __future__ import annotations

import argparse
import itertools

import ml_dtypes
import numpy as np

from jax_ark import _cuda_collectives as cc

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL_SCRATCH = dict(ll_bytes=1024, piece_bytes=256, blocks=2)


def _want(op: str, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Left fold over ranks in float32 (int32 for integers), rounded once: the kernels' contract."""
    acc_type = np.int32 if xs[0].dtype.kind == "i" else np.float32
    n = len(xs)
    parts = [[x[r] for x in xs] for r in range(n)] if op == "reduce_scatter" else [xs] * n
    out = []
    for p in parts:
        acc = p[0].astype(acc_type)
        for q in p[1:]:
            acc = acc + q.astype(acc_type)
        out.append(acc.astype(xs[0].dtype))
    return out


def _bits(v: np.ndarray) -> str:
    return hex(int(np.asarray(v).view(np.uint16 if v.dtype.itemsize == 2 else np.uint32)))


def run(reps: int, only: str) -> int:
    rng = np.random.default_rng(0)
    bad_configs = 0
    configs = itertools.product(
        ["reduce_scatter", "all_reduce"],
        [BF16, np.dtype(np.float16), np.dtype(np.float32)],
        [2, 4, 8],
        [12345, 12346, 4097],
        [SMALL_SCRATCH, dict(SMALL_SCRATCH, blocks=1), dict(SMALL_SCRATCH, piece_bytes=512)],
    )
    for op, dtype, n, count, options in configs:
        name = f"{op} {dtype.name} n={n} count={count} {options}"
        if only not in name:
            continue
        wrong_calls = 0
        lines = []
        for call in range(reps):
            shape = (n, count) if op == "reduce_scatter" else (count,)
            xs = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
            ys = cc.harness_run(op, "sum", dtype, n, xs, **options)
            wrong = False
            for r, (got, want) in enumerate(zip(ys, _want(op, xs), strict=True)):
                diff = got.view(np.uint8).reshape(got.size, -1) != want.view(np.uint8).reshape(
                    want.size, -1
                )
                for i in np.flatnonzero(diff.any(axis=1))[:4]:
                    wrong = True
                    ins = [x[r][i] if op == "reduce_scatter" else x[i] for x in xs]
                    lines.append(
                        f"  call {call} rank {r} elem {i}/{count}: got {_bits(got[i])} "
                        f"want {_bits(want[i])} inputs {[_bits(v) for v in ins]}"
                    )
            wrong_calls += wrong
        print(f"{'BAD ' if wrong_calls else 'ok  '}{name}: {wrong_calls}/{reps} calls wrong")
        for line in lines[:12]:
            print(line)
        bad_configs += bool(wrong_calls)
    return 1 if bad_configs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="", help="run the configurations whose name has this")
    args = parser.parse_args()
    return run(args.reps, args.only)


if __name__ == "__main__":
    raise SystemExit(main())
