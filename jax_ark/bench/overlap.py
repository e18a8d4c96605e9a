"""`python -m jax_ark.bench overlap`: compute + communication in one persistent plan vs jax.lax.

CPU: 8 virtual CPU devices, a 1-D mesh. Each layer runs as `jax.jit(jax.shard_map(fn))` twice in
the same run: with jax.lax's collectives under XLA (the baseline) and as ONE `ark.persistent(fn)`
call per device whose put tasks overlap the matmul tiles (plan v3), on inputs already placed on
the mesh. Results are checked against the baseline first. Columns: both times and their ratio
(median over --repeats rounds, the ratio's IQR), then ark's compute-only time (the layer without
its collectives) and comm-only time (the collectives alone, same shapes), XLA's compute-only time
(the same layer without collectives under jax.jit: ark/lax cannot go below lax compute / lax
unless ark computes faster than XLA), and the overlap efficiency ark / max(compute, comm): 1.0
would hide all communication behind compute.

Layers (--layers): tp, the Megatron tensor-parallel MLP (x replicated, w1 column- and w2
row-parallel, psum); sp, the sequence-parallel MLP (rows sharded: all_gather -> matmul -> gelu
-> matmul -> psum_scatter); moe, a mixture of experts with one expert per device and fixed-capacity
dispatch (all_to_all -> the local expert's matmul -> gelu -> matmul -> all_to_all); dptp, a
training step of the TP MLP on a 2 x 4 mesh (dp x tp: the loss's value and gradients, psum over
tp forward, pmean of the gradients over dp, and the psum over dp of the gradients of the
dp-invariant weights that autodiff adds under shard_map's check_vma typing); ring, the
collective matmul all_gather(x) @ w written as a ring of ppermutes, each step's product written
with dynamic_update_slice into the owner's rows of a fresh zero buffer (unrolled, as in
tests/test_persistent_comm_groups.py); ring_loop, the same ring as a fori_loop
(tests/test_persistent_comm_loops.py); decode, a decode loop: a fori_loop over 4 tokens around a
scan over 4 layers of the tp layer (a psum per layer and token: a collective two loops deep,
16 per call). --sizes are RxDxH: R rows per device (sp, ring: gathered to 8R; moe: R tokens in 8
buckets of R/8; dptp: R rows of the device's data shard; decode: the batch), model dim D, hidden
dim H in total (tp, sp, decode: H/8 per device; dptp: H/4; ring: the columns of w, H/8 per
device; moe: each expert's own hidden dim).
Writes overlap_cpu.json.

GPU (--gpu; needs jax_ark's CUDA runtime and one GPU): the same layers planned for the GPU and run
by the CUDA executor's single-GPU harness, every rank of the group on the one GPU at once
(--ranks ranks x --workers blocks in one cooperative launch per call; the ranks split the GPU's
SMs, so these are not one-GPU-per-rank times). Per layer: ark's time per call, the compute-only
plan run as --ranks independent copies, the comm-only plan, and the overlap efficiency
ark / max(compute, comm), the figure issue 7 targets (<= 1.15). No XLA baseline: XLA cannot run
N ranks on one GPU. The full plan's outputs are checked against the reference interpreter first.
Writes overlap_gpu.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ark as ark
from jax_ark._persistent._format import np_dtype
from jax_ark.bench._report import (
    add_round_arguments,
    machine_info,
    max_rel_err,
    print_table,
    write_json,
)
from jax_ark.bench._timing import compare, median_seconds

_AXIS = "x"


def _tp(x, w1, w2):
    return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, _AXIS)


def _tp_compute(x, w1, w2):
    return jax.nn.gelu(x @ w1) @ w2


def _tp_comm(y):
    return jax.lax.psum(y, _AXIS)


def _sp(x, w1, w2):
    xg = jax.lax.all_gather(x, _AXIS, tiled=True)
    return jax.lax.psum_scatter(jax.nn.gelu(xg @ w1) @ w2, _AXIS, tiled=True)


def _sp_compute(xg, w1, w2):
    return jax.nn.gelu(xg @ w1) @ w2


def _sp_comm(x, y):
    return jax.lax.all_gather(x, _AXIS, tiled=True), jax.lax.psum_scatter(y, _AXIS, tiled=True)


def _moe(xb, w1, w2):
    xe = jax.lax.all_to_all(xb, _AXIS, 0, 0, tiled=True)
    return jax.lax.all_to_all(_moe_compute(xe, w1, w2), _AXIS, 0, 0, tiled=True)


def _moe_compute(xe, w1, w2):
    h = jax.nn.gelu(xe.reshape(-1, xe.shape[-1]) @ w1[0])
    return (h @ w2[0]).reshape(xe.shape)


def _moe_comm(xb, y):
    return (
        jax.lax.all_to_all(xb, _AXIS, 0, 0, tiled=True),
        jax.lax.all_to_all(y, _AXIS, 0, 0, tiled=True),
    )


# dptp: a 2-D mesh, data-parallel over _DP (2 rows of devices) and tensor-parallel over _TP.
_DP, _TP = "dp", "tp"
_DP_SIZE = 2


def _dptp_loss(x, w1, w2, tp_sum: bool):
    y = jax.nn.gelu(x @ w1) @ w2
    if tp_sum:
        y = jax.lax.psum(y, _TP)
    return jnp.mean(y * y)


def _dptp(x, w1, w2):
    value, (g1, g2) = jax.value_and_grad(_dptp_loss, argnums=(1, 2))(x, w1, w2, True)
    return jax.lax.pmean(value, _DP), jax.lax.pmean(g1, _DP), jax.lax.pmean(g2, _DP)


def _dptp_compute(x, w1, w2):
    # Weights marked varying over dp: otherwise autodiff sums their gradients over dp (a psum)
    w1, w2 = (jax.lax.pcast(w, _DP, to="varying") for w in (w1, w2))
    value, (g1, g2) = jax.value_and_grad(_dptp_loss, argnums=(1, 2))(x, w1, w2, False)
    return value[None], g1, g2


def _dptp_comm(y, g1, g2):
    """The step's tensor collectives: the forward psum over tp; per gradient the psum over dp
    that autodiff adds (the weights are invariant over dp) and the step's own pmean."""
    g1, g2 = jax.lax.psum(g1, _DP), jax.lax.psum(g2, _DP)
    return jax.lax.psum(y, _TP), jax.lax.pmean(g1, _DP), jax.lax.pmean(g2, _DP)


