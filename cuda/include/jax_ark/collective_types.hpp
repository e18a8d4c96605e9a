// Types shared by every backend of the `ark_collective` primitive (docs/internals.md,
// "Collectives"): the op and reduce enums, the element types, the 16-bit float <-> float32 conversions and the
// reduction functors.
//
// Everything here is plain C++17 with no CUDA or XLA header, so the CPU build compiles it with the
// host compiler and CUDA kernels can include the very same code: functions are ARK_HOST_DEVICE.
// One definition of the arithmetic is what makes the CPU backend a reference for the GPU one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef ARK_HOST_DEVICE
#if defined(__CUDACC__)
#define ARK_HOST_DEVICE __host__ __device__
#else
#define ARK_HOST_DEVICE
#endif
#endif

namespace jax_ark {

// Values of the `op` attribute. The numbers are part of the FFI contract: Python passes them.
enum class CollectiveOp : int32_t {
  kAllReduce = 0,
  kAllGather = 1,
  kReduceScatter = 2,
  kPermute = 3,
  kAllToAll = 4,
};
inline constexpr int32_t kNumCollectiveOps = 5;

// Values of the `reduce` attribute (ignored by the ops that do not reduce).
enum class ReduceKind : int32_t {
  kSum = 0,
  kMax = 1,
  kMin = 2,
};
inline constexpr int32_t kNumReduceKinds = 3;

// The element types the collectives support; independent of XLA's enum so device code can use it.
enum class ElementType : int32_t {
  kF32 = 0,
  kBF16 = 1,
  kF16 = 2,
  kS32 = 3,
};

inline const char* collective_op_name(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce: return "all_reduce";
    case CollectiveOp::kAllGather: return "all_gather";
    case CollectiveOp::kReduceScatter: return "reduce_scatter";
    case CollectiveOp::kPermute: return "permute";
    case CollectiveOp::kAllToAll: return "all_to_all";
  }
  return "unknown_op";
}

inline const char* reduce_kind_name(ReduceKind kind) {
  switch (kind) {
    case ReduceKind::kSum: return "sum";
    case ReduceKind::kMax: return "max";
    case ReduceKind::kMin: return "min";
  }
  return "unknown_reduce";
}

inline const char* element_type_name(ElementType type) {
  switch (type) {
    case ElementType::kF32: return "float32";
    case ElementType::kBF16: return "bfloat16";
    case ElementType::kF16: return "float16";
    case ElementType::kS32: return "int32";
  }
  return "unknown_dtype";
}

inline constexpr bool op_reduces(CollectiveOp op) {
  return op == CollectiveOp::kAllReduce || op == CollectiveOp::kReduceScatter;
}

// ---- 16-bit floats as bit patterns ----------------------------------------------------------
// Storage types only: arithmetic always happens in float32 (the contract says 16-bit floats
// accumulate in float32 and round once). Distinct structs so traits can tell them apart.
struct bf16_bits {
  uint16_t bits;
};
struct f16_bits {
  uint16_t bits;
};

