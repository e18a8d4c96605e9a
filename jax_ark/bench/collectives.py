"""`python -m jax_ark.bench collectives`: ark collectives against jax.lax, measured side by side.

CPU (default when no GPU): 8 virtual CPU devices, a 1-D mesh; each op (float32, inside
jax.jit(jax.shard_map(...)), checked against jax.lax first) at each size, ark time, jax.lax time and
their ratio: the median over --repeats rounds and the ratio's IQR. Sizes are float32 elements per
device (default 1024, 65536, 1048576: 4 KiB, 256 KiB, 4 MiB). Writes collectives_cpu.{json,png}.

GPU: the N-rank harness of the CUDA runtime on the one GPU (all ranks in one cooperative launch),
latency at 8 KiB and bus bandwidth at 256 MiB next to the copy bandwidth measured in the same run.
Writes collectives_gpu.{json,png}. --ops, --sizes and --repeats apply to the CPU run only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import jax_ark as ark
from jax_ark.bench._report import (
    add_round_arguments,
    machine_info,
    new_figure,
    print_table,
    save_figure,
    write_json,
)
from jax_ark.bench._timing import compare

# op name -> (ark body, jax.lax body, out_specs); each body maps the per-device block.
_AXIS = "x"
OPS: dict[str, tuple[Callable, Callable, P]] = {
    "psum": (partial(ark.psum, axis_name=_AXIS), partial(jax.lax.psum, axis_name=_AXIS), P()),
    "pmax": (partial(ark.pmax, axis_name=_AXIS), partial(jax.lax.pmax, axis_name=_AXIS), P()),
    "all_gather": (
        partial(ark.all_gather, axis_name=_AXIS, tiled=True),
        partial(jax.lax.all_gather, axis_name=_AXIS, tiled=True),
        P(_AXIS),
    ),
    "psum_scatter": (
        partial(ark.psum_scatter, axis_name=_AXIS, tiled=True),
        partial(jax.lax.psum_scatter, axis_name=_AXIS, tiled=True),
        P(_AXIS),
    ),
    "ppermute": (None, None, P(_AXIS)),  # built per mesh size (the ring needs n)
    "all_to_all": (
        partial(ark.all_to_all, axis_name=_AXIS, split_axis=0, concat_axis=0, tiled=True),
        partial(jax.lax.all_to_all, axis_name=_AXIS, split_axis=0, concat_axis=0, tiled=True),
        P(_AXIS),
    ),
}
CPU_SIZES = (1 << 10, 1 << 16, 1 << 20)  # float32 elements per device: 4 KiB, 256 KiB, 4 MiB


def _bodies(op: str, n: int) -> tuple[Callable, Callable, P]:
    if op == "ppermute":
        ring = [(i, (i + 1) % n) for i in range(n)]
        return (
            partial(ark.ppermute, axis_name=_AXIS, perm=ring),
            partial(jax.lax.ppermute, axis_name=_AXIS, perm=ring),
            P(_AXIS),
        )
    return OPS[op]


def _sharded(body: Callable, mesh: Mesh, out_spec: P) -> Callable:
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(_AXIS), out_specs=out_spec))


def bench_cpu(
    ops: list[str], sizes: list[int], budget_s: float, repeats: int = 3
) -> list[dict[str, Any]]:
    devices = jax.devices("cpu")[:8]
    n = len(devices)
    mesh = Mesh(np.array(devices), (_AXIS,))
    rng = np.random.default_rng(0)
    rows = []
    for op, size in tqdm([(o, s) for o in ops for s in sizes], desc="collectives", unit="case"):
        ark_body, lax_body, out_spec = _bodies(op, n)
        x = jax.device_put(
            jnp.asarray(rng.standard_normal(n * size, dtype=np.float32)),
            jax.sharding.NamedSharding(mesh, P(_AXIS)),
        )
        ark_fn, lax_fn = _sharded(ark_body, mesh, out_spec), _sharded(lax_body, mesh, out_spec)
        got, want = ark_fn(x), lax_fn(x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
        t = compare(ark_fn, lax_fn, x, repeats=repeats, budget_s=budget_s)
        rows.append(
            {
                "op": op,
                "devices": n,
                "elements_per_device": size,
                "bytes_per_device": 4 * size,
                "ark_ms": 1e3 * t["ark_s"],
                "lax_ms": 1e3 * t["base_s"],
                "ratio": t["ratio"],
                "ratio_p25": t["ratio_p25"],
                "ratio_p75": t["ratio_p75"],
                "repeats": repeats,
                "iters_per_round": t["iters"],
            }
        )
    return rows


def _size_label(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g} {unit}"
    return f"{nbytes} B"


def plot_cpu(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: ark / jax.lax per op and size (median, IQR bars; below 1 is faster). Right: the
    absolute times on a log scale, where a big op (all_gather's n-times output) no longer
    flattens the small ones."""
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = new_figure(ncols=2)
    ratio_ax, time_ax = axes[0]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    sizes = sorted({r["bytes_per_device"] for r in rows})
    width = 0.8 / max(1, len(sizes))
    for j, size in enumerate(sizes):
        mine = {r["op"]: r for r in rows if r["bytes_per_device"] == size}
        xs = [i + (j - (len(sizes) - 1) / 2) * width for i, op in enumerate(ops) if op in mine]
        got = [mine[op] for op in ops if op in mine]
        ratio_ax.bar(
            xs,
            [r["ratio"] for r in got],
            width * 0.9,
            yerr=[
                [r["ratio"] - r["ratio_p25"] for r in got],
                [r["ratio_p75"] - r["ratio"] for r in got],
            ],
            capsize=2,
            label=_size_label(size),
        )
    ratio_ax.axhline(1.0, color="k", lw=0.8, ls="--")
    # Log scale: 2x slower and 2x faster are the same distance from the line, and one outlier
    # does not flatten the other bars.
    ratio_ax.set_yscale("log", base=2)
    ratio_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ratio_ax.set_xticks(range(len(ops)), ops, rotation=20)
    ratio_ax.set_ylabel("ark time / jax.lax time (median, IQR)")
    ratio_ax.set_title("ark / jax.lax: below the dashed line, ark is faster")
    ratio_ax.legend(title="bytes per device", fontsize=8)
    for op in ops:
        mine = [r for r in rows if r["op"] == op]
        xs = [r["bytes_per_device"] for r in mine]
        line = time_ax.plot(xs, [r["ark_ms"] for r in mine], marker="o", label=f"ark.{op}")[0]
        time_ax.plot(xs, [r["lax_ms"] for r in mine], ls="--", color=line.get_color(), alpha=0.6)
    time_ax.set_xscale("log", base=2)
    time_ax.set_xticks(sizes, [_size_label(size) for size in sizes])
    time_ax.minorticks_off()
    time_ax.set_yscale("log")
    time_ax.set_xlabel("bytes per device")
    time_ax.set_ylabel("median ms per call (dashed: jax.lax)")
    time_ax.set_title(f"{rows[0].get('devices', '?')} CPU devices, float32")
    time_ax.legend(fontsize=8)
    save_figure(fig, path)


