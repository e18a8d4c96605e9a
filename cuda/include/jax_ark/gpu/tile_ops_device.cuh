// Device tile operations of the persistent loop kernel. Each function is executed by ALL threads of
// one block (kBlockThreads) on one tile and is plan-format independent: the interpreter
// (cuda/src/gpu/persistent_kernel.cu) decodes a task and calls these with plain pointers/strides.
//
// Conventions
//  * Every function starts and ends with the block converged; it may use __syncthreads() freely.
//  * Data that another block may have produced during this kernel is read with ld.global.cg
//    (L2, coherent after the acquire/__syncthreads() of the dependency wait). Only tensors that are
//    kernel inputs and never written by the plan may use the non-coherent streaming path.
//  * Accumulation is float32 for every dtype. Results go through an epilogue functor
//    `epi(i, j, value)` so the caller decides the element math and the store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "jax_ark/gpu/gemm_layout.hpp"

namespace jax_ark::gpu::tile {

constexpr int kBlockThreads = 256;
constexpr int kWarps = kBlockThreads / 32;

// Storage dtypes; the codes equal the plan format's (plan_format.hpp, enum DType).
enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kBool = 3, kI32 = 4 };

__host__ __device__ constexpr int dtype_bytes(DType t) {
  return t == DType::kBF16 || t == DType::kF16 ? 2 : (t == DType::kBool ? 1 : 4);
}

// ---------------------------------------------------------------------------------------------
// Scalar loads/stores with conversion to/from float32.

// Coherent (L2) load of one element as float: safe for data produced earlier in this kernel.
__device__ __forceinline__ float load_f32(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return __ldcg(static_cast<const float*>(base) + i);
    case DType::kBF16: {
      const unsigned short bits = __ldcg(static_cast<const unsigned short*>(base) + i);
      return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    }
    case DType::kF16: {
      const unsigned short bits = __ldcg(static_cast<const unsigned short*>(base) + i);
      return __half2float(__ushort_as_half(bits));
    }
    case DType::kBool: {
      // No byte-sized __ldcg overload: load the aligned 32-bit word that holds the byte.
      const uintptr_t addr = reinterpret_cast<uintptr_t>(static_cast<const uint8_t*>(base) + i);
      const unsigned int word = __ldcg(reinterpret_cast<const unsigned int*>(addr & ~uintptr_t{3}));
      return ((word >> (8 * (addr & 3))) & 0xffu) != 0 ? 1.f : 0.f;
    }
    case DType::kI32: return static_cast<float>(__ldcg(static_cast<const int*>(base) + i));
  }
  return 0.f;
}

// Round-to-nearest-even conversion on store (what XLA does for convert f32 -> bf16/f16).
// Stores are plain st.global (write-back to L2); the release increment after the task publishes them.
__device__ __forceinline__ void store_f32(void* base, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(base)[i] = v; return;
    case DType::kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); return;
    case DType::kF16: static_cast<__half*>(base)[i] = __float2half_rn(v); return;
    case DType::kBool: static_cast<uint8_t*>(base)[i] = v != 0.f ? 1 : 0; return;
    case DType::kI32: {
      // XLA's f32->s32 convert saturates and maps NaN to 0; match it rather than UB of a cast.
      int r;
      if (v != v) r = 0;
      else if (v >= 2147483648.f) r = 2147483647;
      else if (v <= -2147483648.f) r = (-2147483647 - 1);
      else r = static_cast<int>(v);
      static_cast<int*>(base)[i] = r;
      return;
    }
  }
}

// Rounds a float32 value to the precision of `t` and back (used by epilogue programs that must
// reproduce per-op rounding of 16-bit dtypes).
__device__ __forceinline__ float round_to(DType t, float v) {
  switch (t) {
    case DType::kBF16: return __bfloat162float(__float2bfloat16_rn(v));
    case DType::kF16: return __half2float(__float2half_rn(v));
    case DType::kBool: return v != 0.f ? 1.f : 0.f;
    case DType::kI32: return truncf(v);
    default: return v;
  }
}

// ---------------------------------------------------------------------------------------------
// Vector loads: raw 4/8/16-byte words, either the read-only streaming path (weights: kernel inputs
// never written by the plan) or the coherent L2 path.

template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  uint32_t w[4];
};
template <>
struct RawVec<8> {
  uint32_t w[2];
};
template <>
struct RawVec<4> {
  uint32_t w[1];
};

