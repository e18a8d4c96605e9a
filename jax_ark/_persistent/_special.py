"""Special functions inside ark.persistent, written with the plan's opcodes (no opcode computes
them; XLA too expands them before its backends see them). A 16-bit input is widened to float32 and
the result rounded once, as XLA does.

- lgamma, digamma: Lanczos' approximation with g = 7 and 9 terms (Godfrey's coefficients),
  reflected through Euler's formula below 1/2, the steps of XLA's expansion: within a few float32
  ulps of jax.jit away from the zeros of lgamma (x = 1, 2) and the poles, not bit for bit.
- asin, acos, asinh, acosh, atanh: through atan2, log1p and sqrt in forms that keep their accuracy
  near 0 and +-1 and do not overflow for large |x|.
- nextafter: integer steps of the float32 bits (of bfloat16's top 16 bits; of float16's own), exact.
- population_count, clz, mulhi of integers: bit manipulation with the integer opcodes (SWAR
  counting, a binary search, 16-bit partial products), exact.
- bitcast_convert_type between 16-bit dtypes: a bfloat16's bits are its float32 register's top
  half; a float16's are assembled from (or taken apart into) sign, exponent and mantissa, exact.
"""

from __future__ import annotations

import math

import numpy as np

from jax_ark._persistent._trace import _atan2, _Builder, _convert, _copysign, _Node, _Ops

UNARY = frozenset({"lgamma", "digamma", "asin", "acos", "asinh", "acosh", "atanh"})
BINARY = frozenset({"nextafter"})
INTEGER = frozenset({"population_count", "clz", "mulhi"})
_SQRT_MAX = float(np.sqrt(np.finfo(np.float32).max))  # past it, x * x overflows

_G = 7.0  # Lanczos' g: t(z) = z + g + 1/2
_BASE = 0.99999999999980993227684700473478
_COEFFICIENTS = (
    676.520368121885098567009190444019, -1259.13921672240287047156078755283,
    771.3234287776530788486528258894, -176.61502916214059906584551354,
    12.507343278686904814458936853, -0.13857109526572011689554707,
    9.984369578019570859563e-6, 1.50563273514931155834e-7,
)  # fmt: skip


def translate_special(b: _Builder, prim: str, args: list[_Node], out_shape, out_dtype: str):
    if prim == "nextafter":
        return _nextafter(b, args[0], args[1], tuple(out_shape), out_dtype)
    x = args[0]
    f = _Ops(b, x.shape)
    x = _convert(b, x, "float32")
    if prim in ("asin", "acos"):
        y = _asin(b, f, x) if prim == "asin" else _acos(b, f, x)
    else:
        y = {
            "lgamma": _lgamma, "digamma": _digamma, "asinh": _asinh, "acosh": _acosh,
            "atanh": _atanh,
        }[prim](f, x)  # fmt: skip
    return _convert(b, y, out_dtype)


def _lanczos_terms(f: _Ops, x: _Node):
    """(reflect, z, t, log t): x < 1/2 is computed at 1 - x (z = -x), else at x (z = x - 1);
    t = z + g + 1/2, its log as log(g + 1/2) + log1p(z / (g + 1/2)) (accurate for small z)."""
    const = f.const
    reflect = f("lt", x, const(0.5), dtype="bool")
    z = f.where(reflect, f("neg", x), f("sub", x, const(1.0)))
    t = f("add", z, const(_G + 0.5))
    log_t = f("add", const(math.log(_G + 0.5)), f("log1p", f("div", z, const(_G + 0.5))))
    return reflect, z, t, log_t


def _lgamma(f: _Ops, x: _Node) -> _Node:
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


def _digamma(f: _Ops, x: _Node) -> _Node:
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


def _one_minus_square(f: _Ops, x: _Node) -> _Node:
    """1 - x^2 as (1 - x)(1 + x): no cancellation near |x| = 1."""
    one = f.const(1.0)
    return f("mul", f("sub", one, x), f("add", one, x))


