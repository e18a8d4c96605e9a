// Index math of the tensor-core GEMM sub-tile (tile_ops_device.cuh, gemm_tile): which shared-memory
// element every lane feeds into each register of `mma.sync.aligned.m16n8k16.row.col` and where each
// accumulator register lands in the output tile. Plain C++ (no CUDA headers) so that
// tests/test_gemm_layout.py compiles it on the host and checks it, element by element, against the
// PTX ISA fragment tables: a wrong index here gives silently wrong numbers only on a GPU.
#pragma once

#if defined(__CUDACC__)
#define ARK_GEMM_HD __host__ __device__ __forceinline__
#else
#define ARK_GEMM_HD inline
#endif

namespace jax_ark::gpu::tile {

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 32;
constexpr int kGemmPadH = kGemmBK + 8;  // halves per smem row of the 16-bit tiles (conflict-free)
constexpr int kGemmPadF = kGemmBN + 4;  // floats per smem row of the f32 tiles / output

// Staging: element i (0 <= i < kGemmBM * kGemmBK) of a slab goes to (outer, k). Consecutive i walk
// the operand's contiguous dimension (k when k_contig, else outer) so the global loads coalesce.
ARK_GEMM_HD void gemm_stage_coords(int i, bool k_contig, int* outer, int* k) {
  *outer = k_contig ? i / kGemmBK : i % kGemmBM;
  *k = k_contig ? i % kGemmBK : i / kGemmBM;
}

// The 16-bit slabs are stored outer-major: as[m][k], bs[n][k] (row stride kGemmPadH halves), i.e.
// A row-major and B "column-major" (k contiguous per n), the operand orders of .row.col.
ARK_GEMM_HD int mma_smem_index(int outer, int k) { return outer * kGemmPadH + k; }

// 8 warps as 2 (m) x 4 (n); warp w owns rows [mma_warp_m0(w), +32) and cols [mma_warp_n0(w), +16)
// of the 64 x 64 sub-tile as 2 x 2 mma tiles of 16 x 8 (mf, nf).
ARK_GEMM_HD int mma_warp_m0(int warp) { return (warp >> 2) * 32; }
ARK_GEMM_HD int mma_warp_n0(int warp) { return (warp & 3) * 16; }

// A fragment register reg (0..3) of `lane` for the 16 x 16 A tile (mf, k-step ks): two consecutive-k
// halves, the lower k in the low 16 bits. Returns the smem index of the lower one.
// PTX: row = lane/4 + 8*(reg%2), k = 2*(lane%4) + 8*(reg/2).
ARK_GEMM_HD int mma_a_index(int warp, int lane, int mf, int ks, int reg) {
  return mma_smem_index(mma_warp_m0(warp) + mf * 16 + (lane >> 2) + (reg & 1) * 8,
                        ks + (lane & 3) * 2 + (reg >> 1) * 8);
}

// B fragment register reg (0..1) for the 16 x 8 B tile (nf, ks): n = lane/4, k = 2*(lane%4) + 8*reg.
ARK_GEMM_HD int mma_b_index(int warp, int lane, int nf, int ks, int reg) {
  return mma_smem_index(mma_warp_n0(warp) + nf * 8 + (lane >> 2), ks + (lane & 3) * 2 + reg * 8);
}

// Accumulator register i (0..3) of `lane` for mma tile (mf, nf): row lane/4 + 8*(i/2), col
// 2*(lane%4) + i%2 of the 16 x 8 tile, returned as (row, col) of the 64 x 64 sub-tile.
ARK_GEMM_HD int mma_c_row(int warp, int lane, int mf, int i) {
  return mma_warp_m0(warp) + mf * 16 + (lane >> 2) + (i >> 1) * 8;
}
ARK_GEMM_HD int mma_c_col(int warp, int lane, int nf, int i) {
  return mma_warp_n0(warp) + nf * 8 + (lane & 3) * 2 + (i & 1);
}

}  // namespace jax_ark::gpu::tile