template <int kBytes>
__device__ __forceinline__ RawVec<kBytes> load_vec_stream(const void* p) {
  RawVec<kBytes> r;
  if constexpr (kBytes == 16) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
                 : "l"(p));
  } else if constexpr (kBytes == 8) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
                 : "=r"(r.w[0]), "=r"(r.w[1])
                 : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
  }
  return r;
}

template <int kBytes>
__device__ __forceinline__ RawVec<kBytes> load_vec_coherent(const void* p) {
  RawVec<kBytes> r;
  if constexpr (kBytes == 16) {
    const uint4 v = __ldcg(static_cast<const uint4*>(p));
    r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
  } else if constexpr (kBytes == 8) {
    const uint2 v = __ldcg(static_cast<const uint2*>(p));
    r.w[0] = v.x, r.w[1] = v.y;
  } else {
    r.w[0] = __ldcg(static_cast<const unsigned int*>(p));
  }
  return r;
}

// Unpacks kVW elements of type T held in a raw vector into floats.
template <typename T, int kVW>
__device__ __forceinline__ void unpack(const RawVec<kVW * sizeof(T)>& r, float (&out)[kVW]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < kVW; ++j) out[j] = __uint_as_float(r.w[j]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int j = 0; j < kVW / 2; ++j) {
      out[2 * j] = __uint_as_float(r.w[j] << 16);
      out[2 * j + 1] = __uint_as_float(r.w[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVW / 2; ++j) {
      __half2 h;
      memcpy(&h, &r.w[j], 4);
      const float2 f = __half22float2(h);
      out[2 * j] = f.x;
      out[2 * j + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ float scalar_to_f32(const T* p, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    return stream ? __ldg(p) : __ldcg(p);
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    const unsigned short bits = stream ? __ldg(q) : __ldcg(q);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// L2 prefetch of a strided 2-D region (rows x row_bytes, rows `stride_bytes` apart), capped at
// max_bytes. Issued for the NEXT task's weights while this block waits for its current task's
// dependencies, so the wait hop and the weight streaming overlap (one prefetch per 128-B line).
__device__ __forceinline__ void prefetch_l2_region(const void* base, int64_t rows, int64_t row_bytes,
                                                   int64_t stride_bytes, int64_t max_bytes) {
  if (base == nullptr || rows <= 0 || row_bytes <= 0) return;
  // +1 line: a row that does not start on a 128-B boundary can touch one more line.
  const int64_t lines_per_row = (row_bytes + 127) / 128 + 1;
  int64_t max_rows = rows;
  if (row_bytes * rows > max_bytes) max_rows = max_bytes / row_bytes > 0 ? max_bytes / row_bytes : 1;
  const int64_t total = max_rows * lines_per_row;
  const char* b = static_cast<const char*>(base);
  for (int64_t i = threadIdx.x; i < total; i += kBlockThreads) {
    const int64_t r = i / lines_per_row, l = i % lines_per_row;
    const char* row = b + r * stride_bytes;
    const char* line = reinterpret_cast<const char*>(
        (reinterpret_cast<uintptr_t>(row) & ~uintptr_t{127}) + static_cast<uintptr_t>(l) * 128);
    if (line < row + row_bytes) asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory budget. The persistent kernel allocates kSmemBytes of dynamic shared memory once;
// every tile op carves its scratch from it.
constexpr int kGemvXChunkFloats = 8192;  // activation chunk staged in smem (32 KiB)
constexpr int kGemvOutFloats = 4096;     // per-pass output tile (batch x columns)
constexpr int kGemvRedFloats = kBlockThreads * 8;
constexpr int kSmemFloats = kGemvXChunkFloats + kGemvOutFloats + kGemvRedFloats;
constexpr int kSmemBytes = kSmemFloats * 4;  // 56 KiB: fits sm_80 (164 KiB) and sm_90 (227 KiB)

__device__ __forceinline__ int floor_pow2(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// ---------------------------------------------------------------------------------------------
// GEMV / skinny GEMM, "x @ W" with W stored row-major (K, N):  y[b, n] = sum_k x[b, k] * W[k, n]
// for b < batch (1..16) and n in [n_begin, n_end). Memory bound: W is streamed once with 4-16 byte
// vector loads along N, kUnroll loads in flight per thread; x is staged (as float) in shared memory
// in K chunks. Thread t owns column vector v = t % Vp and rows k = t / Vp (mod R = 256 / Vp); the
// partial sums of the R row groups are reduced by warp shuffles and then through shared memory.
struct GemvParams {
  const void* x;         // activations, x[b * x_batch_stride + k * x_k_stride]
  DType x_dtype;
  int64_t x_batch_stride;
  int64_t x_k_stride;
  const void* w;         // weights, W[k, n] = w[k * w_row_stride + n]
  int64_t w_row_stride;
  bool w_stream;         // W is a kernel input never written by the plan: use the nc path
  int batch;
  int64_t K;
  int64_t n_begin, n_end;
};

// Raw load of one weight vector (kVW elements at `src`): a single vector load when the whole vector
// is inside the tile and aligned, else element by element (masked, packed into the same raw form).
template <typename WT, int kVW>
__device__ __forceinline__ RawVec<kVW * sizeof(WT)> load_weight_vec(const WT* src, bool full,
                                                                   bool stream, int valid) {
  constexpr int kBytes = kVW * static_cast<int>(sizeof(WT));
  if (full) return stream ? load_vec_stream<kBytes>(src) : load_vec_coherent<kBytes>(src);
  RawVec<kBytes> r;
#pragma unroll
  for (int j = 0; j < kBytes / 4; ++j) r.w[j] = 0u;
  if constexpr (sizeof(WT) == 4) {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(src);
#pragma unroll
    for (int j = 0; j < kVW; ++j)
      if (j < valid) r.w[j] = stream ? __ldg(q + j) : __ldcg(q + j);
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(src);
#pragma unroll
    for (int j = 0; j < kVW; ++j)
      if (j < valid) {
        const uint32_t bits = stream ? __ldg(q + j) : __ldcg(q + j);
        r.w[j / 2] |= bits << (16 * (j % 2));
      }
  }
  return r;
}

// `wait()` is called exactly once by every thread, after the first weight loads are in flight and
// before any activation is read: the caller passes the dependency wait there, so that for weights
// that are kernel inputs the first loads overlap the wait. Returns false if wait() did.
template <typename WT, int kBT, int kVW, typename Epi, typename Wait>
__device__ __noinline__ bool gemv_kn_impl(const GemvParams& p, float* smem, Epi& epi, Wait& wait) {
  constexpr int kVecBytes = kVW * static_cast<int>(sizeof(WT));
  constexpr int kKC = kGemvXChunkFloats / kBT;  // K rows per staged chunk
  constexpr int kUnroll = kBT <= 2 ? 8 : 4;
  // Columns per pass: Vp vectors of kVW, with kBT * Vp * kVW <= kGemvOutFloats and Vp <= 256.
  constexpr int kMaxVpRaw = kGemvOutFloats / (kBT * kVW);
  constexpr int kMaxVp = kMaxVpRaw > kBlockThreads ? kBlockThreads : kMaxVpRaw;
  using Raw = RawVec<kVecBytes>;
  float* xs = smem;                           // [kBT][kKC]
  float* out = smem + kGemvXChunkFloats;      // [kBT][Vp * kVW]
  float* red = out + kGemvOutFloats;          // [S][Vp * kVW]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t tn = p.n_end - p.n_begin;
  const int64_t vec_needed = (tn + kVW - 1) / kVW;
  int vp = 1;
  while (vp < vec_needed && vp < kMaxVp) vp *= 2;
  const int rgroups = kBlockThreads / vp;
  const int v = tid % vp, rg = tid / vp;
  const int pass_cols = vp * kVW;
  const WT* w = static_cast<const WT*>(p.w);
  const bool aligned = (reinterpret_cast<uintptr_t>(w) % kVecBytes == 0) &&
                       (p.w_row_stride % kVW == 0) && (p.n_begin % kVW == 0);
  // Weights written during this kernel must not be read before the wait (acquire) returns.
  bool waited = false;
  if (!p.w_stream || p.K == 0 || tn <= 0) {
    waited = true;
    if (!wait()) return false;
  }

  for (int64_t c0 = p.n_begin; c0 < p.n_end; c0 += pass_cols) {
    const int64_t col = c0 + static_cast<int64_t>(v) * kVW;
    const bool any = col < p.n_end;
    const bool full = aligned && col + kVW <= p.n_end;
    const int valid = any ? static_cast<int>(p.n_end - col < kVW ? p.n_end - col : kVW) : 0;
    float acc[kBT][kVW];
#pragma unroll
    for (int b = 0; b < kBT; ++b)
#pragma unroll
      for (int j = 0; j < kVW; ++j) acc[b][j] = 0.f;

    // Issues the kUnroll loads of rows k, k + R, ... (of chunk kc) without consuming them.
    auto load_group = [&](Raw (&raw)[kUnroll], int64_t kc, int kl, int k) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int kk = k + u * rgroups;
        if (any && kk < kl) {
          const WT* src = w + (kc + kk) * p.w_row_stride + col;
          raw[u] = load_weight_vec<WT, kVW>(src, full, p.w_stream, valid);
        } else {
#pragma unroll
          for (int j = 0; j < kVecBytes / 4; ++j) raw[u].w[j] = 0u;
        }
      }
    };

    for (int64_t kc = 0; kc < p.K; kc += kKC) {
      const int kl = static_cast<int>(p.K - kc < kKC ? p.K - kc : kKC);
      // Two-stage pipeline: the group in flight (cur) is consumed while the next one loads.
      Raw cur[kUnroll];
      load_group(cur, kc, kl, rg);
      if (!waited) {
        waited = true;
        if (!wait()) return false;  // block-uniform
      }
      __syncthreads();  // previous readers of xs are done
      // Only the kl rows of the chunk and the batch's rows: the loop below reads xs[b][k] for
      // k < kl only, and rows b >= batch feed accumulators that are never reduced or stored (it
      // walked all kBT * kKC = 8192 floats before, 8x the work for K = 1024).
      const int rows = p.batch < kBT ? static_cast<int>(p.batch) : kBT;
      for (int b = 0; b < rows; ++b)
        for (int k = tid; k < kl; k += kBlockThreads)
          xs[b * kKC + k] =
              load_f32(p.x, p.x_dtype, b * p.x_batch_stride + (kc + k) * p.x_k_stride);
      __syncthreads();
      if (any) {
        for (int k = rg; k < kl; k += kUnroll * rgroups) {
          Raw nxt[kUnroll];
          const int kn = k + kUnroll * rgroups;
          if (kn < kl) load_group(nxt, kc, kl, kn);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int kk = k + u * rgroups;
            if (kk < kl) {
              float wf[kVW];
              unpack<WT, kVW>(cur[u], wf);
#pragma unroll
              for (int b = 0; b < kBT; ++b) {
                const float xv = xs[b * kKC + kk];
#pragma unroll
                for (int j = 0; j < kVW; ++j) acc[b][j] = fmaf(xv, wf[j], acc[b][j]);
              }
            }
          }
          if (kn < kl) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) cur[u] = nxt[u];
          }
        }
      }
    }

    // Reduce the row groups: warp shuffles first (lanes with equal v), then shared memory.
    const int slots = vp < 32 ? kWarps : rgroups;
#pragma unroll
    for (int b = 0; b < kBT; ++b) {
      if (b >= p.batch) break;  // uniform across the block
#pragma unroll
      for (int j = 0; j < kVW; ++j) {
        float val = acc[b][j];
        if (vp < 32) {
          for (int o = vp; o < 32; o <<= 1) val += __shfl_xor_sync(0xffffffffu, val, o);
          if (lane < vp) red[warp * pass_cols + lane * kVW + j] = val;
        } else {
          red[rg * pass_cols + v * kVW + j] = val;
        }
      }
      __syncthreads();
      for (int i = tid; i < pass_cols; i += kBlockThreads) {
        float s = 0.f;
        for (int r = 0; r < slots; ++r) s += red[r * pass_cols + i];
        out[b * pass_cols + i] = s;
      }
      __syncthreads();
    }
    const int64_t cols_here = p.n_end - c0 < pass_cols ? p.n_end - c0 : pass_cols;
    for (int i = tid; i < p.batch * cols_here; i += kBlockThreads) {
      const int b = static_cast<int>(i / cols_here);
      const int c = static_cast<int>(i % cols_here);
      epi(static_cast<int64_t>(b), c0 + c, out[b * pass_cols + c]);
    }
    // The next pass (or the caller) starts with a __syncthreads() before touching smem again.
  }
  __syncthreads();
  return true;
}

// Dispatch on the weight dtype and the batch size (rounded up to a power of two; the padding rows'
// activations are not staged, and their accumulators are never reduced or stored). The caller guarantees 1 <= batch <= 16 and a float weight dtype.
template <typename Epi, typename Wait>
__device__ bool gemv_kn(const GemvParams& p, DType w_dtype, float* smem, Epi& epi, Wait& wait) {
  const int bt = p.batch <= 1 ? 1 : p.batch <= 2 ? 2 : p.batch <= 4 ? 4 : p.batch <= 8 ? 8 : 16;
#define JAX_ARK_GEMV_CASE(WT, VW_SMALL, VW_BIG)                                  \
  switch (bt) {                                                                \
    case 1: return gemv_kn_impl<WT, 1, VW_SMALL>(p, smem, epi, wait);          \
    case 2: return gemv_kn_impl<WT, 2, VW_SMALL>(p, smem, epi, wait);          \
    case 4: return gemv_kn_impl<WT, 4, VW_SMALL>(p, smem, epi, wait);          \
    case 8: return gemv_kn_impl<WT, 8, VW_SMALL>(p, smem, epi, wait);          \
    default: return gemv_kn_impl<WT, 16, VW_BIG>(p, smem, epi, wait);          \
  }
  switch (w_dtype) {
    case DType::kBF16: JAX_ARK_GEMV_CASE(__nv_bfloat16, 8, 4)
    case DType::kF16: JAX_ARK_GEMV_CASE(__half, 8, 4)
    default: JAX_ARK_GEMV_CASE(float, 4, 2)
  }
#undef JAX_ARK_GEMV_CASE
}

// ---------------------------------------------------------------------------------------------
// GEMM tile: C(m, n) = sum_k A(m, k) * B(k, n) over rows [m0, m1), cols [n0, n1), computed in
// 64x64 sub-tiles with BK = 32. Operands are addressed through strides, so either operand may be
// transposed; batching is done by the caller offsetting the base pointers.
// bf16/f16 x same dtype -> mma.sync m16n8k16 (fp32 accumulate); anything else -> FFMA in fp32.
struct GemmParams {
  const void* a;
  DType a_dtype;
  int64_t a_sm, a_sk;  // A(m, k) = a[m * a_sm + k * a_sk]
  const void* b;
  DType b_dtype;
  int64_t b_sk, b_sn;  // B(k, n) = b[k * b_sk + n * b_sn]
  int64_t m0, m1, n0, n1, K;
};

// Tile sizes, smem strides and the mma fragment index math: gemm_layout.hpp (host-tested).

// Stages the (kGemmBM x kGemmBK) A-slab and (kGemmBN x kGemmBK) B-slab. Consecutive threads walk the
// operand's contiguous dimension so the scalar L2 loads coalesce.
template <typename Store>
__device__ __forceinline__ void gemm_stage(const void* base, DType t, int64_t s_outer, int64_t s_k,
                                           int64_t outer0, int64_t outer_end, int64_t k0,
                                           int64_t k_end, Store store) {
  const bool k_contig = s_k == 1;
  static_assert(kGemmBM == kGemmBN, "one staging loop serves the A (m) and B (n) slabs");
  for (int i = threadIdx.x; i < kGemmBM * kGemmBK; i += kBlockThreads) {
    int o, k;
    gemm_stage_coords(i, k_contig, &o, &k);
    const int64_t go = outer0 + o, gk = k0 + k;
    const float v = (go < outer_end && gk < k_end) ? load_f32(base, t, go * s_outer + gk * s_k) : 0.f;
    store(o, k, v);
  }
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename Epi>
__device__ void gemm_tile(const GemmParams& p, float* smem, Epi& epi) {
  const int tid = threadIdx.x;
  const bool tensor_core = p.a_dtype == p.b_dtype &&
                           (p.a_dtype == DType::kBF16 || p.a_dtype == DType::kF16);
  float* cs = smem;  // [kGemmBM][kGemmPadF] output sub-tile
  for (int64_t mb = p.m0; mb < p.m1; mb += kGemmBM) {
    for (int64_t nb = p.n0; nb < p.n1; nb += kGemmBN) {
      if (tensor_core) {
        // 8 warps as 2 (m) x 4 (n); each warp owns 32 x 16 = 2 x 2 mma tiles of 16 x 8.
        uint16_t* as = reinterpret_cast<uint16_t*>(smem + kGemmBM * kGemmPadF);  // [BM][PadH]
        uint16_t* bs = as + kGemmBM * kGemmPadH;                                  // [BN][PadH]
        const bool is_bf16 = p.a_dtype == DType::kBF16;
        const int warp = tid >> 5, lane = tid & 31;
        float acc[2][2][4] = {};
        for (int64_t k0 = 0; k0 < p.K; k0 += kGemmBK) {
          __syncthreads();
          auto to_bits = [is_bf16](float v) -> uint16_t {
            return is_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v))
                           : __half_as_ushort(__float2half_rn(v));
          };
          // Values are exact 16-bit inputs widened to float, so narrowing back is lossless.
          gemm_stage(p.a, p.a_dtype, p.a_sm, p.a_sk, mb, p.m1, k0, p.K,
                     [&](int m, int k, float v) { as[mma_smem_index(m, k)] = to_bits(v); });
          gemm_stage(p.b, p.b_dtype, p.b_sn, p.b_sk, nb, p.n1, k0, p.K,
                     [&](int n, int k, float v) { bs[mma_smem_index(n, k)] = to_bits(v); });
          __syncthreads();
#pragma unroll
          for (int ks = 0; ks < kGemmBK; ks += 16) {
            uint32_t af[2][4], bfr[2][2];
#pragma unroll
            for (int mf = 0; mf < 2; ++mf)
#pragma unroll
              for (int reg = 0; reg < 4; ++reg)  // index is even: 4-byte aligned pair of halves
                af[mf][reg] = *reinterpret_cast<const uint32_t*>(
                    as + mma_a_index(warp, lane, mf, ks, reg));
#pragma unroll
            for (int nf = 0; nf < 2; ++nf)
#pragma unroll
              for (int reg = 0; reg < 2; ++reg)
                bfr[nf][reg] = *reinterpret_cast<const uint32_t*>(
                    bs + mma_b_index(warp, lane, nf, ks, reg));
#pragma unroll
            for (int mf = 0; mf < 2; ++mf)
#pragma unroll
              for (int nf = 0; nf < 2; ++nf) {
                if (is_bf16) mma_bf16_16816(acc[mf][nf], af[mf], bfr[nf]);
                else mma_f16_16816(acc[mf][nf], af[mf], bfr[nf]);
              }
          }
        }
        __syncthreads();
#pragma unroll
        for (int mf = 0; mf < 2; ++mf)
#pragma unroll
          for (int nf = 0; nf < 2; ++nf)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              cs[mma_c_row(warp, lane, mf, i) * kGemmPadF + mma_c_col(warp, lane, nf, i)] =
                  acc[mf][nf][i];
      } else {
        // FFMA: 256 threads as 16 x 16, each a 4 x 4 micro-tile; smem slabs k-major.
        float* as = smem + kGemmBM * kGemmPadF;  // [BK][PadF] (m fastest)
        float* bs = as + kGemmBK * kGemmPadF;    // [BK][PadF] (n fastest)
        const int tm = (tid >> 4) * 4, tnn = (tid & 15) * 4;
        float acc[4][4] = {};
        for (int64_t k0 = 0; k0 < p.K; k0 += kGemmBK) {
          __syncthreads();
          gemm_stage(p.a, p.a_dtype, p.a_sm, p.a_sk, mb, p.m1, k0, p.K,
                     [&](int m, int k, float v) { as[k * kGemmPadF + m] = v; });
          gemm_stage(p.b, p.b_dtype, p.b_sn, p.b_sk, nb, p.n1, k0, p.K,
                     [&](int n, int k, float v) { bs[k * kGemmPadF + n] = v; });
          __syncthreads();
#pragma unroll 8
          for (int k = 0; k < kGemmBK; ++k) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = as[k * kGemmPadF + tm + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = bs[k * kGemmPadF + tnn + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
          }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) cs[(tm + i) * kGemmPadF + tnn + j] = acc[i][j];
      }
      __syncthreads();
      for (int i = tid; i < kGemmBM * kGemmBN; i += kBlockThreads) {
        const int r = i / kGemmBN, c = i % kGemmBN;
        if (mb + r < p.m1 && nb + c < p.n1) epi(mb + r, nb + c, cs[r * kGemmPadF + c]);
      }
      __syncthreads();
    }
  }
}

static_assert(kGemmBM * kGemmPadF * 4 + 2 * kGemmBK * kGemmPadF * 4 <= kSmemBytes,
              "GEMM scratch must fit the kernel's shared memory");
static_assert(kGemmBM * kGemmPadF * 4 + 2 * kGemmBM * kGemmPadH * 2 <= kSmemBytes,
              "GEMM scratch must fit the kernel's shared memory");

// ---------------------------------------------------------------------------------------------
// Row reductions: out(r) = reduce_{c < ncols} load(r, c) for r in [r0, r1), one warp per row, float32
// accumulation. Lanes stride the row, then a fixed xor-shuffle tree: deterministic run to run.
enum class ReduceKind : int32_t { kSum = 0, kMax = 1, kMin = 2 };

// XLA's max/min propagate NaN; fmaxf/fminf would drop it.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }

__device__ __forceinline__ float reduce_init(ReduceKind k) {
  return k == ReduceKind::kSum ? 0.f : (k == ReduceKind::kMax ? -INFINITY : INFINITY);
}
__device__ __forceinline__ float reduce_combine(ReduceKind k, float a, float b) {
  return k == ReduceKind::kSum ? a + b : (k == ReduceKind::kMax ? nan_max(a, b) : nan_min(a, b));
}

// A warp-wide xor shuffle of any trivially copyable value, one 32-bit word at a time (a float, or
// an (bits, index) pair of an arg reduction).
template <typename T>
__device__ __forceinline__ T shfl_xor_words(T v, int offset) {
  static_assert(sizeof(T) % 4 == 0 && std::is_trivially_copyable<T>::value, "32-bit words");
  uint32_t w[sizeof(T) / 4];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], offset);
  memcpy(&v, w, sizeof(T));
  return v;
}

// out(r) = fold over c < ncols of element(r, c), for r in [r0, r1): acc = combine(acc, element)
// from `identity`, lanes striding the row, then a fixed xor-shuffle tree (deterministic run to
// run; the order differs from a sequential fold, so `combine` must be associative and commutative
// or, for float sums, the caller accepts the tree's rounding). epi(r, acc) is called once per row.
template <typename Acc, typename Element, typename Combine, typename Epi>
__device__ void row_fold(int64_t r0, int64_t r1, int64_t ncols, Acc identity, Element& element,
                         Combine& combine, Epi& epi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rows = r1 - r0;
  if (rows > 0 && rows * 2 <= kWarps) {
    // Few rows (a norm over one token, the argmax of one row of logits): one warp per row would
    // leave most of the block idle, so `per` warps share each row (columns strided by 32 * per) and
    // combine their partials through shared memory. Block-uniform branch: rows is the task's.
    __shared__ Acc partial[kWarps];
    int per = 1;
    while (rows * per * 2 <= kWarps) per *= 2;
    const int busy = static_cast<int>(rows) * per;
    const int part = warp % per;
    const int64_t r = r0 + warp / per;
    if (warp < busy) {
      Acc acc = identity;
      for (int64_t c = static_cast<int64_t>(part) * 32 + lane; c < ncols; c += 32 * per)
        acc = combine(acc, element(r, c));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc = combine(acc, shfl_xor_words(acc, o));
      if (lane == 0) partial[warp] = acc;
    }
    __syncthreads();
    if (warp < busy && part == 0 && lane == 0) {
      Acc acc = partial[warp];
      for (int j = 1; j < per; ++j) acc = combine(acc, partial[warp + j]);
      epi(r, acc);
    }
    __syncthreads();
    return;
  }
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    Acc acc = identity;
    for (int64_t c = lane; c < ncols; c += 32) acc = combine(acc, element(r, c));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc = combine(acc, shfl_xor_words(acc, o));
    if (lane == 0) epi(r, acc);
  }
  __syncthreads();
}

// Float sum / max / min of rows: row_fold with float32 accumulation.
template <typename Load, typename Epi>
__device__ void row_reduce_tile(int64_t r0, int64_t r1, int64_t ncols, ReduceKind kind, Load& load,
                                Epi& epi) {
  auto combine = [kind](float a, float b) { return reduce_combine(kind, a, b); };
  row_fold(r0, r1, ncols, reduce_init(kind), load, combine, epi);
}

// Elementwise over a flat index range [i0, i1): consecutive threads take consecutive elements.
template <typename F>
__device__ void elementwise_tile(int64_t i0, int64_t i1, F& f) {
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kBlockThreads) f(i);
  __syncthreads();
}

}  // namespace jax_ark::gpu::tile