def _asin(b: _Builder, f: _Ops, x: _Node) -> _Node:
    """asin(x) = 2 atan2(x, 1 + sqrt(1 - x^2)): NaN beyond [-1, 1] from the sqrt."""
    root = f("sqrt", _one_minus_square(f, x))
    half = _atan2(b, x, f("add", f.const(1.0), root), f.shape, "float32")
    return f("mul", f.const(2.0), half)


def _acos(b: _Builder, f: _Ops, x: _Node) -> _Node:
    """acos(x) = 2 atan2(sqrt(1 - x^2), 1 + x), and pi at x = -1 (atan2(0, 0) would give 0)."""
    root = f("sqrt", _one_minus_square(f, x))
    half = _atan2(b, root, f("add", f.const(1.0), x), f.shape, "float32")
    at_minus_one = f("eq", x, f.const(-1.0), dtype="bool")
    return f.where(at_minus_one, f.const(math.pi), f("mul", f.const(2.0), half))


def _asinh(f: _Ops, x: _Node) -> _Node:
    """sign(x) log1p(a + a^2 / (1 + sqrt(1 + a^2))) for a = |x| (accurate near 0), and
    log(a) + log 2 past sqrt(float max) (a^2 overflows there); asinh(-0) = -0."""
    const = f.const
    a = f("abs", x)
    a2 = f("mul", a, a)
    near = f(
        "log1p",
        f("add", a, f("div", a2, f("add", const(1.0), f("sqrt", f("add", const(1.0), a2))))),
    )
    far = f("add", f("log", a), const(math.log(2.0)))
    y = f.where(f("ge", a, const(_SQRT_MAX), dtype="bool"), far, near)
    return _copysign(f.b, y, x)


def _acosh(f: _Ops, x: _Node) -> _Node:
    """log1p(t + sqrt(t (t + 2))) for t = x - 1 (accurate near 1), log(x) + log 2 past
    sqrt(float max); NaN below 1 (from the sqrt, and explicitly for x < -1)."""
    const = f.const
    t = f("sub", x, const(1.0))
    near = f("log1p", f("add", t, f("sqrt", f("mul", t, f("add", t, const(2.0))))))
    far = f("add", f("log", x), const(math.log(2.0)))
    y = f.where(f("ge", x, const(_SQRT_MAX), dtype="bool"), far, near)
    return f.where(f("lt", x, const(1.0), dtype="bool"), const(np.nan), y)


def _atanh(f: _Ops, x: _Node) -> _Node:
    """(log1p(x) - log1p(-x)) / 2: accurate near 0, +-inf at +-1, NaN beyond."""
    const = f.const
    y = f("mul", f("sub", f("log1p", x), f("log1p", f("neg", x))), const(0.5))
    return f.where(f("gt", f("abs", x), const(1.0), dtype="bool"), const(np.nan), y)


def _nextafter(b: _Builder, x: _Node, y: _Node, shape: tuple, out_dtype: str) -> _Node:
    """The representable value after x towards y (lax.nextafter, C's nextafter): x's bits one step
    towards y (+1 away from zero, -1 towards it); from +-0 the smallest subnormal with y's sign;
    y when x == y; NaN when either is. bfloat16 values sit in a float32 register's top 16 bits,
    so their step is 2^16; float16 steps its own 16 bits (bitcast16's helpers)."""
    f = _Ops(b, shape)
    x, y = _convert(b, x, "float32"), _convert(b, y, "float32")
    away = f(
        "eq", f("lt", x, y, dtype="bool"), f("gt", x, f.const(0.0), dtype="bool"), dtype="bool"
    )
    is_zero = f.is_zero(x)
    if out_dtype == "float16":
        u = _Ops(b, shape, "uint32")
        hx, hy = (
            _half_bits(b, u, _convert(b, x, "float16")),
            _half_bits(b, u, _convert(b, y, "float16")),
        )
        stepped = u.where(away, u("iadd", hx, u.const(1)), u("isub", hx, u.const(1)))
        from_zero = u("or", u("and", hy, u.const(0x8000)), u.const(1))
        result = _float16_value(b, u, u.where(is_zero, from_zero, stepped))
    else:
        unit = 1 << 16 if out_dtype == "bfloat16" else 1
        i = _Ops(b, shape, "int32")
        stepped = i("iadd", i("bitcast", x), i("select", away, i.const(-unit), i.const(unit)))
        from_zero = i("or", i("and", i("bitcast", y), i.const(-(2**31))), i.const(unit))
        result = i("bitcast", i("select", is_zero, stepped, from_zero), dtype="float32")
    result = f.where(f("eq", x, y, dtype="bool"), y, result)
    either_nan = f("max", f("ne", x, x, dtype="bool"), f("ne", y, y, dtype="bool"), dtype="bool")
    result = f.where(either_nan, f.const(np.nan), result)
    return _convert(b, result, out_dtype)


