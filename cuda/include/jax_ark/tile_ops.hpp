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
  if (absu > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
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

// Rounds a float32 value to `dtype` and back (the per-instruction rounding of programs).
ARK_HD float round_to(float v, int32_t dtype) {
  switch (dtype) {
    case kBF16: return bf16_to_f32(f32_to_bf16(v));
    case kF16: return f16_to_f32(f32_to_f16(v));
    case kBool: return v != 0.0f ? 1.0f : 0.0f;
    default: return v;
  }
}

ARK_HD float load_element(const void* base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[index];
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
    case kBool: return static_cast<const uint8_t*>(base)[index] ? 1.0f : 0.0f;
    case kInt32: return static_cast<float>(static_cast<const int32_t*>(base)[index]);
    default: return 0.0f;
  }
}

ARK_HD void store_element(void* base, int32_t dtype, int64_t index, float v) {
  switch (dtype) {
    case kF32: static_cast<float*>(base)[index] = v; break;
    case kBF16: static_cast<uint16_t*>(base)[index] = f32_to_bf16(v); break;
    case kF16: static_cast<uint16_t*>(base)[index] = f32_to_f16(v); break;
    case kBool: static_cast<uint8_t*>(base)[index] = v != 0.0f ? 1 : 0; break;
    case kInt32: static_cast<int32_t*>(base)[index] = static_cast<int32_t>(v); break;
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
    default: return a;
  }
}

ARK_HD bool is_unary(int32_t opcode) { return opcode >= kNeg && opcode <= kCopy; }
ARK_HD bool is_binary(int32_t opcode) { return opcode >= kAdd && opcode <= kGe; }

}  // namespace jax_ark::plan
