// SIMD tile kernels of the CPU persistent executor (included by persistent_executor.cc only, so
// they get its -ffp-contract=off).
//
// Bit-exactness: every output element is computed with exactly the plan format's scalar sequence
// acc = (((0 + a[0]*b[0]) + a[1]*b[1]) + ...), k ascending, each product and each sum rounded to
// float32. The kernels only vectorize ACROSS output columns n (lanes are independent elements) and
// process several rows / several k per pass over the accumulator; they never reassociate along k.
// Separate IEEE vector multiplies and adds give the same bits as the scalar code on every ISA, so
// the ISA picked at run time changes speed, not results. That needs -ffp-contract=off: the
// AVX-512 variant has FMA available and GCC would otherwise fuse `c + a * x`
// (test_persistent.py::test_bit_identical_* catches a fused or reassociated build).
#pragma once

#include <stdint.h>
#include <string.h>

#include "jax_ark/tile_ops.hpp"

#define ARK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace jax_ark::cpu::kernels {

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

// Most rows x columns one matmul kernel call computes: its accumulator tile stays in L1 / L2.
constexpr int kRows = 32;
constexpr int kCols = 512;
// How far ahead (in k rows) the matmul kernel prefetches B.
constexpr int kPrefetchRows = 16;

// Vectors are passed by reference only: a by-value AVX vector in a function signature changes the
// ABI (GCC's -Wpsabi), even for always-inline helpers.
template <class V>
ARK_ALWAYS_INLINE void load_vec(V& v, const float* p) {
  memcpy(&v, p, sizeof(V));
}
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
template <class V> struct Bits;
template <> struct Bits<f32x4> { using H = u16x4; using U = u32x4; };
template <> struct Bits<f32x8> { using H = u16x8; using U = u32x8; };
template <> struct Bits<f32x16> { using H = u16x16; using U = u32x16; };

// bf16 -> f32 is exact: the 16 bits become the high half of the float32.
template <class V>
ARK_ALWAYS_INLINE void load_vec(V& v, const uint16_t* p) {
  typename Bits<V>::H h;
  memcpy(&h, p, sizeof(h));
  const typename Bits<V>::U u = __builtin_convertvector(h, typename Bits<V>::U) << 16;
  v = (V)u;  // same-size vector cast: reinterprets the bits
}
template <class V>
ARK_ALWAYS_INLINE void store_vec(float* p, const V& v) {
  memcpy(p, &v, sizeof(V));
}
ARK_ALWAYS_INLINE float to_f32(float x) { return x; }
ARK_ALWAYS_INLINE float to_f32(uint16_t x) { return plan::bf16_to_f32(x); }

// acc[i * ldc + n] = sum_k a[i * lda + k] * B[k, n] for i < rows, n < tn, where B[k, n] =
// b[k * ldb + n] (float32 or bf16 bits). The loop nest is k (4 at a time) -> n (one vector) ->
// rows, so each B vector is loaded (and widened) once and serves every row, and B is streamed once
// per call in row order (a task's K x tn slab, typically straight from DRAM). Each element still
// receives its terms one by one in ascending k (see the file comment).
template <class V, class BT>
ARK_ALWAYS_INLINE void matmul_panel(const float* a, int64_t lda, int rows, int64_t K, const BT* b,
                                    int64_t ldb, int tn, float* acc, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  for (int i = 0; i < rows; ++i)
    for (int n = 0; n < tn; ++n) acc[i * ldc + n] = 0.0f;
  const int nv = tn - tn % W;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const BT* b0 = b + k * ldb;
    const BT* b1 = b0 + ldb;
    const BT* b2 = b1 + ldb;
    const BT* b3 = b2 + ldb;
    if (k + kPrefetchRows + 4 <= K) {
      // A tile's slab is tn columns of rows ldb apart: too short a run per row for the hardware
      // prefetcher to get ahead of, so ask for the rows kPrefetchRows ahead explicitly.
      for (int r = 0; r < 4; ++r) {
        const char* p = reinterpret_cast<const char*>(b + (k + kPrefetchRows + r) * ldb);
        for (int64_t off = 0; off < static_cast<int64_t>(tn * sizeof(BT)); off += 64)
          __builtin_prefetch(p + off, 0, 0);
      }
    }
    for (int n = 0; n < nv; n += W) {
      V x0, x1, x2, x3;
      load_vec(x0, b0 + n);
      load_vec(x1, b1 + n);
      load_vec(x2, b2 + n);
      load_vec(x3, b3 + n);
      for (int i = 0; i < rows; ++i) {
        const float* ai = a + i * lda + k;
        float* ci = acc + i * ldc + n;
        V c;
        load_vec(c, ci);
        c = c + ai[0] * x0;
        c = c + ai[1] * x1;
        c = c + ai[2] * x2;
        c = c + ai[3] * x3;
        store_vec(ci, c);
      }
    }
    for (int n = nv; n < tn; ++n) {
      const float x0 = to_f32(b0[n]), x1 = to_f32(b1[n]), x2 = to_f32(b2[n]), x3 = to_f32(b3[n]);
      for (int i = 0; i < rows; ++i) {
        const float* ai = a + i * lda + k;
        float c = acc[i * ldc + n];
        c = c + ai[0] * x0;
        c = c + ai[1] * x1;
        c = c + ai[2] * x2;
        c = c + ai[3] * x3;
        acc[i * ldc + n] = c;
      }
    }
  }
  for (; k < K; ++k) {
    const BT* b0 = b + k * ldb;
    for (int n = 0; n < nv; n += W) {
      V x0;
      load_vec(x0, b0 + n);
      for (int i = 0; i < rows; ++i) {
        float* ci = acc + i * ldc + n;
        V c;
        load_vec(c, ci);
        c = c + a[i * lda + k] * x0;
        store_vec(ci, c);
      }
    }
    for (int n = nv; n < tn; ++n) {
      const float x0 = to_f32(b0[n]);
      for (int i = 0; i < rows; ++i) acc[i * ldc + n] = acc[i * ldc + n] + a[i * lda + k] * x0;
    }
  }
}