def translate_integer(b: _Builder, prim: str, args: list[_Node], out_shape, out_dtype: str):
    shape = tuple(out_shape)
    u = _Ops(b, shape, "uint32")
    bits = [u("imov", a) for a in args]
    width = 8 * np.dtype(args[0].dtype).itemsize
    signed = out_dtype.startswith("int")
    if prim == "mulhi":
        if width == 32:
            y = _mulhi(u, *bits, signed=signed)
        else:  # the product fits 32 bits: its bits above the width
            y = u("shra" if signed else "shrl", u("imul", *bits), u.const(width))
        return u("imov", y, dtype=out_dtype)
    # Counts over the value's own bits, not its register's extension above a narrow width.
    value = bits[0] if width == 32 else u("and", bits[0], u.const((1 << width) - 1))
    if prim == "population_count":
        y = _population_count(u, value)
    else:
        y = _count_leading_zeros(u, value)
        if width < 32:  # the zeros above the width are not the value's
            y = u("isub", y, u.const(32 - width))
    return u("imov", y, dtype=out_dtype)


def _population_count(u: _Ops, x: _Node) -> _Node:
    """Bits set, summed in place: pairs, nibbles, bytes, then the four bytes by one multiply."""
    c = u.const
    x = u("isub", x, u("and", u("shrl", x, c(1)), c(0x55555555)))
    x = u("iadd", u("and", x, c(0x33333333)), u("and", u("shrl", x, c(2)), c(0x33333333)))
    x = u("and", u("iadd", x, u("shrl", x, c(4))), c(0x0F0F0F0F))
    return u("shrl", u("imul", x, c(0x01010101)), c(24))


def _count_leading_zeros(u: _Ops, x: _Node) -> _Node:
    """A binary search: where the top `width` bits are zero, count them and shift them out (16,
    8, 4, 2, 1); 31 is counted for 0 with x still 0, which adds the 32nd."""
    count = u.const(0)
    for width in (16, 8, 4, 2, 1):
        top_clear = u.is_zero(u("shrl", x, u.const(32 - width)))
        count = u.where(top_clear, u("iadd", count, u.const(width)), count)
        x = u.where(top_clear, u("shl", x, u.const(width)), x)
    return u("iadd", count, u.where(u.is_zero(x), u.const(1), u.const(0)))


def _mulhi(u: _Ops, x: _Node, y: _Node, signed: bool) -> _Node:
    """The high 32 bits of the 64-bit product, from 16-bit halves: the products of the halves
    and the carry out of the low word; signed as unsigned minus (x < 0 ? y : 0) and (y < 0 ? x :
    0) (two's complement, mod 2^32)."""
    c = u.const
    x1, x0 = u("shrl", x, c(16)), u("and", x, c(0xFFFF))
    y1, y0 = u("shrl", y, c(16)), u("and", y, c(0xFFFF))
    low, cross1, cross2 = u("imul", x0, y0), u("imul", x1, y0), u("imul", x0, y1)
    carry = u(
        "shrl",
        u("iadd", u("iadd", u("shrl", low, c(16)), u("and", cross1, c(0xFFFF))),
          u("and", cross2, c(0xFFFF))),
        c(16),
    )  # fmt: skip
    high = u(
        "iadd", u("imul", x1, y1), u("iadd", u("shrl", cross1, c(16)), u("shrl", cross2, c(16)))
    )
    high = u("iadd", high, carry)
    if signed:
        for a, other in ((x, y), (y, x)):
            negative = u("ilt", a, u.const(0), dtype="bool")  # the bits read as signed
            high = u("isub", high, u.where(negative, other, c(0)))
    return high


