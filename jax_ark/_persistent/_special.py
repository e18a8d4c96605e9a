"""lgamma and digamma inside ark.persistent, written with the plan's float32 opcodes.

No opcode computes them: like XLA (which expands both before its backends see them), they are
Lanczos' approximation with g = 7 and 9 terms (Godfrey's coefficients), reflected through Euler's
formula below 1/2. The steps follow XLA's expansion, so results agree with jax.jit to a few
float32 ulps away from the zeros of lgamma (x = 1, 2) and the poles, not bit for bit: a 16-bit
input is widened to float32 and the result rounded once, as XLA does.
"""

from __future__ import annotations

import math

import numpy as np

from jax_ark._persistent._trace import _Builder, _convert, _Imm, _Node, _round_to_integer

SPECIAL = frozenset({"lgamma", "digamma"})

_G = 7.0  # Lanczos' g: t(z) = z + g + 1/2
_BASE = 0.99999999999980993227684700473478
_COEFFICIENTS = (
    676.520368121885098567009190444019, -1259.13921672240287047156078755283,
    771.3234287776530788486528258894, -176.61502916214059906584551354,
    12.507343278686904814458936853, -0.13857109526572011689554707,
    9.984369578019570859563e-6, 1.50563273514931155834e-7,
)  # fmt: skip


class _Float32:
    """Elementwise float32 ops over one shape: the builder calls, short enough to read as math."""

    def __init__(self, b: _Builder, shape: tuple[int, ...]):
        self.b, self.shape = b, shape

    def __call__(self, name: str, *args: _Node, dtype: str = "float32") -> _Node:
        return self.b.elementwise(name, list(args), self.shape, dtype)

    @staticmethod
    def const(value: float) -> _Node:
        return _Imm((), "float32", value=float(value))

    def where(self, pred: _Node, if_true: _Node, if_false: _Node) -> _Node:
        return self("select", pred, if_false, if_true)  # select_n(pred, on_false, on_true)

    def floor(self, x: _Node) -> _Node:
        return _round_to_integer(self.b, "floor", x, 0, "float32")

    def is_finite(self, x: _Node) -> _Node:
        return self("lt", self("abs", x), self.const(np.inf), dtype="bool")


def translate_special(b: _Builder, prim: str, x: _Node, out_dtype: str) -> _Node:
    f = _Float32(b, x.shape)
    x = _convert(b, x, "float32")
    y = _lgamma(f, x) if prim == "lgamma" else _digamma(f, x)
    return _convert(b, y, out_dtype)


def _lanczos_terms(f: _Float32, x: _Node):
    """(reflect, z, t, log t): x < 1/2 is computed at 1 - x (z = -x), else at x (z = x - 1);
    t = z + g + 1/2, its log as log(g + 1/2) + log1p(z / (g + 1/2)) (accurate for small z)."""
    const = f.const
    reflect = f("lt", x, const(0.5), dtype="bool")
    z = f.where(reflect, f("neg", x), f("sub", x, const(1.0)))
    t = f("add", z, const(_G + 0.5))
    log_t = f("add", const(math.log(_G + 0.5)), f("log1p", f("div", z, const(_G + 0.5))))
    return reflect, z, t, log_t


def _lgamma(f: _Float32, x: _Node) -> _Node:
    const = f.const
    reflect, z, t, log_t = _lanczos_terms(f, x)
    series = const(_BASE)
    for i, c in enumerate(_COEFFICIENTS):
        series = f("add", series, f("div", const(c), f("add", z, const(i + 1))))
    # (z + 1/2) log t - t as (z + 1/2 - t / log t) log t: no overflow of the product for large z.
    log_y = f(
        "add",
        f("add", const(0.5 * math.log(2 * math.pi)),
          f("mul", f("sub", f("add", z, const(0.5)), f("div", t, log_t)), log_t)),
        f("log", series),
    )  # fmt: skip
    # Reflection: lgamma(x) = log pi - log|sin(pi x)| - lgamma(1 - x). |sin(pi x)| has period 1
    # and is symmetric about 1/2, so it is taken at the fractional part of |x| folded below 1/2:
    # exact zeros at the integers (poles: +inf) and no precision lost to pi * x for large |x|.
    mag = f("abs", x)
    frac = f("sub", mag, f.floor(mag))
    folded = f.where(f("gt", frac, const(0.5), dtype="bool"), f("sub", const(1.0), frac), frac)
    log_sin = f("log", f("sin", f("mul", const(math.pi), folded)))
    reflection = f.where(
        f.is_finite(log_sin),
        f("sub", f("sub", const(math.log(math.pi)), log_sin), log_y),
        f("neg", log_sin),  # a pole: +inf, not inf - inf
    )
    result = f.where(reflect, reflection, log_y)
    is_inf = f("eq", mag, const(np.inf), dtype="bool")
    return f.where(is_inf, const(np.inf), result)  # lgamma(+-inf) = +inf


def _digamma(f: _Float32, x: _Node) -> _Node:
    const = f.const
    reflect, z, t, log_t = _lanczos_terms(f, x)
    # digamma(z + 1) = log t + A'(z) / A(z) - g / t, A the Lanczos series.
    series, derivative = const(_BASE), const(0.0)
    for i, c in enumerate(_COEFFICIENTS):
        shifted = f("add", z, const(i + 1))
        series = f("add", series, f("div", const(c), shifted))
        derivative = f("sub", derivative, f("div", const(c), f("mul", shifted, shifted)))
    y = f("sub", f("add", log_t, f("div", derivative, series)), f("div", const(_G), t))
    # Reflection: digamma(x) = digamma(1 - x) - pi cot(pi x), with x moved into [-1/2, 1/2] first
    # (pi x loses precision far from 0).
    near = f("add", x, f("abs", f.floor(f("add", x, const(0.5)))))
    angle = f("mul", const(math.pi), near)
    cot = f("div", f("cos", angle), f("sin", angle))
    result = f.where(reflect, f("sub", y, f("mul", const(math.pi), cot)), y)
    pole = f(
        "mul",
        f("le", x, const(0.0), dtype="bool"),
        f("eq", x, f.floor(x), dtype="bool"),
        dtype="bool",
    )  # bool and: 1 * 1
    return f.where(pole, const(np.nan), result)  # poles at 0, -1, -2, ...: NaN
