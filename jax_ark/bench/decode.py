"""`python -m jax_ark.bench decode`: one GPT-style KV-cache decode step, ark.persistent vs jax.jit.

The step: token id -> embedding gather, L pre-norm blocks (RMSNorm, q/k/v projections, the new
K / V row written into each layer's cache at `pos` with dynamic_update_slice, attention over the
filled prefix, output projection, RMSNorm, GELU MLP of width 4d), final RMSNorm, logits against
the tied embedding (`y @ embed.T`), greedy argmax. Layers are a Python loop (unrolled). bfloat16
weights, activations and cache; the caches are donated, so both executors update them in place.
Configurations are DxLxB (width, layers, batch); defaults 1024x8x1,1024x8x8. The vocabulary is
small (--vocab, default 4096; GPT-2's is 50257) and the cache holds --cache-len positions (default
256), the step writing at position cache_len / 2.

Two forms (--forms, default both): `generate`, what users write for deep models and the default
measured first: ONE call generating --tokens tokens (default 16), a `fori_loop` over tokens
around a `lax.scan` over the layers' stacked weights and stacked caches (L, B, T, d), the caches
passed through the layers scan as xs and re-stacked as ys; both executors update the donated
caches in place (ark: one window store per token and layer). `step`: one decode step with the
layers a Python loop (unrolled), called once per token.

Before timing, ark's next tokens must equal jax.jit's on the same inputs. Each configuration is
timed in --repeats rounds (median and the ratio's IQR); tokens/s = batch x tokens per call /
time per call. On a GPU
the table also gives the weight-bytes floor (weight bytes / copy bandwidth measured in the same
run). Writes decode_{gpu,cpu}.{json,png}.
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
from jax_ark.bench._timing import compare
from jax_ark.bench.persistent import copy_bandwidth

CONFIGS = ((1024, 8, 1), (1024, 8, 8))
FORMS = ("generate", "step")


def _rms(v, g):
    v32 = v.astype(jnp.float32)
    return (v32 * jax.lax.rsqrt(jnp.mean(v32 * v32, -1, keepdims=True) + 1e-6)).astype(v.dtype) * g


def decode_step(params, cache, token, pos):
    """Next token ids (batch,) and the caches with this step's K / V rows written at `pos`."""
    x = params["embed"][token]
    d = x.shape[-1]
    ks, vs = [], []
    for layer, p in enumerate(params["layers"]):
        h = _rms(x, p["g1"])
        q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
        kc = jax.lax.dynamic_update_slice(cache["k"][layer], k[:, None, :], (0, pos, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"][layer], v[:, None, :], (0, pos, 0))
        ks.append(kc)
        vs.append(vc)
        s = jnp.einsum("bd,btd->bt", q, kc).astype(jnp.float32) / np.float32(np.sqrt(d))
        s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
        a = jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1).astype(x.dtype), vc)
        x = x + a @ p["wo"]
        x = x + jax.nn.gelu(_rms(x, p["g2"]) @ p["w1"]) @ p["w2"]
    logits = _rms(x, params["gf"]) @ params["embed"].T
    return jnp.argmax(logits, -1).astype(jnp.int32), {"k": ks, "v": vs}


def _layer(pos):
    """One pre-norm block for lax.scan over (stacked weights, K cache slice, V cache slice)."""

    def layer(x, xs):
        p, kc, vc = xs
        d = x.shape[-1]
        h = _rms(x, p["g1"])
        q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
        kc = jax.lax.dynamic_update_slice(kc, k[:, None, :], (0, pos, 0))
        vc = jax.lax.dynamic_update_slice(vc, v[:, None, :], (0, pos, 0))
        s = jnp.einsum("bd,btd->bt", q, kc).astype(jnp.float32) / np.float32(np.sqrt(d))
        s = jnp.where(jnp.arange(kc.shape[1])[None, :] <= pos, s, -jnp.inf)
        a = jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1).astype(x.dtype), vc)
        x = x + a @ p["wo"]
        x = x + jax.nn.gelu(_rms(x, p["g2"]) @ p["w1"]) @ p["w2"]
        return x, (kc, vc)

    return layer


