"""Writing benchmark results: a printed table, a JSON file and a PNG plot."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

# The weight-bytes floor columns of the GPU tables (bench persistent, bench decode).
FLOOR_COLUMNS = [
    ("floor_us", "floor us", ".1f"),
    ("ark_pct_floor", "ark %floor", ".0f"),
    ("xla_pct_floor", "jit %floor", ".0f"),
]


def parse_configs(text: str) -> tuple[tuple[int, int, int], ...]:
    """`--configs` of DxLxB items (width x layers x batch), comma-separated."""
    out = []
    for item in text.split(","):
        d, layers, batch = (int(v) for v in item.split("x"))
        out.append((d, layers, batch))
    return tuple(out)


def add_round_arguments(
    parser: argparse.ArgumentParser,
    *,
    budget_s: float,
    per: str = "config",
    out_help: str = "folder for JSON and PNG files",
) -> None:
    """--repeats, --budget and --out, shared by every benchmark."""
    parser.add_argument(
        "--repeats", type=int, default=5, help=f"timing rounds per {per} (default %(default)s)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=budget_s,
        help="seconds of timing per executor per round (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help=out_help)


def machine_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "jax": jax.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": platform.node(),
        "python": platform.python_version(),
    }


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Prints `rows` with `columns` given as (key, header, format spec)."""
    headers = [header for _, header, _ in columns]
    cells = [
        [format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns]
        for row in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def max_rel_err(got: Any, want: Any, floor: float = 1.0) -> float:
    """Largest difference over the leaves of two pytrees, relative to each leaf's largest
    magnitude in `want` (at least `floor`), in float64."""
    err = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = max(err, float(np.abs(g - w).max() / max(floor, np.abs(w).max())))
    return err


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # benchmarks run headless (CI, GPU machines)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