_DECODE_TOKENS, _DECODE_LAYERS = 4, 4


def _decode(x, w1s, w2s, comm: bool = True):
    """Tokens (fori_loop) x layers (scan) of the tp layer with a residual; the next token's input
    is the last hidden state squashed."""

    def layer(h, ws):
        y = jax.nn.gelu(h @ ws[0]) @ ws[1]
        return (jax.lax.psum(y, _AXIS) if comm else y) + h, None

    def token(t, h):
        return jnp.tanh(jax.lax.scan(layer, h, (w1s, w2s))[0])

    if not comm:  # the carry varies over the ranks without the psum: say so for shard_map
        x = jax.lax.pcast(x, _AXIS, to="varying")
    return jax.lax.fori_loop(0, _DECODE_TOKENS, token, x)


def _decode_comm(y):
    def layer(h, _):  # the sum re-marked varying, as the carry it replaces
        return jax.lax.pcast(jax.lax.psum(h, _AXIS) * 0.125, _AXIS, to="varying"), None

    def token(t, h):
        return jax.lax.scan(layer, h, None, length=_DECODE_LAYERS)[0]

    return jax.lax.fori_loop(0, _DECODE_TOKENS, token, y)


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def _ring_fns(n: int, loop: bool) -> tuple[Callable, Callable, Callable]:
    """all_gather(x) @ w as a ring: step s multiplies the chunk this rank holds (rank me - s's
    rows) and writes it into those rows of a fresh zero buffer while the ring passes the chunk
    on. Returns the layer, its compute-only form and its comm-only form (the ppermutes alone).
    The compute-only form gets the n chunks the ring would bring already on the device (n x the
    rows) and takes step s's from them: the same products and updates with no ppermute. (Reusing
    the local chunk for every step instead let XLA compute the n equal products once.)"""

    def ring(x, w, comm=True):
        me = jax.lax.axis_index(_AXIS)
        rows = x.shape[0] // (1 if comm else n)

        def step(s, chunk, out):
            if not comm:  # the chunk the ring would hold at step s
                chunk = jax.lax.dynamic_slice_in_dim(x, s * rows, rows)
            out = jax.lax.dynamic_update_slice(out, chunk @ w, ((me - s) % n * rows, 0))
            return (jax.lax.ppermute(chunk, _AXIS, _ring_perm(n)) if comm else chunk), out

        out = jnp.zeros((n * rows, w.shape[1]), x.dtype)
        first = x if comm else x[:rows]
        if loop:  # the carry varies over the ring once written: say so for shard_map's typing
            out = jax.lax.pcast(out, _AXIS, to="varying")
            return jax.lax.fori_loop(0, n, lambda s, c: step(s, *c), (first, out))[1]
        chunk = first
        for s in range(n):
            chunk, out = step(s, chunk, out)
        return out

    def comm_only(x):
        if loop:
            return jax.lax.fori_loop(
                0, n - 1, lambda s, c: jax.lax.ppermute(c, _AXIS, _ring_perm(n)), x
            )
        for _ in range(n - 1):
            x = jax.lax.ppermute(x, _AXIS, _ring_perm(n))
        return x

    return ring, lambda x, w: ring(x, w, comm=False), comm_only


