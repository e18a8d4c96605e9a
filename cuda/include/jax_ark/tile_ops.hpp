// Portable scalar math of the persistent-kernel plan (docs/plan_format.md, "Programs").
//
// Shared by the CPU executor and the CUDA executor so both round, load, store and evaluate opcodes
// the same way. Only <math.h>-level functions; every function ARK_HD.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "jax_ark/plan_format.hpp"

namespace jax_ark::plan {

ARK_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
ARK_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// ---- bfloat16: upper 16 bits of a float32, round to nearest even --------------------------------
ARK_HD uint16_t f32_to_bf16(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
ARK_HD float bf16_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// ---- IEEE half, round to nearest even -------------------------------------------------------------
ARK_HD uint16_t f32_to_f16(float x) {
  uint32_t u = float_bits(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7FFFFFFFu;
  // NaN: quiet, with the payload's top 9 bits (as a hardware conversion; bit casts keep them).
  if (absu > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((absu >> 13) & 0x1FFu));
  if (absu >= 0x477FF000u) {
    // >= 65520 rounds to inf (max half is 65504; the halfway point 65520 rounds to even = inf).
    return static_cast<uint16_t>(sign | 0x7C00u);
  }
  if (absu < 0x38800000u) {
    // Subnormal half (|x| < 2^-14) or zero: scale into the 10-bit mantissa with RNE.
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to 0
    uint32_t exp = absu >> 23;
    uint32_t mant = (absu & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - exp;  // value / 2^-24 = mant * 2^(exp - 126)
    uint32_t result = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (result & 1u))) result += 1u;
    return static_cast<uint16_t>(sign | result);
  }
  // Normal: rebias exponent, round mantissa 23 -> 10 bits.
  uint32_t v = absu - 0x38000000u;  // exponent bias 127 -> 15
  uint32_t result = v >> 13;
  uint32_t rem = v & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (result & 1u))) result += 1u;
  return static_cast<uint16_t>(sign | result);
}
ARK_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // Subnormal: value = mant * 2^-24, exact in float32.
    float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// The bits of an integer register up to `top` (a narrow dtype's sign bit), sign-extended to 32.
ARK_HD uint32_t sign_extend(uint32_t bits, uint32_t top) { return ((bits & (2 * top - 1)) ^ top) - top; }

// Rounds a float32 value to `dtype` and back (the per-instruction rounding of programs); wraps the
// bits of an integer register to a narrow dtype's width.
ARK_HD float round_to(float v, int32_t dtype) {
  switch (dtype) {
    case kBF16: return bf16_to_f32(f32_to_bf16(v));
    case kF16: return f16_to_f32(f32_to_f16(v));
    case kBool: return v != 0.0f ? 1.0f : 0.0f;
    case kInt8: return bits_float(sign_extend(float_bits(v), 0x80u));
    case kUInt8: return bits_float(float_bits(v) & 0xFFu);
    case kInt16: return bits_float(sign_extend(float_bits(v), 0x8000u));
    case kUInt16: return bits_float(float_bits(v) & 0xFFFFu);
    default: return v;
  }
}

ARK_HD float load_element(const void* base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[index];
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
    case kBool: return static_cast<const uint8_t*>(base)[index] ? 1.0f : 0.0f;
    // Integer elements load as their bits (an integer register, plan_format.hpp).
    case kInt32:
    case kUInt32: return bits_float(static_cast<const uint32_t*>(base)[index]);
    case kInt8: return bits_float(sign_extend(static_cast<const uint8_t*>(base)[index], 0x80u));
    case kUInt8: return bits_float(static_cast<const uint8_t*>(base)[index]);
    case kInt16: return bits_float(sign_extend(static_cast<const uint16_t*>(base)[index], 0x8000u));
    case kUInt16: return bits_float(static_cast<const uint16_t*>(base)[index]);
    default: return 0.0f;
  }
}

