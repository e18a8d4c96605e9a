"""cnn: a small convolutional network (two conv + relu + pool blocks, a dense head) as one
ark.persistent call vs jax.jit, its forward and its whole SGD training step (forward, backward
through the convolutions and max pooling, update), per batch size.

Written with jax.lax only (no flax), the shapes of flax's MNIST example: 28x28x1 images,
conv 3x3 -> 32, avg_pool 2x2, conv 3x3 -> 64, max_pool 2x2, dense 256, dense 10.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_ark as ark
from jax_ark.bench._report import (
    add_round_arguments,
    machine_info,
    max_rel_err,
    print_table,
    write_json,
)
from jax_ark.bench._timing import compare

_DN = ("NHWC", "HWIO", "NHWC")
_BATCHES = (8, 32)


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def normal(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

    return {
        "c1": normal(3, 3, 1, 32),
        "b1": np.zeros(32, np.float32),
        "c2": normal(3, 3, 32, 64),
        "b2": np.zeros(64, np.float32),
        "d1": normal(7 * 7 * 64, 256),
        "d2": normal(256, 10),
    }


def forward(p, x):
    y = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=_DN))
    y = lax.reduce_window(y + p["b1"], 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    y = jax.nn.relu(lax.conv_general_dilated(y, p["c2"], (1, 1), "SAME", dimension_numbers=_DN))
    y = lax.reduce_window(y + p["b2"], -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = jax.nn.relu(y.reshape(y.shape[0], -1) @ p["d1"])
    return y @ p["d2"]


def train_step(p, x, labels):
    def loss(p):
        logp = jax.nn.log_softmax(forward(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    value, grads = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda w, g: w - 0.01 * g, p, grads), value


def bench(batches, budget_s: float, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    params = _params(rng)
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)
        labels = rng.integers(0, 10, (batch,)).astype(np.int32)
        for name, fn, args in (
            ("forward", forward, (params, x)),
            ("sgd step", train_step, (params, x, labels)),
        ):
            fast, base = jax.jit(ark.persistent(fn)), jax.jit(fn)
            err = max_rel_err(fast(*args), base(*args), floor=1e-30)
            if not err < 1e-4:
                raise SystemExit(f"cnn {name} batch {batch}: ark differs from jax.jit ({err})")
            t = compare(fast, base, *args, repeats=repeats, budget_s=budget_s)
            rows.append(
                {
                    "case": name,
                    "batch": batch,
                    "jit_ms": 1e3 * t["base_s"],
                    "ark_ms": 1e3 * t["ark_s"],
                    **{k: t[k] for k in ("ratio", "ratio_p25", "ratio_p75", "repeats")},
                    "max_rel_err": err,
                }
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batches",
        type=lambda s: tuple(int(b) for b in s.split(",")),
        default=_BATCHES,
        help="comma-separated batch sizes (default 8,32)",
    )
    add_round_arguments(parser, budget_s=0.3)


def run(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    rows = bench(args.batches, args.budget, args.repeats)
    print(f"{device.device_kind}; median of {args.repeats} rounds, IQR of the ark/jit ratio")
    print_table(
        rows,
        [
            ("case", "case", "s"),
            ("batch", "batch", "d"),
            ("jit_ms", "jax.jit ms", ".3f"),
            ("ark_ms", "ark ms", ".3f"),
            ("ratio", "ark/jit", ".2f"),
            ("ratio_p25", "IQR lo", ".2f"),
            ("ratio_p75", "IQR hi", ".2f"),
        ],
    )
    write_json(args.out / f"cnn_{device.platform}.json", {"machine": machine_info(), "rows": rows})
    return 0
