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
// The exception is opt-in: with JAX_ARK_CPU_FMA=1 (PersistentOptions::fused_matmul) the *_fma
// variants fuse each term's product and sum into one FMA, in the same k order, through explicit
// intrinsics (so -ffp-contract=off still holds everywhere else).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <numeric>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "jax_ark/tile_ops.hpp"

#define ARK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace jax_ark::cpu::kernels {

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// c += a * x as one fused multiply-add per lane; called only from the FMA variants. Not
// always_inline: GCC would inline these target-attributed bodies into the target-less templates
// first and refuse; once a template is inlined into an FMA variant, the targets match and the
// optimizer inlines them (checked in the object code when written: the variants' loops are
// register vfmadd231ps, no call remains).
__attribute__((target("avx2,fma"))) inline void fma_into(f32x8& c, float a, const f32x8& x) {
  c = _mm256_fmadd_ps(_mm256_set1_ps(a), x, c);
}
__attribute__((target("avx512f"))) inline void fma_into(f32x16& c, float a, const f32x16& x) {
  c = _mm512_fmadd_ps(_mm512_set1_ps(a), x, c);
}
#endif
void fma_into(f32x4& c, float a, const f32x4& x);  // never defined: no FMA variant of the base ISA

// Most rows x columns one matmul kernel call computes: its accumulator tile stays in L1 / L2.
constexpr int kRows = 32;
constexpr int kCols = 512;
// How far ahead (in k rows) the matmul kernel prefetches B.
constexpr int kPrefetchRows = 16;
// Into L2 (prefetcht2), not L1 only (prefetchnta): B rows a multiple of 4 KiB apart (a weight
// 1024 floats wide) map to ONE L1 set per cache line of the row, and 16 rows ahead is more than
// its 12 ways, so non-temporal prefetches were evicted before use and every B load went to
// memory: a 4 x 1024 @ 1024 x 1024 matmul took 1.19 ms, now 0.23 ms (XLA: 0.21 ms).
constexpr int kPrefetchLocality = 1;

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

// One matmul term added to a sum: c + a * x with the product and the sum each rounded (F = false,
// the plan format's order) or fused into one rounding (F = true: the opt-in FMA kernels, below).
// The fused forms exist only inside the FMA variants' target attributes (their callers).
template <bool F>
ARK_ALWAYS_INLINE void mac(float& c, float a, float x) {
  if constexpr (F)
    c = __builtin_fmaf(a, x, c);
  else
    c = c + a * x;
}
template <bool F, class V>
ARK_ALWAYS_INLINE void mac(V& c, float a, const V& x) {
  if constexpr (F)
    fma_into(c, a, x);
  else
    c = c + a * x;
}

// acc[i * ldc + n] = sum_k a[i * lda + k] * B[k, n] for i < rows, n < tn, where B[k, n] =
// b[k * ldb + n] (float32 or bf16 bits). With `accumulate` the sums continue from acc's values
// instead of 0: a K split into consecutive blocks, each called in k order, adds every term in the
// same order as one call over all of K (so the result is the same bits). The loop nest is k (4 at a time) -> n (one vector) ->
// rows, so each B vector is loaded (and widened) once and serves every row, and B is streamed once
// per call in row order (a task's K x tn slab, typically straight from DRAM). Each element still
// receives its terms one by one in ascending k (see the file comment).
template <class V, bool F, class BT>
ARK_ALWAYS_INLINE void matmul_panel(const float* a, int64_t lda, int rows, int64_t K, const BT* b,
                                    int64_t ldb, int tn, float* acc, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  if (!accumulate)
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
          __builtin_prefetch(p + off, 0, kPrefetchLocality);
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
        mac<F>(c, ai[0], x0);
        mac<F>(c, ai[1], x1);
        mac<F>(c, ai[2], x2);
        mac<F>(c, ai[3], x3);
        store_vec(ci, c);
      }
    }
    for (int n = nv; n < tn; ++n) {
      const float x0 = to_f32(b0[n]), x1 = to_f32(b1[n]), x2 = to_f32(b2[n]), x3 = to_f32(b3[n]);
      for (int i = 0; i < rows; ++i) {
        const float* ai = a + i * lda + k;
        float c = acc[i * ldc + n];
        mac<F>(c, ai[0], x0);
        mac<F>(c, ai[1], x1);
        mac<F>(c, ai[2], x2);
        mac<F>(c, ai[3], x3);
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
        mac<F>(c, a[i * lda + k], x0);
        store_vec(ci, c);
      }
    }
    for (int n = nv; n < tn; ++n) {
      const float x0 = to_f32(b0[n]);
      for (int i = 0; i < rows; ++i) mac<F>(acc[i * ldc + n], a[i * lda + k], x0);
    }
  }
}