// memcpy is the defined way to reinterpret bits in C++17; compilers turn it into a register move.
ARK_HOST_DEVICE inline uint32_t float_as_u32(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
ARK_HOST_DEVICE inline float u32_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// bfloat16 is the top half of a float32, so widening is a shift.
ARK_HOST_DEVICE inline float bf16_to_float(bf16_bits v) {
  return u32_as_float(uint32_t{v.bits} << 16);
}

// Round to nearest, ties to even (what XLA and ml_dtypes do). NaN stays a (quiet) NaN: adding the
// rounding bias to a NaN could carry into the exponent and turn it into infinity.
ARK_HOST_DEVICE inline bf16_bits float_to_bf16(float f) {
  const uint32_t u = float_as_u32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_bits{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  const uint32_t lsb = (u >> 16) & 1u;
  return bf16_bits{static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16)};
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, infinities, NaN).
ARK_HOST_DEVICE inline float f16_to_float(f16_bits v) {
  const uint32_t sign = uint32_t{v.bits & 0x8000u} << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1fu) {
    out = sign | 0x7f800000u | (mant << 13);  // infinity or NaN, payload kept
  } else if (exp != 0) {
    out = sign | ((exp + (127 - 15)) << 23) | (mant << 13);  // normal: rebias the exponent
  } else if (mant == 0) {
    out = sign;  // signed zero
  } else {
    // Subnormal: its value is mant * 2^-24, exactly representable as a float32 normal.
    const float magnitude = static_cast<float>(mant) * u32_as_float(0x33800000u);  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  return u32_as_float(out);
}

// IEEE binary32 -> binary16, round to nearest, ties to even; overflow goes to infinity.
ARK_HOST_DEVICE inline f16_bits float_to_f16(float f) {
  const uint32_t u = float_as_u32(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_bits{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return f16_bits{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): adding 0.5 (2^-1) aligns the value so the float32 adder's
    // own round-to-nearest-even lands on a multiple of 2^-24, the f16 subnormal step.
    const float shifted = u32_as_float(a) + 0.5f;
    return f16_bits{static_cast<uint16_t>(sign | (float_as_u32(shifted) - 0x3f000000u))};
  }
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to nearest even.
  const uint32_t lsb = (a >> 13) & 1u;
  const uint32_t rounded = a + ((15u - 127u) << 23) + 0xfffu + lsb;
  return f16_bits{static_cast<uint16_t>(sign | (rounded >> 13))};
}

// ---- accumulation types ---------------------------------------------------------------------
// AccumTraits<T>: the type arithmetic runs in, plus load (storage -> accumulator) and store
// (accumulator -> storage, the single rounding step for 16-bit floats).
template <class T>
struct AccumTraits {
  using Accum = T;
  ARK_HOST_DEVICE static Accum load(T v) { return v; }
  ARK_HOST_DEVICE static T store(Accum v) { return v; }
};
template <>
struct AccumTraits<bf16_bits> {
  using Accum = float;
  ARK_HOST_DEVICE static Accum load(bf16_bits v) { return bf16_to_float(v); }
  ARK_HOST_DEVICE static bf16_bits store(Accum v) { return float_to_bf16(v); }
};
template <>
struct AccumTraits<f16_bits> {
  using Accum = float;
  ARK_HOST_DEVICE static Accum load(f16_bits v) { return f16_to_float(v); }
  ARK_HOST_DEVICE static f16_bits store(Accum v) { return float_to_f16(v); }
};

// ---- reduction functors -------------------------------------------------------------------------
// Applied as a left fold acc = op(acc, x_j) over ranks j = 0..n-1, so every rank and every run
// gets bit-identical results.
struct SumOp {
  ARK_HOST_DEVICE float operator()(float a, float b) const { return a + b; }
  // Signed overflow is undefined in C++; XLA wraps around, so add as unsigned.
  ARK_HOST_DEVICE int32_t operator()(int32_t a, int32_t b) const {
    return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
  }
};
// max/min propagate NaN like XLA's kMaximum/kMinimum (a plain comparison would drop it). Written
// as two selects without branches (a + b is NaN when either is) so compilers vectorize the loop.
struct MaxOp {
  ARK_HOST_DEVICE float operator()(float a, float b) const {
    const float larger = a > b ? a : b;
    return (a != a || b != b) ? a + b : larger;
  }
  ARK_HOST_DEVICE int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};
struct MinOp {
  ARK_HOST_DEVICE float operator()(float a, float b) const {
    const float smaller = a < b ? a : b;
    return (a != a || b != b) ? a + b : smaller;
  }
  ARK_HOST_DEVICE int32_t operator()(int32_t a, int32_t b) const { return a < b ? a : b; }
};

// ---- dispatch helpers ---------------------------------------------------------------------------
template <class T>
struct TypeTag {
  using type = T;
};

inline constexpr size_t element_size(ElementType type) {
  return type == ElementType::kF32 || type == ElementType::kS32 ? 4 : 2;
}

// Calls fn(TypeTag<T>{}) with the storage type of `type`; returns what fn returns.
template <class Fn>
decltype(auto) dispatch_element_type(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kBF16: return fn(TypeTag<bf16_bits>{});
    case ElementType::kF16: return fn(TypeTag<f16_bits>{});
    case ElementType::kS32: return fn(TypeTag<int32_t>{});
    case ElementType::kF32: break;
  }
  return fn(TypeTag<float>{});
}

// Calls fn(SumOp{} | MaxOp{} | MinOp{}); returns what fn returns.
template <class Fn>
decltype(auto) dispatch_reduce_kind(ReduceKind kind, Fn&& fn) {
  switch (kind) {
    case ReduceKind::kMax: return fn(MaxOp{});
    case ReduceKind::kMin: return fn(MinOp{});
    case ReduceKind::kSum: break;
  }
  return fn(SumOp{});
}

}  // namespace jax_ark