# nccl-tests conventions: the "size" of a collective and its bus-bandwidth factor for n ranks.
# x_bytes(size, n) is each rank's input for a message of `size` bytes.
_GPU_OPS = {
    "all_reduce": (lambda size, n: size, lambda n: 2 * (n - 1) / n),
    "all_gather": (lambda size, n: size // n, lambda n: (n - 1) / n),
    "reduce_scatter": (lambda size, n: size, lambda n: (n - 1) / n),
    "all_to_all": (lambda size, n: size, lambda n: (n - 1) / n),
    "permute": (lambda size, n: size, lambda n: 1.0),
}


def bench_gpu(n_ranks: int = 8, small: int = 8 << 10, large: int = 256 << 20) -> dict[str, Any]:
    """The N-rank harness on the one GPU: all ranks run in one cooperative launch.

    Latency at `small` bytes and bus bandwidth at `large` bytes per op, next to the copy bandwidth
    measured in the same run (the harness's ranks share one GPU's HBM, so this is a protocol and
    kernel benchmark, not an interconnect one).
    """
    from jax_ark import _cuda_collectives as cc

    copy_gbps = cc.copy_bandwidth(1 << 30)
    rows = []
    for op, (x_bytes, bus_factor) in tqdm(_GPU_OPS.items(), desc="collectives (gpu)", unit="op"):
        small_us = cc.harness_time(op, "float32", n_ranks, x_bytes(small, n_ranks), iters=200)
        large_us = cc.harness_time(op, "float32", n_ranks, x_bytes(large, n_ranks), iters=5)
        bus_gbps = large / (large_us * 1e-6) * bus_factor(n_ranks) / 1e9
        rows.append(
            {
                "op": op,
                "n_ranks": n_ranks,
                "small_bytes": small,
                "small_us": small_us,
                "large_bytes": large,
                "large_us": large_us,
                "bus_GBps": bus_gbps,
                "bus_vs_copy": bus_gbps / copy_gbps,
            }
        )
    print(
        f"copy bandwidth (read+write) {copy_gbps:.0f} GB/s; {n_ranks} ranks in one cooperative "
        "launch on one GPU"
    )
    print_table(
        rows,
        [
            ("op", "op", "s"),
            ("small_us", f"{small >> 10} KiB us", ".2f"),
            ("large_us", f"{large >> 20} MiB us", ".0f"),
            ("bus_GBps", "busbw GB/s", ".0f"),
            ("bus_vs_copy", "busbw/copy", ".2f"),
        ],
    )
    return {"copy_GBps": copy_gbps, "rows": rows}


def plot_gpu(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    fig, axes = new_figure(ncols=2)
    names = [r["op"] for r in rows]
    axes[0][0].bar(names, [r["small_us"] for r in rows])
    axes[0][0].set_ylabel(f"us per call at {rows[0]['small_bytes'] >> 10} KiB")
    axes[0][0].set_title(f"latency, {rows[0]['n_ranks']} ranks on one GPU")
    axes[0][1].bar(names, [r["bus_GBps"] for r in rows])
    axes[0][1].axhline(result["copy_GBps"], color="k", ls="--", label="copy bandwidth")
    axes[0][1].set_ylabel(f"bus GB/s at {rows[0]['large_bytes'] >> 20} MiB")
    axes[0][1].legend(fontsize=8)
    for ax in axes[0]:
        ax.tick_params(axis="x", labelrotation=30)
    save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated ops (default: all: {','.join(OPS)})",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, CPU_SIZES)),
        help="comma-separated float32 elements per device (CPU; default %(default)s)",
    )
    parser.add_argument(
        "--platform",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="auto: the GPU when the CUDA runtime is built and a GPU is present",
    )
    add_round_arguments(parser, budget_s=0.2, per="case")


def run(args: argparse.Namespace) -> int:
    platform = args.platform
    if platform == "auto":
        platform = "gpu" if ark.has_cuda() and jax.devices()[0].platform == "gpu" else "cpu"
    info = machine_info()
    if platform == "gpu":
        result = bench_gpu()
        write_json(args.out / "collectives_gpu.json", {"machine": info, **result})
        plot_gpu(result, args.out / "collectives_gpu.png")
        return 0
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {','.join(OPS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = bench_cpu(ops, sizes, args.budget, args.repeats)
    print(f"median of {args.repeats} rounds; IQR: the middle half of the per-round ark/lax ratios")
    print_table(
        rows,
        [
            ("op", "op", "s"),
            ("bytes_per_device", "bytes/dev", "d"),
            ("ark_ms", "ark ms", ".3f"),
            ("lax_ms", "lax ms", ".3f"),
            ("ratio", "ark/lax", ".2f"),
            ("ratio_p25", "IQR lo", ".2f"),
            ("ratio_p75", "IQR hi", ".2f"),
        ],
    )
    write_json(args.out / "collectives_cpu.json", {"machine": info, "rows": rows})
    plot_cpu(rows, args.out / "collectives_cpu.png")
    return 0