// Register-blocked variant for tiles with several rows: a kMicroRows x NV-vector block of the
// accumulator lives in registers for the whole k loop (one k at a time, ascending), so the inner
// loop is only B loads, broadcasts, multiplies and adds. B is re-read once per row block, from L1
// after the first (matmul_any cuts k so that the panel fits; the first read is prefetched like the
// panel kernel's).
constexpr int kMicroRows = 4;

template <class V, bool F, class BT, int NV>
ARK_ALWAYS_INLINE void matmul_micro(const float* a, int64_t lda, int64_t K, const BT* b,
                                    int64_t ldb, float* acc, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  V c[kMicroRows][NV];
  for (int i = 0; i < kMicroRows; ++i)
    for (int j = 0; j < NV; ++j) {
      if (accumulate)
        load_vec(c[i][j], acc + i * ldc + j * W);
      else
        c[i][j] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    const BT* bk = b + k * ldb;
    if (k + kPrefetchRows < K) {
      const char* ahead = reinterpret_cast<const char*>(bk + kPrefetchRows * ldb);
      for (int off = 0; off < static_cast<int>(NV * W * sizeof(BT)); off += 64)
        __builtin_prefetch(ahead + off, 0, kPrefetchLocality);
    }
    V x[NV];
    for (int j = 0; j < NV; ++j) load_vec(x[j], bk + j * W);
    for (int i = 0; i < kMicroRows; ++i) {
      const float ai = a[i * lda + k];
      for (int j = 0; j < NV; ++j) mac<F>(c[i][j], ai, x[j]);
    }
  }
  for (int i = 0; i < kMicroRows; ++i)
    for (int j = 0; j < NV; ++j) store_vec(acc + i * ldc + j * W, c[i][j]);
}

// How many rows of a B panel (`row_bytes` per row, rows `ldb_bytes` apart) to run before moving
// on, so that the panel stays in L1 while every row block of the tile reads it. At most 16 KiB of
// panel, measured best on one core (AMD EPYC, 48 KiB L1: 512x256 @ 256x128 in 32 x 64 tasks went
// from 157 to 223 GFLOP/s; a whole 64 KiB panel was evicted between row blocks). And no more rows
// than fit L1's sets: a 4 KiB-aligned L1 way holds the same offset of every 4 KiB of memory, so rows
// whose starts fall on few distinct offsets modulo 4 KiB (a 1 KiB row stride: 4) share few sets;
// counted with 8 ways, the fewest on current x86 cores (a 64-row block at a 1 KiB stride ran at
// 150, a 32-row one at 215). Small panels (<= 32 KiB) are not cut unless the sets overflow.
inline int64_t l1_panel_rows(int64_t K, int64_t row_bytes, int64_t ldb_bytes) {
  constexpr int64_t kWayBytes = 4096, kLine = 64, kSets = kWayBytes / kLine, kWays = 8;
  constexpr int64_t kPanelBytes = 16384, kUncutBytes = 32768;
  int64_t rows = K * row_bytes > kUncutBytes ? std::max<int64_t>(1, kPanelBytes / row_bytes) : K;
  const int64_t offsets = kWayBytes / std::gcd(ldb_bytes % kWayBytes, kWayBytes);
  const int64_t lines = std::max<int64_t>(1, (row_bytes + kLine - 1) / kLine);
  const int64_t sets = std::min(kSets, offsets * lines);
  return std::max<int64_t>(1, std::min(rows, kWays * sets / lines));
}