def _cases(layer: str, n: int, rows: int, d: int, hidden: int, rng) -> dict[str, Any]:
    """fn, its compute-only and comm-only parts, their global inputs and shard_map specs, and
    the mesh ("mesh": its shape and axis names)."""

    def normal(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    one_axis = {"mesh": ((n,), (_AXIS,))}
    if layer == "dptp":
        if n % _DP_SIZE:
            raise SystemExit(f"dptp: {n} devices do not split into {_DP_SIZE} data shards")
        tp = n // _DP_SIZE
        dp_tp = (_DP, _TP)
        w1, w2 = normal(d, hidden), normal(hidden, d)
        wspec = (P(None, _TP), P(_TP, None))
        return {
            "mesh": ((_DP_SIZE, tp), dp_tp),
            "full": (
                _dptp,
                (normal(_DP_SIZE * rows, d), w1, w2),
                (P(_DP), *wspec),
                (P(), *wspec),
            ),
            "compute": (
                _dptp_compute,
                (normal(_DP_SIZE * rows, d), w1, w2),
                (P(_DP), *wspec),
                (P(dp_tp), P(_DP, _TP), P(dp_tp, None)),
            ),
            "comm": (
                _dptp_comm,
                (normal(n * rows, d), normal(_DP_SIZE * d, hidden), normal(_DP_SIZE * hidden, d)),
                (P(dp_tp), P(_DP, _TP), P(dp_tp, None)),
                (P(_DP), P(None, _TP), P(_TP, None)),
            ),
        }
    if layer in ("ring", "ring_loop"):
        ring, ring_compute, ring_comm = _ring_fns(n, loop=layer == "ring_loop")
        x, w = normal(n * rows, d), normal(d, hidden)
        specs = (P(_AXIS), P(None, _AXIS))
        return {
            **one_axis,
            "full": (ring, (x, w), specs, P(None, _AXIS)),
            "compute": (ring_compute, (normal(n * n * rows, d), w), specs, P(None, _AXIS)),
            "comm": (ring_comm, (x,), (P(_AXIS),), P(_AXIS)),
        }

    if layer == "moe":  # one expert per device, each an MLP d -> hidden -> d
        if rows % n:
            raise SystemExit(f"moe: {rows} rows per device must be a multiple of the {n} experts")
        bucket = (n * n, rows // n, d)  # every device's rows, n buckets of capacity rows / n
        w1, w2 = normal(n, d, hidden), normal(n, hidden, d)
        specs = (P(_AXIS), P(_AXIS), P(_AXIS))
        return {
            **one_axis,
            "full": (_moe, (normal(*bucket), w1, w2), specs, P(_AXIS)),
            "compute": (_moe_compute, (normal(*bucket), w1, w2), specs, P(_AXIS)),
            "comm": (
                _moe_comm,
                (normal(*bucket), normal(*bucket)),
                (P(_AXIS), P(_AXIS)),
                (P(_AXIS), P(_AXIS)),
            ),
        }
    if layer == "decode":
        w1s, w2s = normal(_DECODE_LAYERS, d, hidden), normal(_DECODE_LAYERS, hidden, d)
        w1s, w2s = w1s * np.sqrt(_DECODE_LAYERS / d), w2s * np.sqrt(_DECODE_LAYERS / hidden)
        specs = (P(), P(None, None, _AXIS), P(None, _AXIS, None))
        x = normal(rows, d)
        return {
            **one_axis,
            "full": (_decode, (x, w1s, w2s), specs, P()),
            "compute": (
                lambda x, a, b: _decode(x, a, b, comm=False)[None],
                (x, w1s, w2s),
                specs,
                P(_AXIS),
            ),
            "comm": (_decode_comm, (normal(n * rows, d),), (P(_AXIS),), P(_AXIS)),
        }
    w1, w2 = normal(d, hidden), normal(hidden, d)
    wspec = (P(None, _AXIS), P(_AXIS, None))
    if layer == "tp":
        x = normal(rows, d)
        return {
            **one_axis,
            "full": (_tp, (x, w1, w2), (P(), *wspec), P()),
            "compute": (_tp_compute, (x, w1, w2), (P(), *wspec), P(_AXIS)),
            "comm": (_tp_comm, (normal(n * rows, d),), (P(_AXIS),), P()),
        }
    x = normal(n * rows, d)
    return {
        **one_axis,
        "full": (_sp, (x, w1, w2), (P(_AXIS), *wspec), P(_AXIS)),
        "compute": (_sp_compute, (normal(n * n * rows, d), w1, w2), (P(_AXIS), *wspec), P(_AXIS)),
        "comm": (
            _sp_comm,
            (x, normal(n * n * rows, d)),
            (P(_AXIS), P(_AXIS)),
            (P(_AXIS), P(_AXIS)),
        ),
    }


def _sharded(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def _on_mesh(args, mesh: Mesh, in_specs) -> list[jax.Array]:
    """The inputs already sharded on the mesh, as a model's weights and activations are: timed
    calls then measure the layer, not a host-to-device copy of every input."""
    return [
        jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, in_specs, strict=True)
    ]


def bench_cpu(layers: list[str], sizes: list[tuple[int, int, int]], budget_s: float, repeats: int):
    devices = jax.devices("cpu")
    n = 8 if len(devices) >= 8 else len(devices)
    rng = np.random.default_rng(0)
    rows_out = []
    for layer in layers:
        for rows, d, hidden in sizes:
            if hidden % n and layer != "moe":
                raise SystemExit(f"hidden dim {hidden} must be a multiple of the {n} devices")
            cases = _cases(layer, n, rows, d, hidden, rng)
            shape, axes = cases["mesh"]
            mesh = Mesh(np.array(devices[:n]).reshape(shape), axes)
            fn, args, in_specs, out_specs = cases["full"]
            args = _on_mesh(args, mesh, in_specs)
            base = _sharded(fn, mesh, in_specs, out_specs)
            fast = _sharded(ark.persistent(fn), mesh, in_specs, out_specs)
            err = max_rel_err(fast(*args), base(*args))
            if not err < 1e-4:
                raise SystemExit(f"{layer} {rows}x{d}x{hidden}: ark differs from jax.lax ({err})")
            row = compare(fast, base, *args, repeats=repeats, budget_s=budget_s)
            part_s = {}
            for part in ("compute", "comm"):
                pfn, pargs, pin, pout = cases[part]
                pargs = _on_mesh(pargs, mesh, pin)
                part_fn = _sharded(ark.persistent(pfn), mesh, pin, pout)
                part_s[part] = median_seconds(part_fn, *pargs, warmup=2, iters=max(3, row["iters"]))
                if part == "compute":
                    # XLA's own compute-only time: with ark's compute as fast and every byte
                    # hidden, ark/lax would still be lax_compute / lax.
                    lax_part = _sharded(pfn, mesh, pin, pout)
                    part_s["lax_compute"] = median_seconds(
                        lax_part, *pargs, warmup=2, iters=max(3, row["iters"])
                    )
            rows_out.append(
                {
                    "layer": layer,
                    "size": f"{rows}x{d}x{hidden}",
                    "ark_ms": row["ark_s"] * 1e3,
                    "lax_ms": row["base_s"] * 1e3,
                    **{k: row[k] for k in ("ratio", "ratio_p25", "ratio_p75", "repeats")},
                    "compute_ms": part_s["compute"] * 1e3,
                    "lax_compute_ms": part_s["lax_compute"] * 1e3,
                    "comm_ms": part_s["comm"] * 1e3,
                    "overlap_eff": row["ark_s"] / max(part_s["compute"], part_s["comm"]),
                    "max_rel_err": err,
                }
            )
    return rows_out


def _plan_for_gpu(fn, args, in_specs, out_specs, mesh_axes, workers: int):
    """The plan one rank runs on a GPU (traced inside jax.shard_map over an abstract mesh of
    mesh_axes = (shape, names): nothing runs, no device is needed)."""
    mesh = jax.sharding.AbstractMesh(*mesh_axes)
    box = []

    def body(*local):
        box.append(ark.plan(fn, *local, platform="gpu", num_workers=workers))
        return fn(*local)

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    jax.eval_shape(sharded, *shapes)
    return box[0]


def _rank_inputs(plan, n: int, rng) -> list[list[np.ndarray]]:
    """Random local inputs of every rank (the plan's input shapes and dtypes)."""
    out = []
    for _ in range(n):
        per_rank = []
        for t in plan.args[: plan.num_inputs]:
            spec = plan.tensors[t]
            x = rng.standard_normal(spec.shape) / np.sqrt(
                max(spec.shape[0], 1) if spec.shape else 1
            )
            per_rank.append(x.astype(np_dtype(spec.dtype)))
        out.append(per_rank)
    return out


def bench_gpu(
    layers: list[str], sizes: list[tuple[int, int, int]], n: int, workers: int, iters: int
) -> list[dict]:
    from jax_ark._persistent._gpu_group import group_run, group_time
    from jax_ark._persistent._reference import interpret_group

    rng = np.random.default_rng(0)
    rows_out = []
    for layer in layers:
        for rows, d, hidden in sizes:
            if hidden % n and layer != "moe":
                raise SystemExit(f"hidden dim {hidden} must be a multiple of the {n} ranks")
            cases = _cases(layer, n, rows, d, hidden, rng)
            parts = ("full", "compute", "comm")
            plans = {p: _plan_for_gpu(*cases[p], cases["mesh"], workers) for p in parts}
            inputs = {part: _rank_inputs(plans[part], n, rng) for part in plans}
            got = group_run(plans["full"], [inputs["full"]])[0]
            want = interpret_group(plans["full"], inputs["full"])
            err = max(
                float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))
                for gr, wr in zip(got, want, strict=True)
                for g, w in zip(gr, wr, strict=True)
            )
            if not err < 1e-3:
                raise SystemExit(
                    f"{layer} {rows}x{d}x{hidden}: the GPU differs from the reference ({err})"
                )
            us = {
                part: group_time(plans[part], inputs[part], iters=iters, ranks=n)
                for part in ("full", "compute", "comm")
            }
            rows_out.append(
                {
                    "layer": layer,
                    "size": f"{rows}x{d}x{hidden}",
                    "ranks": n,
                    "workers": workers,
                    "ark_us": us["full"],
                    "compute_us": us["compute"],
                    "comm_us": us["comm"],
                    "serial_us": us["compute"] + us["comm"],
                    "overlap_eff": us["full"] / max(us["compute"], us["comm"]),
                    "max_rel_err": err,
                }
            )
    return rows_out