ARK_HD void store_element(void* base, int32_t dtype, int64_t index, float v) {
  switch (dtype) {
    case kF32: static_cast<float*>(base)[index] = v; break;
    case kBF16: static_cast<uint16_t*>(base)[index] = f32_to_bf16(v); break;
    case kF16: static_cast<uint16_t*>(base)[index] = f32_to_f16(v); break;
    case kBool: static_cast<uint8_t*>(base)[index] = v != 0.0f ? 1 : 0; break;
    case kInt32:
    case kUInt32: static_cast<uint32_t*>(base)[index] = float_bits(v); break;
    case kInt8:
    case kUInt8: static_cast<uint8_t*>(base)[index] = static_cast<uint8_t>(float_bits(v)); break;
    case kInt16:
    case kUInt16: static_cast<uint16_t*>(base)[index] = static_cast<uint16_t>(float_bits(v)); break;
    default: break;
  }
}

ARK_HD float nan_max(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}
ARK_HD float nan_min(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a < b ? a : b;
}

ARK_HD float integer_pow(float x, int32_t n) {
  int32_t m = n < 0 ? -n : n;
  float p = 1.0f;
  if (m > 0) {
    p = x;
    for (int32_t i = 1; i < m; ++i) p = p * x;
  }
  return n < 0 ? 1.0f / p : p;
}

// Unary and binary opcodes (not LOAD / LOAD_ACC / CONST / SELECT, which need context).
ARK_HD float apply_unary(int32_t opcode, float x, int32_t imm) {
  switch (opcode) {
    case kNeg: return -x;
    case kExp: return expf(x);
    case kLog: return logf(x);
    case kTanh: return tanhf(x);
    case kLogistic: return 1.0f / (1.0f + expf(-x));
    case kSqrt: return sqrtf(x);
    case kRsqrt: return 1.0f / sqrtf(x);
    case kErf: return erff(x);
    case kAbs: return fabsf(x);
    case kIntegerPow: return integer_pow(x, imm);
    case kSin: return sinf(x);
    case kCos: return cosf(x);
    case kLog1p: return log1pf(x);
    case kExpm1: return expm1f(x);
    case kSquare: return x * x;
    case kSign: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);
    case kCopy: return x;
    default: return x;
  }
}

ARK_HD float apply_binary(int32_t opcode, float a, float b) {
  switch (opcode) {
    case kAdd: return a + b;
    case kSub: return a - b;
    case kMul: return a * b;
    case kDiv: return a / b;
    case kMax: return nan_max(a, b);
    case kMin: return nan_min(a, b);
    case kPow: return powf(a, b);
    case kEq: return a == b ? 1.0f : 0.0f;
    case kNe: return a != b ? 1.0f : 0.0f;
    case kLt: return a < b ? 1.0f : 0.0f;
    case kLe: return a <= b ? 1.0f : 0.0f;
    case kGt: return a > b ? 1.0f : 0.0f;
    case kGe: return a >= b ? 1.0f : 0.0f;
    case kRem: return fmodf(a, b);
    default: return a;
  }
}

ARK_HD bool is_unary(int32_t opcode) { return opcode >= kNeg && opcode <= kCopy; }
ARK_HD bool is_binary(int32_t opcode) { return opcode >= kAdd && opcode <= kRem; }
ARK_HD bool is_int_binary(int32_t opcode) { return opcode >= kIAdd && opcode <= kUGe; }
ARK_HD bool is_int_unary(int32_t opcode) { return opcode >= kINeg && opcode <= kBitcast; }

// ---- integer opcodes (v2): 32 bits in, 32 bits out --------------------------------------------
// Arithmetic wraps (two's complement, computed on uint32 so it is defined behaviour); division,
// remainder, shifts and float -> int conversion follow XLA, whose results jax.jit returns.
ARK_HD uint32_t bool_bits(bool x) { return float_bits(x ? 1.0f : 0.0f); }

