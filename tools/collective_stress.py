"""Runs single-GPU harness reductions over many sizes and prints every wrong element with its bits.

For results that are wrong only at some sizes or only now and then: each configuration (op, dtype,
rank count, element count, scratch shape) runs `--reps` times on fresh random inputs and is
compared BIT FOR BIT with the kernels' contract (left fold over ranks in float32 / int32, rounded
once). A wrong configuration prints which element indices differ, where they sit in the chunked
protocol (piece, offset inside the piece, the last element or not), the bits got and wanted and
each rank's input bits there; the summary line counts wrong configurations per dtype, op and
count. Needs the CUDA build and a GPU.

    python tools/collective_stress.py [--reps 2] [--only 'reduce_scatter bfloat16 n=2']
        [--counts 12340-12350,777]
"""

from __future__ import annotations

import argparse
import collections
import itertools

import ml_dtypes
import numpy as np

from jax_ark import _cuda_collectives as cc

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL_SCRATCH = dict(ll_bytes=1024, piece_bytes=256, blocks=2)
OPTIONS = [SMALL_SCRATCH, dict(SMALL_SCRATCH, blocks=1), dict(SMALL_SCRATCH, piece_bytes=512)]


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


def _uint_view(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


def _where(op: str, n: int, count: int, itemsize: int, index: int, piece: int) -> str:
    """Where element `index` of a rank's result sits in the chunked protocol (all_reduce: inside
    its owner's shard of whole 16-byte vectors; reduce_scatter: inside the message)."""
    byte = index * itemsize
    start = 0
    if op == "all_reduce":
        vec = 16 // itemsize
        shard = _ceil(_ceil(count, n), vec) * vec
        owner = min(index // shard, n - 1)
        start = owner * shard * itemsize
        end = min(count, (owner + 1) * shard) * itemsize
    else:
        end = count * itemsize
    off = byte - start
    tail_vec = (end - start) // 16 * 16
    return (
        f"piece {off // piece} +{off % piece}B"
        f"{' scalar-tail' if off >= tail_vec else ''}{' LAST' if index == count - 1 else ''}"
    )


def _counts(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run(reps: int, only: str, counts: list[int], dtypes: list[np.dtype]) -> int:
    rng = np.random.default_rng(0)
    bad_by = collections.Counter()
    n_configs = bad_configs = 0
    configs = itertools.product(
        ["reduce_scatter", "all_reduce"], dtypes, [2, 4, 8], counts, OPTIONS
    )
    for op, dtype, n, count, options in configs:
        name = f"{op} {dtype.name} n={n} count={count} {options}"
        if only not in name:
            continue
        n_configs += 1
        wrong_calls = 0
        lines = []
        for call in range(reps):
            shape = (n, count) if op == "reduce_scatter" else (count,)
            if dtype.kind == "i":
                xs = [rng.integers(-1000, 1000, size=shape, dtype=np.int32) for _ in range(n)]
            else:
                xs = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
            ys = cc.harness_run(op, "sum", dtype, n, xs, **options)
            wrong = False
            for r, (got, want) in enumerate(zip(ys, _want(op, xs), strict=True)):
                g, w = _uint_view(got), _uint_view(want)
                bad = np.flatnonzero(g != w)
                if bad.size:
                    wrong = True
                    lines.append(f"  call {call} rank {r}: {bad.size} wrong, indices {bad[:16]}")
                for i in bad[:4]:
                    ins = [x[r][i] if op == "reduce_scatter" else x[i] for x in xs]
                    ins_bits = [hex(int(_uint_view(np.asarray(v))[0])) for v in ins]
                    where = _where(op, n, count, dtype.itemsize, int(i), options["piece_bytes"])
                    lines.append(
                        f"    elem {i} ({where}): got {int(g[i]):#x} want {int(w[i]):#x} "
                        f"inputs {ins_bits}"
                    )
            wrong_calls += wrong
        print(f"{'BAD ' if wrong_calls else 'ok  '}{name}: {wrong_calls}/{reps} calls wrong")
        for line in lines[:16]:
            print(line)
        if wrong_calls:
            bad_configs += 1
            bad_by[(op, dtype.name, "odd" if count % 2 else "even")] += 1
    print(f"summary: {bad_configs} of {n_configs} configurations wrong")
    for key, k in sorted(bad_by.items()):
        print(f"  wrong: {key[0]} {key[1]} {key[2]} counts: {k} configurations")
    return 1 if bad_configs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", default="", help="run the configurations whose name has this")
    parser.add_argument("--counts", default="12340-12350,777,778", help="e.g. 12340-12350,777")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32,int32")
    args = parser.parse_args()
    names = {"bfloat16": BF16, "float16": np.dtype(np.float16)}
    dtypes = [
        names.get(d, np.dtype(d) if d in ("float32", "int32") else None)
        for d in args.dtypes.split(",")
    ]
    if any(d is None for d in dtypes):
        parser.error(f"--dtypes: choose from bfloat16,float16,float32,int32, got {args.dtypes}")
    return run(args.reps, args.only, _counts(args.counts), dtypes)


if __name__ == "__main__":
    raise SystemExit(main())
