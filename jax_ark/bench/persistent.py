"""`python -m jax_ark.bench persistent`: ark.persistent against jax.jit on a decode-like chain.

The chain is `x = gelu(x @ W_i)` for L layers (bfloat16, batch b, width d), the shape of a
batch-1 decode step where launch gaps, not bytes, dominate under XLA. Configurations are DxLxB
(width, layers, batch); defaults: GPU 1024x32x1,4096x32x1,256x64x1,1024x32x16,4096x32x16 and CPU
256x64x1,1024x32x1,1024x32x16. Each is checked first (its error to the same chain in float32 at
most twice jax.jit's), then timed in --repeats rounds (median and the ratio's IQR). Writes
persistent_{gpu,cpu}.{json,png}.

On a GPU the table also gives the weight-bytes floor: the time to read every weight once at the
copy bandwidth measured in the same run, and the percent of that floor each executor reaches. On a
CPU it is left out: the weights of the small configurations stay in cache, so reading them is no
floor there (executors "beat" it several times over).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jax_ark as ark
from jax_ark.bench._report import (
    FLOOR_COLUMNS,
    add_round_arguments,
    machine_info,
    new_figure,
    parse_configs,
    print_table,
    save_figure,
    write_json,
)
from jax_ark.bench._timing import compare, median_seconds

# (d, layers, batch)
GPU_CONFIGS = ((1024, 32, 1), (4096, 32, 1), (256, 64, 1), (1024, 32, 16), (4096, 32, 16))
CPU_CONFIGS = ((256, 64, 1), (1024, 32, 1), (1024, 32, 16))


def decode_chain(x, *weights):
    for w in weights:
        x = jax.nn.gelu(x @ w)
    return x


def copy_bandwidth(device: jax.Device, nbytes: int = 256 << 20) -> float:
    """Bytes per second read+written by an XLA elementwise pass over `nbytes` on `device`."""
    a = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device)
    double = jax.jit(lambda v: v * 2.0)
    seconds = median_seconds(double, a, warmup=2, iters=10)
    return 2 * nbytes / seconds


def _errors_against_float32(ark_fn, xla_fn, x, ws) -> tuple[float, float]:
    """Relative errors (Frobenius) of ark's and jax.jit's bfloat16 chains against the same chain
    in float32 at HIGHEST precision (no TF32), from the same bfloat16 inputs."""
    with jax.default_matmul_precision("highest"):
        exact = np.asarray(
            jax.jit(decode_chain)(x.astype(jnp.float32), *[w.astype(jnp.float32) for w in ws])
        )
    norm = max(float(np.linalg.norm(exact)), 1e-30)

    def err(out) -> float:
        return float(np.linalg.norm(np.asarray(out, np.float32) - exact)) / norm

    return err(ark_fn(x, *ws)), err(xla_fn(x, *ws))


def bench(
    configs, device: jax.Device, budget_s: float, repeats: int = 3
) -> tuple[list[dict[str, Any]], float]:
    bandwidth = copy_bandwidth(device)
    rows = []
    for d, layers, batch in tqdm(configs, desc="persistent", unit="config"):
        # Random weights made on the device: numpy would spend seconds on d=4096's 1 GiB.
        keys = jax.random.split(jax.random.key(d * 1000 + layers), layers + 1)
        with jax.default_device(device):
            x = jax.random.normal(keys[0], (batch, d), jnp.bfloat16)
            ws = [
                (jax.random.normal(k, (d, d), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
                for k in keys[1:]
            ]
        xla_fn = jax.jit(decode_chain)
        ark_fn = jax.jit(ark.persistent(decode_chain))
        rel_err, xla_rel_err = _errors_against_float32(ark_fn, xla_fn, x, ws)
        # bf16 rounds every layer, in another order in each executor, so both drift from the
        # float32 chain (2% after 64 layers on the first H200 run): ark must not drift much more.
        if not rel_err <= 2 * xla_rel_err + 1e-3:
            raise AssertionError(
                f"ark.persistent is less accurate than jax.jit at d={d} L={layers} b={batch}: "
                f"relative error to the float32 chain {rel_err:.3g}, jax.jit's {xla_rel_err:.3g}"
            )
        t = compare(ark_fn, xla_fn, x, *ws, repeats=repeats, budget_s=budget_s)
        t_xla, t_ark = t["base_s"], t["ark_s"]
        weight_bytes = layers * d * d * 2
        floor = weight_bytes / bandwidth
        rows.append(
            {
                "d": d,
                "layers": layers,
                "batch": batch,
                "rel_err": rel_err,
                "xla_rel_err": xla_rel_err,
                "weight_mib": weight_bytes / 2**20,
                "ark_us": 1e6 * t_ark,
                "xla_us": 1e6 * t_xla,
                "ratio": t["ratio"],
                "ratio_p25": t["ratio_p25"],
                "ratio_p75": t["ratio_p75"],
                "repeats": repeats,
                "floor_us": 1e6 * floor,
                "ark_pct_floor": 100 * floor / t_ark,
                "xla_pct_floor": 100 * floor / t_xla,
            }
        )
    return rows, bandwidth


def plot(rows: list[dict[str, Any]], path: Path, title: str, show_floor: bool) -> None:
    fig, axes = new_figure()
    ax = axes[0][0]
    labels = [f"d={r['d']}\nL={r['layers']} b={r['batch']}" for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["xla_us"] for r in rows], 0.4, label="jax.jit")
    ax.bar(xs + 0.2, [r["ark_us"] for r in rows], 0.4, label="ark.persistent")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(
            f"{r['ratio']:.2f}x\n[{r['ratio_p25']:.2f}, {r['ratio_p75']:.2f}]",
            (x + 0.2, r["ark_us"]),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    if show_floor:
        ax.scatter(
            xs,
            [r["floor_us"] for r in rows],
            color="k",
            marker="_",
            s=400,
            label="weight-bytes floor",
            zorder=3,
        )
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_ylabel("median us per call")
    ax.set_title(f"{title}\nlabels: ark/jit time, median [IQR] of rounds", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=None,
        help="comma-separated DxLxB (width x layers x batch), e.g. 1024x32x1,256x64x1",
    )
    add_round_arguments(parser, budget_s=0.3)


def run(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    configs = args.configs or (GPU_CONFIGS if on_gpu else CPU_CONFIGS)
    rows, bandwidth = bench(configs, device, args.budget, args.repeats)
    print(
        f"copy bandwidth (XLA elementwise, read+write): {bandwidth / 1e9:.1f} GB/s "
        f"on {device.device_kind}; median of {args.repeats} rounds, IQR of the ark/jit ratio"
    )
    columns = [
        ("d", "d", "d"),
        ("layers", "L", "d"),
        ("batch", "b", "d"),
        ("xla_us", "jax.jit us", ".1f"),
        ("ark_us", "ark us", ".1f"),
        ("ratio", "ark/jit", ".2f"),
        ("ratio_p25", "IQR lo", ".2f"),
        ("ratio_p75", "IQR hi", ".2f"),
    ]
    if on_gpu:
        columns += FLOOR_COLUMNS
    print_table(rows, columns)
    name = "persistent_gpu" if on_gpu else "persistent_cpu"
    write_json(
        args.out / f"{name}.json",
        {"machine": machine_info(), "copy_bandwidth_Bps": bandwidth, "rows": rows},
    )
    plot(rows, args.out / f"{name}.png", f"decode chain, bf16, {device.device_kind}", on_gpu)
    return 0