ARK_HD uint32_t apply_int_binary(int32_t opcode, uint32_t a, uint32_t b) {
  const int32_t sa = static_cast<int32_t>(a), sb = static_cast<int32_t>(b);
  switch (opcode) {
    case kIAdd: return a + b;
    case kISub: return a - b;
    case kIMul: return a * b;
    case kIDiv:  // x / 0 = -1, INT_MIN / -1 = INT_MIN, else truncation toward zero
      if (sb == 0) return 0xFFFFFFFFu;
      if (sb == -1) return 0u - a;
      return static_cast<uint32_t>(sa / sb);
    case kIRem:  // x % 0 = x, INT_MIN % -1 = 0, sign of the dividend
      if (sb == 0) return a;
      if (sb == -1) return 0u;
      return static_cast<uint32_t>(sa % sb);
    case kUDiv: return b == 0 ? 0xFFFFFFFFu : a / b;
    case kURem: return b == 0 ? a : a % b;
    case kIMax: return sa > sb ? a : b;
    case kIMin: return sa < sb ? a : b;
    case kUMax: return a > b ? a : b;
    case kUMin: return a < b ? a : b;
    case kAnd: return a & b;
    case kOr: return a | b;
    case kXor: return a ^ b;
    case kShl: return b >= 32u ? 0u : a << b;  // the amount is read as unsigned
    case kShrA: return b >= 32u ? (sa < 0 ? 0xFFFFFFFFu : 0u)
                                : static_cast<uint32_t>(sa < 0 ? ~(~a >> b) : a >> b);
    case kShrL: return b >= 32u ? 0u : a >> b;
    case kIEq: return bool_bits(a == b);
    case kINe: return bool_bits(a != b);
    case kILt: return bool_bits(sa < sb);
    case kILe: return bool_bits(sa <= sb);
    case kIGt: return bool_bits(sa > sb);
    case kIGe: return bool_bits(sa >= sb);
    case kULt: return bool_bits(a < b);
    case kULe: return bool_bits(a <= b);
    case kUGt: return bool_bits(a > b);
    case kUGe: return bool_bits(a >= b);
    default: return a;
  }
}

ARK_HD uint32_t float_to_int_bits(float x, bool is_unsigned) {
  if (x != x) return 0u;
  if (is_unsigned) {
    if (x <= 0.0f) return 0u;  // also -0.5 -> 0 (truncation)
    if (x >= 4294967296.0f) return 0xFFFFFFFFu;
    return static_cast<uint32_t>(x);
  }
  if (x >= 2147483648.0f) return 0x7FFFFFFFu;
  if (x <= -2147483648.0f) return 0x80000000u;
  return static_cast<uint32_t>(static_cast<int32_t>(x));
}

ARK_HD uint32_t apply_int_unary(int32_t opcode, uint32_t x, int32_t imm) {
  const int32_t sx = static_cast<int32_t>(x);
  switch (opcode) {
    case kINeg: return 0u - x;
    case kNot: return ~x;
    case kIAbs: return sx < 0 ? 0u - x : x;  // |INT_MIN| = INT_MIN, as XLA
    case kISign: return sx > 0 ? 1u : (sx < 0 ? 0xFFFFFFFFu : 0u);
    case kI2F: return float_bits(static_cast<float>(sx));
    case kU2F: return float_bits(static_cast<float>(x));
    case kF2I: return float_to_int_bits(bits_float(x), false);
    case kF2U: return float_to_int_bits(bits_float(x), true);
    case kIMov:
    case kBitcast: return x;
    case kIPow: {
      uint32_t p = 1u;
      for (int32_t i = 0; i < imm; ++i) p = p * x;
      return p;
    }
    default: return x;
  }
}

// ---- REDUCE accumulators (v2 kinds) ----------------------------------------------------------------
// A state is (32 bits, index). combine() is associative and commutative for every kind (float sum
// only up to rounding), so the CPU's sequential fold (r ascending) and the GPU's lane-strided tree
// pick the same element for max / min / arg kinds. Arg kinds order by (value, lower index first),
// a NaN above every number: the first maximum / minimum, the first NaN if there is one.
struct ReduceAcc {
  uint32_t bits;
  int32_t index;
};

ARK_HD bool is_arg_reduce(int32_t kind) { return kind >= kReduceArgMax && kind <= kReduceIArgMin; }

