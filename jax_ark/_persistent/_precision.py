"""lax.reduce_precision inside ark.persistent, written in jax.numpy integer ops on the value's bits
(the rounding XLA's elemental emitter does, bit for bit): round the mantissa to `mantissa_bits`
(to nearest, ties to even, carrying into the exponent), then flush what the reduced exponent range
cannot hold (overflow to a signed infinity, underflow to a signed zero: no denormals); NaNs pass
unchanged. Computed on the operand's own format (float32, bfloat16 or float16): a float16
denormal is rounded as float16 rounds it, not as its float32 image would be."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr

from jax_ark._persistent._algorithm import jaxpr_over

# (total bits, exponent bits, mantissa bits) of each float format
_FORMATS = {"float32": (32, 8, 23), "bfloat16": (16, 8, 7), "float16": (16, 5, 10)}


def reduce_precision(x, exponent_bits: int, mantissa_bits: int):
    width, exp_bits, man_bits = _FORMATS[np.dtype(x.dtype).name]
    unsigned = jnp.uint32 if width == 32 else jnp.uint16
    bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if mantissa_bits < man_bits:
        shift = man_bits - mantissa_bits
        last_bit = (bits >> shift) & 1  # the lowest kept bit: ties go to make it 0
        bias = last_bit + np.uint32((1 << (shift - 1)) - 1)
        bits = (bits + bias) & np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)
    if exponent_bits < exp_bits:
        exp_mask = np.uint32(((1 << exp_bits) - 1) << man_bits)
        sign = bits & np.uint32(1 << (width - 1))
        exponent = bits & exp_mask
        bias, reduced_bias = (1 << (exp_bits - 1)) - 1, (1 << (exponent_bits - 1)) - 1
        overflows = exponent > np.uint32((bias + reduced_bias) << man_bits)
        underflows = exponent <= np.uint32((bias - reduced_bias) << man_bits)
        bits = jnp.where(overflows, sign | exp_mask, jnp.where(underflows, sign, bits))
    rounded = lax.bitcast_convert_type(bits.astype(unsigned), x.dtype)
    return jnp.where(jnp.isnan(x), x, rounded)


def jaxpr_of(eqn) -> ClosedJaxpr:
    e, m = int(eqn.params["exponent_bits"]), int(eqn.params["mantissa_bits"])
    return jaxpr_over(lambda x: reduce_precision(x, e, m), [v.aval for v in eqn.invars])