// Register-blocked variant for tiles with several rows: a kMicroRows x NV-vector block of the
// accumulator lives in registers for the whole k loop (one k at a time, ascending), so the inner
// loop is only B loads, broadcasts, multiplies and adds. B is re-read once per row block, from
// L1 / L2 after the first (which is prefetched like the panel kernel's).
constexpr int kMicroRows = 4;

template <class V, class BT, int NV>
ARK_ALWAYS_INLINE void matmul_micro(const float* a, int64_t lda, int64_t K, const BT* b,
                                    int64_t ldb, float* acc, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  V c[kMicroRows][NV];
  for (int i = 0; i < kMicroRows; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = V{};
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  for (int64_t k = 0; k < K; ++k) {
    const BT* bk = b + k * ldb;
    if (k + kPrefetchRows < K) {
      const char* ahead = reinterpret_cast<const char*>(bk + kPrefetchRows * ldb);
      for (int off = 0; off < static_cast<int>(NV * W * sizeof(BT)); off += 64)
        __builtin_prefetch(ahead + off, 0, 0);
    }
    V x[NV];
    for (int j = 0; j < NV; ++j) load_vec(x[j], bk + j * W);
    for (int j = 0; j < NV; ++j) c[0][j] = c[0][j] + a0[k] * x[j];
    for (int j = 0; j < NV; ++j) c[1][j] = c[1][j] + a1[k] * x[j];
    for (int j = 0; j < NV; ++j) c[2][j] = c[2][j] + a2[k] * x[j];
    for (int j = 0; j < NV; ++j) c[3][j] = c[3][j] + a3[k] * x[j];
  }
  for (int i = 0; i < kMicroRows; ++i)
    for (int j = 0; j < NV; ++j) store_vec(acc + i * ldc + j * W, c[i][j]);
}

// acc (rows x tn, row stride ldc) for any tile: micro blocks where they fit, the panel kernel on
// the leftover rows / columns (each element is computed by exactly one of them, same order).
template <class V, int NV, class BT>
ARK_ALWAYS_INLINE void matmul_any(const float* a, int64_t lda, int rows, int64_t K, const BT* b,
                                  int64_t ldb, int tn, float* acc, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int kBlockCols = NV * W;
  const int full_rows = rows < kMicroRows ? 0 : rows - rows % kMicroRows;
  const int full_cols = tn - tn % kBlockCols;
  if (full_rows == 0 || full_cols == 0) {  // GEMV-like: stream B once with the panel kernel
    matmul_panel<V>(a, lda, rows, K, b, ldb, tn, acc, ldc);
    return;
  }
  for (int n = 0; n < full_cols; n += kBlockCols)
    for (int i = 0; i < full_rows; i += kMicroRows)
      matmul_micro<V, BT, NV>(a + i * lda, lda, K, b + n, ldb, acc + i * ldc + n, ldc);
  if (full_cols < tn)
    matmul_panel<V>(a, lda, full_rows, K, b + full_cols, ldb, tn - full_cols, acc + full_cols, ldc);
  if (full_rows < rows)
    matmul_panel<V>(a + full_rows * lda, lda, rows - full_rows, K, b, ldb, tn,
                    acc + full_rows * ldc, ldc);
}

// One instantiation per instruction set; the widest the CPU supports is picked once at run time.
// NV: accumulator vectors per micro-block row (4 x NV of the ISA's registers stay live).
#define ARK_MATMUL_VARIANT(NAME, ATTR, V, NV)                                                      \
  ATTR inline void NAME(const float* a, int64_t lda, int rows, int64_t K, const void* b,          \
                        bool b_is_bf16, int64_t ldb, int tn, float* acc, int64_t ldc) {            \
    if (b_is_bf16)                                                                                 \
      matmul_any<V, NV>(a, lda, rows, K, static_cast<const uint16_t*>(b), ldb, tn, acc, ldc);      \
    else                                                                                           \
      matmul_any<V, NV>(a, lda, rows, K, static_cast<const float*>(b), ldb, tn, acc, ldc);         \
  }

ARK_MATMUL_VARIANT(matmul_base, , f32x4, 2)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ARK_MATMUL_VARIANT(matmul_avx2, __attribute__((target("avx2"))), f32x8, 2)
ARK_MATMUL_VARIANT(matmul_avx512, __attribute__((target("avx512f"))), f32x16, 4)
#endif
#undef ARK_MATMUL_VARIANT

using MatmulFn = void (*)(const float*, int64_t, int, int64_t, const void*, bool, int64_t, int,
                          float*, int64_t);

inline MatmulFn pick_matmul() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return matmul_avx512;
  if (__builtin_cpu_supports("avx2")) return matmul_avx2;
#endif
  return matmul_base;
}

// rows x tn float32 tile, row stride ldc: acc[i, n] = sum over k of a[i * lda + k] * B[k, n] with
// B[k, n] = b[k * ldb + n] (float32, or bf16 bits when b_is_bf16); see matmul_any.
inline void matmul_tile(const float* a, int64_t lda, int rows, int64_t K, const void* b,
                        bool b_is_bf16, int64_t ldb, int tn, float* acc, int64_t ldc) {
  static const MatmulFn fn = pick_matmul();
  fn(a, lda, rows, K, b, b_is_bf16, ldb, tn, acc, ldc);
}

}  // namespace jax_ark::cpu::kernels

#undef ARK_ALWAYS_INLINE