ARK_HD ReduceAcc reduce_identity(int32_t kind) {
  switch (kind) {
    case kReduceSum: return {float_bits(0.0f), 0};
    case kReduceMax:
    case kReduceArgMax: return {float_bits(-INFINITY), 0x7FFFFFFF};
    case kReduceMin:
    case kReduceArgMin: return {float_bits(INFINITY), 0x7FFFFFFF};
    case kReduceIMax:
    case kReduceIArgMax: return {0x80000000u, 0x7FFFFFFF};
    case kReduceIMin:
    case kReduceIArgMin: return {0x7FFFFFFFu, 0x7FFFFFFF};
    case kReduceUMin: return {0xFFFFFFFFu, 0};
    case kReduceProd: return {float_bits(1.0f), 0};
    case kReduceIProd: return {1u, 0};
    case kReduceAnd: return {0xFFFFFFFFu, 0};
    default: return {0u, 0};  // isum, umax, or, xor
  }
}

// True when candidate (value b at index j) beats the current best (a at i) for an arg kind.
ARK_HD bool arg_better(int32_t kind, uint32_t a, int32_t i, uint32_t b, int32_t j) {
  const bool lower_index = j < i;
  if (kind == kReduceArgMax || kind == kReduceArgMin) {
    const float x = bits_float(a), y = bits_float(b);
    const bool xn = x != x, yn = y != y;
    if (xn || yn) return yn && (!xn || lower_index);
    if (x == y) return lower_index;
    return kind == kReduceArgMax ? y > x : y < x;
  }
  const int32_t x = static_cast<int32_t>(a), y = static_cast<int32_t>(b);
  if (x == y) return lower_index;
  return kind == kReduceIArgMax ? y > x : y < x;
}

ARK_HD ReduceAcc reduce_combine(int32_t kind, ReduceAcc a, ReduceAcc b) {
  switch (kind) {
    case kReduceSum: return {float_bits(bits_float(a.bits) + bits_float(b.bits)), 0};
    case kReduceMax: return {float_bits(nan_max(bits_float(a.bits), bits_float(b.bits))), 0};
    case kReduceMin: return {float_bits(nan_min(bits_float(a.bits), bits_float(b.bits))), 0};
    case kReduceISum: return {a.bits + b.bits, 0};
    case kReduceIMax: return {apply_int_binary(kIMax, a.bits, b.bits), 0};
    case kReduceIMin: return {apply_int_binary(kIMin, a.bits, b.bits), 0};
    case kReduceUMax: return {apply_int_binary(kUMax, a.bits, b.bits), 0};
    case kReduceUMin: return {apply_int_binary(kUMin, a.bits, b.bits), 0};
    case kReduceProd: return {float_bits(bits_float(a.bits) * bits_float(b.bits)), 0};
    case kReduceIProd: return {a.bits * b.bits, 0};
    case kReduceAnd: return {a.bits & b.bits, 0};
    case kReduceOr: return {a.bits | b.bits, 0};
    case kReduceXor: return {a.bits ^ b.bits, 0};
    case kReduceLast: return b;
    default: return arg_better(kind, a.bits, a.index, b.bits, b.index) ? b : a;
  }
}

// One step of a scatter fold: element `index` of a tensor of `dtype` becomes combine(its value, v),
// computed on registers (float32, or 32 integer bits) and stored with the tensor's rounding (a
// narrow integer keeps the low bits: wrapping). XLA's scatter combines in the operand's dtype the
// same way: one rounding per point.
ARK_HD void fold_into_element(void* base, int32_t dtype, int64_t index, int32_t kind, float v) {
  const ReduceAcc old{float_bits(load_element(base, dtype, index)), 0};
  store_element(base, dtype, index, bits_float(reduce_combine(kind, old, ReduceAcc{float_bits(v), 0}).bits));
}

// The accumulator's register bits: the folded value, or for arg kinds the int32 index.
ARK_HD uint32_t reduce_result(int32_t kind, ReduceAcc a) {
  return is_arg_reduce(kind) ? static_cast<uint32_t>(a.index) : a.bits;
}

}  // namespace jax_ark::plan