def bitcast16(b: _Builder, x: _Node, dtype: str) -> _Node:
    """lax.bitcast_convert_type between bfloat16, float16, int16 and uint16 (x's dtype differs)."""
    shape = x.shape
    u = _Ops(b, shape, "uint32")
    if x.dtype in ("int16", "uint16"):
        bits = u("and", u("imov", x), u.const(0xFFFF))
    else:
        bits = _half_bits(b, u, x)
    if dtype in ("int16", "uint16"):
        return u("imov", bits, dtype=dtype)  # wraps / extends to the dtype
    if dtype == "bfloat16":  # its bits are a float32's top half
        value = u("bitcast", u("shl", bits, u.const(16)), dtype="float32")
    else:
        value = _float16_value(b, u, bits)
    return _convert(b, value, dtype)


def _half_bits(b: _Builder, u: _Ops, x: _Node) -> _Node:
    """The 16 bits (in a uint32) of a bfloat16 / float16 value held exactly in a float32."""
    shape = x.shape
    f32 = u("bitcast", _convert(b, x, "float32"))
    if x.dtype == "bfloat16":
        return u("shrl", f32, u.const(16))
    sign = u("and", u("shrl", f32, u.const(16)), u.const(0x8000))
    exponent = u("and", u("shrl", f32, u.const(23)), u.const(0xFF))
    mantissa = u("shrl", u("and", f32, u.const(0x7FFFFF)), u.const(13))
    normal = u("or", u("shl", u("isub", exponent, u.const(112)), u.const(10)), mantissa)
    # Subnormal (and zero): |x| * 2^24 is the 10-bit mantissa, an exact integer.
    f = _Ops(b, shape)
    magnitude = f("abs", _convert(b, x, "float32"))
    small = u("f2u", f("mul", magnitude, f.const(2.0**24)))
    special = u("or", u.const(0x7C00), mantissa)  # inf / NaN (the payload's top 10 bits)
    is_small = u("ult", exponent, u.const(113), dtype="bool")
    is_special = u("ieq", exponent, u.const(0xFF), dtype="bool")
    return u("or", sign, u.where(is_special, special, u.where(is_small, small, normal)))


def _float16_value(b: _Builder, u: _Ops, h: _Node) -> _Node:
    """The float32 value of float16 bits h (in a uint32): exact, NaN payloads kept."""
    shape = h.shape
    sign = u("shl", u("and", h, u.const(0x8000)), u.const(16))
    exponent = u("and", u("shrl", h, u.const(10)), u.const(0x1F))
    mantissa = u("and", h, u.const(0x3FF))
    normal = u("or", u("shl", u("iadd", exponent, u.const(112)), u.const(23)),
               u("shl", mantissa, u.const(13)))  # fmt: skip
    special = u("or", u.const(0x7F800000), u("shl", mantissa, u.const(13)))
    f = _Ops(b, shape)
    small = f("mul", u("u2f", mantissa, dtype="float32"), f.const(2.0**-24))
    is_small = u.is_zero(exponent)
    is_special = u("ieq", exponent, u.const(0x1F), dtype="bool")
    magnitude = u.where(is_special, special, normal)
    magnitude = u.where(is_small, u("bitcast", small), magnitude)
    return u("bitcast", u("or", sign, magnitude), dtype="float32")