def generator(tokens: int):
    """generate(params, cache, token, pos): greedy decoding of `tokens` tokens from position pos
    in ONE function: a fori_loop over tokens around a lax.scan over the stacked layers (weights
    params["layers"][name] and caches cache["k"] / cache["v"] of shape (L, B, T, d)). Returns the
    tokens (B, tokens) and the caches."""

    def generate(params, cache, token, pos):
        def body(i, c):
            tok, kcs, vcs, out = c
            x = params["embed"][tok]
            x, (kcs, vcs) = jax.lax.scan(_layer(pos + i), x, (params["layers"], kcs, vcs))
            logits = _rms(x, params["gf"]) @ params["embed"].T
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            return tok, kcs, vcs, jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))

        out = jnp.zeros((token.shape[0], tokens), jnp.int32)
        init = (token, cache["k"], cache["v"], out)
        _, kcs, vcs, out = jax.lax.fori_loop(0, tokens, body, init)
        return out, {"k": kcs, "v": vcs}

    return generate


def stacked(params, cache):
    """The parameters and caches with the layers stacked on a leading axis (generate's form)."""
    layers = jax.tree.map(lambda *w: jnp.stack(w), *params["layers"])
    return params | {"layers": layers}, {k: jnp.stack(v) for k, v in cache.items()}