def _size(text: str) -> tuple[int, int, int]:
    try:
        rows, d, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not RxDxH (e.g. 64x256x1024)") from None
    return rows, d, hidden


_LAYERS = ("tp", "sp", "moe", "dptp", "ring", "ring_loop", "decode")
_GPU_LAYERS = "tp,sp,moe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layers",
        default=None,
        help=f"comma-separated: {', '.join(_LAYERS)} (default: all; with --gpu {_GPU_LAYERS})",
    )
    parser.add_argument(
        "--sizes",
        default="64x256x1024",
        help="comma-separated RxDxH: rows per device, model dim, total hidden dim "
        "(default %(default)s)",
    )
    add_round_arguments(parser, budget_s=0.3, per="case", out_help="folder for the JSON file")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="run the layers on the CUDA executor's single-GPU harness (all ranks on one GPU)",
    )
    parser.add_argument("--ranks", type=int, default=8, help="--gpu: ranks of the group")
    parser.add_argument(
        "--workers", type=int, default=0, help="--gpu: blocks per rank (0: the GPU's SMs / ranks)"
    )
    parser.add_argument("--iters", type=int, default=20, help="--gpu: timed calls per plan")


def run(args: argparse.Namespace) -> int:
    layers = (args.layers or (_GPU_LAYERS if args.gpu else ",".join(_LAYERS))).split(",")
    unknown = sorted(set(layers) - set(_LAYERS))
    if unknown:
        raise SystemExit(f"unknown layers {unknown}; choose from {','.join(_LAYERS)}")
    sizes = [_size(s) for s in args.sizes.split(",")]
    if args.gpu:
        return _run_gpu(args, layers, sizes)
    rows = bench_cpu(layers, sizes, args.budget, args.repeats)
    print(
        f"median of {args.repeats} rounds; IQR: the middle half of the per-round ark/lax ratios; "
        "eff = ark / max(compute, comm) (ark's own compute-only and comm-only runs); lax compute: "
        "the layer without collectives under jax.jit"
    )
    print_table(
        rows,
        [
            ("layer", "layer", "s"),
            ("size", "RxDxH", "s"),
            ("ark_ms", "ark ms", ".3f"),
            ("lax_ms", "lax ms", ".3f"),
            ("ratio", "ark/lax", ".2f"),
            ("ratio_p25", "IQR lo", ".2f"),
            ("ratio_p75", "IQR hi", ".2f"),
            ("compute_ms", "compute ms", ".3f"),
            ("lax_compute_ms", "lax compute", ".3f"),
            ("comm_ms", "comm ms", ".3f"),
            ("overlap_eff", "eff", ".2f"),
        ],
    )
    write_json(args.out / "overlap_cpu.json", {"machine": machine_info(), "rows": rows})
    return 0


def _run_gpu(args: argparse.Namespace, layers: list[str], sizes: list[tuple[int, int, int]]) -> int:
    from jax_ark import _ffi

    module = _ffi.cuda_module()
    if module is None:
        raise SystemExit("--gpu needs jax_ark's CUDA runtime (build with JAX_ARK_CUDA=ON)")
    workers = args.workers or max(1, min(16, module.persistent_max_workers(0) // args.ranks))
    rows = bench_gpu(layers, sizes, args.ranks, workers, args.iters)
    print(
        f"{args.ranks} ranks x {workers} blocks on one GPU, {args.iters} calls per plan; "
        "eff = ark / max(compute, comm) (compute-only plan as independent copies, comm-only plan)"
    )
    print_table(
        rows,
        [
            ("layer", "layer", "s"),
            ("size", "RxDxH", "s"),
            ("ark_us", "ark us", ".1f"),
            ("compute_us", "compute us", ".1f"),
            ("comm_us", "comm us", ".1f"),
            ("serial_us", "compute+comm", ".1f"),
            ("overlap_eff", "eff", ".2f"),
        ],
    )
    write_json(args.out / "overlap_gpu.json", {"machine": machine_info(), "rows": rows})
    return 0