// acc (rows x tn, row stride ldc) for any tile: micro blocks where they fit, the panel kernel on
// the leftover rows / columns (each element is computed by exactly one of them, same order).
template <class V, int NV, bool F, class BT>
ARK_ALWAYS_INLINE void matmul_any(const float* a, int64_t lda, int rows, int64_t K, const BT* b,
                                  int64_t ldb, int tn, float* acc, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int kBlockCols = NV * W;
  const int full_rows = rows < kMicroRows ? 0 : rows - rows % kMicroRows;
  const int full_cols = tn - tn % kBlockCols;
  if (full_rows == 0 || full_cols == 0) {  // GEMV-like: stream B once with the panel kernel
    matmul_panel<V, F>(a, lda, rows, K, b, ldb, tn, acc, ldc, accumulate);
    return;
  }
  // With several row blocks, each re-reads its B panel (K x kBlockCols): k is cut into blocks
  // whose panel stays in L1 for all of them (each block carries its sums over, so every element
  // still gets its terms in ascending k, the same bits).
  const int64_t kc = full_rows > kMicroRows ? l1_panel_rows(K, kBlockCols * sizeof(BT), ldb * sizeof(BT)) : K;
  for (int n = 0; n < full_cols; n += kBlockCols)
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t kb = std::min(kc, K - k0);
      for (int i = 0; i < full_rows; i += kMicroRows)
        matmul_micro<V, F, BT, NV>(a + i * lda + k0, lda, kb, b + k0 * ldb + n, ldb, acc + i * ldc + n,
                                   ldc, accumulate || k0 > 0);
    }
  if (full_cols < tn)
    matmul_panel<V, F>(a, lda, full_rows, K, b + full_cols, ldb, tn - full_cols, acc + full_cols, ldc,
                    accumulate);
  if (full_rows < rows)
    matmul_panel<V, F>(a + full_rows * lda, lda, rows - full_rows, K, b, ldb, tn,
                    acc + full_rows * ldc, ldc, accumulate);
}

// ---- B read along k: B[k, n] = b[n * ldb + k] (a transposed weight, `y @ E.T`) -------------------
// Vectorizing across n needs W columns' k-th elements in one vector: W rows of b (W consecutive
// k each, contiguous loads) are transposed in registers, then every row of A adds its W terms
// into its W column sums one k at a time, ascending: the same per-element order as matmul_panel.

// Interleaves the low (high) halves of x and y: lo = x0 y0 x1 y1 ..., hi = x[W/2] y[W/2] ...
template <class V, int W, size_t... I>
ARK_ALWAYS_INLINE void interleave(V& lo, V& hi, const V& x, const V& y, std::index_sequence<I...>) {
  lo = __builtin_shufflevector(x, y, (I % 2 ? W + I / 2 : I / 2)...);
  hi = __builtin_shufflevector(x, y, (I % 2 ? W + W / 2 + I / 2 : W / 2 + I / 2)...);
}

// t[j][kk] -> t[kk][j]: log2(W) rounds of pairing vector i with i + W/2 (a perfect shuffle). Each
// interleave is one instruction for 4 lanes (unpcklps / unpckhps) and 16 (vpermt2ps).
template <class V>
ARK_ALWAYS_INLINE void transpose(V (&t)[sizeof(V) / sizeof(float)]) {
  constexpr int W = sizeof(V) / sizeof(float);
  for (int round = 1; round < W; round *= 2) {
    V u[W];
    for (int i = 0; i < W / 2; ++i)
      interleave<V, W>(u[2 * i], u[2 * i + 1], t[i], t[i + W / 2], std::make_index_sequence<W>{});
    for (int i = 0; i < W; ++i) t[i] = u[i];
  }
}