def make_inputs(d: int, layers: int, batch: int, vocab: int, cache_len: int, seed: int = 0):
    """Random bfloat16 parameters and caches (made on the default device), token ids, position."""
    keys = iter(jax.random.split(jax.random.key(seed), 8 * layers + 4))
    dt = jnp.bfloat16

    def w(*shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[0])).astype(dt)

    params = {
        "embed": jax.random.normal(next(keys), (vocab, d), jnp.float32).astype(dt),
        "gf": jnp.ones(d, dt),
        "layers": [
            {
                "g1": jnp.ones(d, dt),
                "g2": jnp.ones(d, dt),
                "wq": w(d, d),
                "wk": w(d, d),
                "wv": w(d, d),
                "wo": w(d, d),
                "w1": w(d, 4 * d),
                "w2": w(4 * d, d),
            }
            for _ in range(layers)
        ],
    }
    cache = {
        name: [
            jax.random.normal(next(keys), (batch, cache_len, d), jnp.float32).astype(dt)
            for _ in range(layers)
        ]
        for name in ("k", "v")
    }
    token = jax.random.randint(next(keys), (batch,), 0, vocab, jnp.int32)
    return params, cache, token, np.int32(cache_len // 2)


def _carrying_cache(fn, cache):
    """step(params, token, pos) -> next tokens, passing fn the cache its previous call returned."""
    state = {"cache": cache}

    def step(params, token, pos):
        tok, state["cache"] = fn(params, state["cache"], token, pos)
        return tok

    return step


def weight_bytes(params) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def bench(
    configs,
    vocab: int,
    cache_len: int,
    budget_s: float,
    repeats: int,
    on_gpu: bool,
    forms=FORMS,
    tokens: int = 16,
) -> tuple[list[dict[str, Any]], float | None]:
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(device) if on_gpu else None
    if cache_len // 2 + tokens > cache_len:
        raise ValueError(f"--tokens {tokens} do not fit the cache from position {cache_len // 2}")
    rows = []
    work = [(form, c) for c in configs for form in forms]
    for form, (d, layers, batch) in tqdm(work, desc="decode", unit="config"):
        with jax.default_device(device):
            params, cache, token, pos = make_inputs(d, layers, batch, vocab, cache_len)
        fn, per_call = decode_step, 1
        if form == "generate":
            params, cache = stacked(params, cache)
            fn, per_call = generator(tokens), tokens
        xla_fn = jax.jit(fn, donate_argnums=1)
        ark_fn = jax.jit(ark.persistent(fn), donate_argnums=1)
        copy = lambda c: jax.tree.map(jnp.copy, c)  # noqa: E731  (donation consumes the cache)
        want_tok, _ = xla_fn(params, copy(cache), token, pos)
        got_tok, _ = ark_fn(params, copy(cache), token, pos)
        if not np.array_equal(np.asarray(got_tok), np.asarray(want_tok)):
            raise AssertionError(
                f"ark.persistent's tokens differ from jax.jit's ({form}) at d={d} L={layers} "
                f"b={batch}: {np.asarray(got_tok)} vs {np.asarray(want_tok)}"
            )
        # Each call donates the cache it gets and returns the updated one, which the next call
        # takes: the state carried through timing, as in a generation loop.
        t = compare(
            _carrying_cache(ark_fn, copy(cache)),
            _carrying_cache(xla_fn, copy(cache)),
            params,
            token,
            pos,
            repeats=repeats,
            budget_s=budget_s,
        )
        nbytes = weight_bytes(params)
        row = {
            "form": form,
            "tokens_per_call": per_call,
            "d": d,
            "layers": layers,
            "batch": batch,
            "vocab": vocab,
            "cache_len": cache_len,
            "weight_mib": nbytes / 2**20,
            "ark_us": 1e6 * t["ark_s"],
            "xla_us": 1e6 * t["base_s"],
            "ark_tok_s": batch * per_call / t["ark_s"],
            "xla_tok_s": batch * per_call / t["base_s"],
            "ratio": t["ratio"],
            "ratio_p25": t["ratio_p25"],
            "ratio_p75": t["ratio_p75"],
            "repeats": repeats,
        }
        if bandwidth:
            floor = nbytes / bandwidth
            row |= {
                "floor_us": 1e6 * floor,
                "ark_pct_floor": 100 * floor / t["ark_s"],
                "xla_pct_floor": 100 * floor / t["base_s"],
            }
        rows.append(row)
    return rows, bandwidth


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, axes = new_figure()
    ax = axes[0][0]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["xla_tok_s"] for r in rows], 0.4, label="jax.jit")
    ax.bar(xs + 0.2, [r["ark_tok_s"] for r in rows], 0.4, label="ark.persistent")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(
            f"time {r['ratio']:.2f}x\n[{r['ratio_p25']:.2f}, {r['ratio_p75']:.2f}]",
            (x + 0.2, r["ark_tok_s"]),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(
        xs, [f"{r['form']}\nd={r['d']} L={r['layers']}\nb={r['batch']}" for r in rows], fontsize=8
    )
    ax.margins(y=0.25)
    ax.set_ylabel("tokens / s (median of rounds)")
    ax.set_title(f"{title}\nlabels: ark/jit time per call, median [IQR]", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=None,
        help="comma-separated DxLxB (width x layers x batch), default 1024x8x1,1024x8x8",
    )
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (default %(default)s)")
    parser.add_argument(
        "--cache-len", type=int, default=256, help="KV cache positions (default %(default)s)"
    )
    parser.add_argument(
        "--forms",
        type=lambda v: tuple(v.split(",")),
        default=FORMS,
        help="comma-separated: generate (tokens x scanned layers in one call), step (one "
        "unrolled decode step per call); default %(default)s",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per generate call (default 16, fewer if the cache has not that many "
        "positions after cache_len / 2)",
    )
    add_round_arguments(parser, budget_s=0.5)


def run(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    for form in args.forms:
        if form not in FORMS:
            raise SystemExit(f"--forms: unknown form {form!r} (known: {', '.join(FORMS)})")
    if args.tokens is None:
        args.tokens = min(16, args.cache_len - args.cache_len // 2)
    rows, bandwidth = bench(
        args.configs or CONFIGS,
        args.vocab,
        args.cache_len,
        args.budget,
        args.repeats,
        on_gpu,
        args.forms,
        args.tokens,
    )
    print(
        f"decode ({args.tokens} tokens per generate call), bf16, vocab {args.vocab}, "
        f"cache {args.cache_len} on {device.device_kind}; "
        f"median of {args.repeats} rounds, IQR of the ark/jit time ratio"
        + (f"; copy bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else "")
    )
    columns = [
        ("form", "form", "s"),
        ("d", "d", "d"),
        ("layers", "L", "d"),
        ("batch", "b", "d"),
        ("xla_us", "jax.jit us", ".0f"),
        ("ark_us", "ark us", ".0f"),
        ("xla_tok_s", "jit tok/s", ".1f"),
        ("ark_tok_s", "ark tok/s", ".1f"),
        ("ratio", "ark/jit", ".2f"),
        ("ratio_p25", "IQR lo", ".2f"),
        ("ratio_p75", "IQR hi", ".2f"),
    ]
    if on_gpu:
        columns += FLOOR_COLUMNS
    print_table(rows, columns)
    name = "decode_gpu" if on_gpu else "decode_cpu"
    write_json(
        args.out / f"{name}.json",
        {"machine": machine_info(), "copy_bandwidth_Bps": bandwidth, "rows": rows},
    )
    plot(rows, args.out / f"{name}.png", f"KV-cache decode, bf16, {device.device_kind}")
    return 0