// 8 lanes (AVX2): a full-width interleave crosses the 128-bit halves (2-3 instructions each), so
// the classic sequence instead: in-half unpack, in-half 64-bit shuffle, then one half swap.
template <>
ARK_ALWAYS_INLINE void transpose<f32x8>(f32x8 (&r)[8]) {
  f32x8 t[8], s[8];
  for (int p = 0; p < 8; p += 2) {
    t[p] = __builtin_shufflevector(r[p], r[p + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[p + 1] = __builtin_shufflevector(r[p], r[p + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int q = 0; q < 8; q += 4) {
    s[q] = __builtin_shufflevector(t[q], t[q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    s[q + 1] = __builtin_shufflevector(t[q], t[q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    s[q + 2] = __builtin_shufflevector(t[q + 1], t[q + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    s[q + 3] = __builtin_shufflevector(t[q + 1], t[q + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(s[i], s[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(s[i], s[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Columns [n, n + W), terms k in [k0, k1) (a multiple of KS * W apart) added to acc. A step reads
// KS * W consecutive k of each of the W rows (KS = a cache line's worth: a line is fetched and used
// at once, where half-line steps left it to be fetched again), transposes KS W x W tiles and
// runs each row's W column sums KS * W terms on.
template <class V, int KS, bool F, class BT>
ARK_ALWAYS_INLINE void matmul_kt_columns(const float* a, int64_t lda, int rows, int64_t k0,
                                         int64_t k1, const BT* b, int64_t ldb, int n, float* acc,
                                         int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int64_t kPrefetchK = 1024 / sizeof(BT);  // 1 KiB ahead in each row
  const BT* bn = b + n * ldb;
  V tiles[KS][W];
  for (int64_t k = k0; k < k1; k += KS * W) {
    if (k + kPrefetchK < k1)  // W concurrent row streams: more than the hardware prefetcher tracks
      for (int j = 0; j < W; ++j) __builtin_prefetch(bn + j * ldb + k + kPrefetchK, 0, 3);
    for (int h = 0; h < KS; ++h) {
      for (int j = 0; j < W; ++j) load_vec(tiles[h][j], bn + j * ldb + k + h * W);
      transpose(tiles[h]);
    }
    for (int i = 0; i < rows; ++i) {
      const float* ai = a + i * lda + k;
      float* ci = acc + i * ldc + n;
      V c;
      load_vec(c, ci);
      for (int h = 0; h < KS; ++h)
        for (int kk = 0; kk < W; ++kk) mac<F>(c, ai[h * W + kk], tiles[h][kk]);
      store_vec(ci, c);
    }
  }
}

template <class V, bool F, class BT>
ARK_ALWAYS_INLINE void matmul_kt(const float* a, int64_t lda, int rows, int64_t K, const BT* b,
                                 int64_t ldb, int tn, float* acc, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int KS = 64 / (W * sizeof(BT)) > 1 ? 64 / (W * sizeof(BT)) : 1;
  if (!accumulate)
    for (int i = 0; i < rows; ++i)
      for (int n = 0; n < tn; ++n) acc[i * ldc + n] = 0.0f;
  const int64_t k_lines = K - K % (KS * W);
  const int64_t kv = K - K % W;
  const int nv = tn - tn % W;
  for (int n = 0; n < nv; n += W) {
    matmul_kt_columns<V, KS, F>(a, lda, rows, 0, k_lines, b, ldb, n, acc, ldc);
    matmul_kt_columns<V, 1, F>(a, lda, rows, k_lines, kv, b, ldb, n, acc, ldc);
    for (int j = 0; j < W; ++j) {  // the last K % W terms of these columns, still in k order
      const BT* bj = b + (n + j) * ldb;
      for (int64_t k = kv; k < K; ++k) {
        const float x = to_f32(bj[k]);
        for (int i = 0; i < rows; ++i) mac<F>(acc[i * ldc + n + j], a[i * lda + k], x);
      }
    }
  }
  for (int n = nv; n < tn; ++n) {  // leftover columns: one sequential dot product each
    const BT* bn = b + n * ldb;
    for (int i = 0; i < rows; ++i) {
      float c = acc[i * ldc + n];
      for (int64_t k = 0; k < K; ++k) mac<F>(c, a[i * lda + k], to_f32(bn[k]));
      acc[i * ldc + n] = c;
    }
  }
}

// One instantiation per instruction set; the widest the CPU supports is picked once at run time.
// NV: accumulator vectors per micro-block row (4 x NV of the ISA's registers stay live).
#define ARK_MATMUL_VARIANT(NAME, ATTR, V, NV, F)                                                   \
  ATTR inline void NAME(const float* a, int64_t lda, int rows, int64_t K, const void* b,          \
                        bool b_is_bf16, int64_t ldb, int tn, float* acc, int64_t ldc,              \
                        bool accumulate) {                                                         \
    if (b_is_bf16)                                                                                 \
      matmul_any<V, NV, F>(a, lda, rows, K, static_cast<const uint16_t*>(b), ldb, tn, acc, ldc,       \
                        accumulate);                                                               \
    else                                                                                           \
      matmul_any<V, NV, F>(a, lda, rows, K, static_cast<const float*>(b), ldb, tn, acc, ldc,          \
                        accumulate);                                                               \
  }

#define ARK_MATMUL_KT_VARIANT(NAME, ATTR, V, F)                                                    \
  ATTR inline void NAME(const float* a, int64_t lda, int rows, int64_t K, const void* b,          \
                        bool b_is_bf16, int64_t ldb, int tn, float* acc, int64_t ldc,              \
                        bool accumulate) {                                                         \
    if (b_is_bf16)                                                                                 \
      matmul_kt<V, F>(a, lda, rows, K, static_cast<const uint16_t*>(b), ldb, tn, acc, ldc, accumulate); \
    else                                                                                           \
      matmul_kt<V, F>(a, lda, rows, K, static_cast<const float*>(b), ldb, tn, acc, ldc, accumulate);  \
  }

ARK_MATMUL_VARIANT(matmul_base, , f32x4, 2, false)
ARK_MATMUL_KT_VARIANT(matmul_kt_base, , f32x4, false)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ARK_MATMUL_VARIANT(matmul_avx2, __attribute__((target("avx2"))), f32x8, 2, false)
ARK_MATMUL_VARIANT(matmul_avx512, __attribute__((target("avx512f"))), f32x16, 4, false)
ARK_MATMUL_KT_VARIANT(matmul_kt_avx2, __attribute__((target("avx2"))), f32x8, false)
ARK_MATMUL_KT_VARIANT(matmul_kt_avx512, __attribute__((target("avx512f"))), f32x16, false)
// Opt-in (PersistentOptions::fused_matmul): every term fused, k order unchanged.
ARK_MATMUL_VARIANT(matmul_avx2_fma, __attribute__((target("avx2,fma"))), f32x8, 2, true)
ARK_MATMUL_VARIANT(matmul_avx512_fma, __attribute__((target("avx512f"))), f32x16, 4, true)
ARK_MATMUL_KT_VARIANT(matmul_kt_avx2_fma, __attribute__((target("avx2,fma"))), f32x8, true)
ARK_MATMUL_KT_VARIANT(matmul_kt_avx512_fma, __attribute__((target("avx512f"))), f32x16, true)
#endif
#undef ARK_MATMUL_VARIANT
#undef ARK_MATMUL_KT_VARIANT

using MatmulFn = void (*)(const float*, int64_t, int, int64_t, const void*, bool, int64_t, int,
                          float*, int64_t, bool);

// k_contiguous: the matmul_kt kernels (B[k, n] = b[n * ldb + k]).
// fused: the FMA kernels where the CPU has FMA (else the exact ones: fusing is allowed, not owed).
inline MatmulFn pick_matmul(bool k_contiguous, bool fused) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (fused && __builtin_cpu_supports("avx512f"))
    return k_contiguous ? matmul_kt_avx512_fma : matmul_avx512_fma;
  if (fused && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return k_contiguous ? matmul_kt_avx2_fma : matmul_avx2_fma;
  if (__builtin_cpu_supports("avx512f")) return k_contiguous ? matmul_kt_avx512 : matmul_avx512;
  if (__builtin_cpu_supports("avx2")) return k_contiguous ? matmul_kt_avx2 : matmul_avx2;
#endif
  return k_contiguous ? matmul_kt_base : matmul_base;
}

// rows x tn float32 tile, row stride ldc: acc[i, n] = sum over k of a[i * lda + k] * B[k, n] with
// B[k, n] = b[k * ldb + n] (float32, or bf16 bits when b_is_bf16); see matmul_any. accumulate:
// continue the sums in acc (the next block of k) instead of starting from 0.
inline void matmul_tile(bool fused, const float* a, int64_t lda, int rows, int64_t K, const void* b,
                        bool b_is_bf16, int64_t ldb, int tn, float* acc, int64_t ldc,
                        bool accumulate = false) {
  static const MatmulFn exact_fn = pick_matmul(false, false);
  static const MatmulFn fused_fn = pick_matmul(false, true);
  (fused ? fused_fn : exact_fn)(a, lda, rows, K, b, b_is_bf16, ldb, tn, acc, ldc, accumulate);
}

// The same for B read along k: B[k, n] = b[n * ldb + k]; see matmul_kt.
inline void matmul_tile_kt(bool fused, const float* a, int64_t lda, int rows, int64_t K,
                           const void* b, bool b_is_bf16, int64_t ldb, int tn, float* acc,
                           int64_t ldc) {
  static const MatmulFn exact_fn = pick_matmul(true, false);
  static const MatmulFn fused_fn = pick_matmul(true, true);
  (fused ? fused_fn : exact_fn)(a, lda, rows, K, b, b_is_bf16, ldb, tn, acc, ldc, false);
}

}  // namespace jax_ark::cpu::kernels

#undef ARK_ALWAYS_INLINE
