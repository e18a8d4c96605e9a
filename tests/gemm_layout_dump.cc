// Prints the index tables of cuda/include/jax_ark/gpu/gemm_layout.hpp (the tensor-core GEMM tile's
// staging and mma fragment mapping) for tests/test_gemm_layout.py, which checks them on the host.
#include <cstdio>

#include "jax_ark/gpu/gemm_layout.hpp"

using namespace jax_ark::gpu::tile;

int main() {
  std::printf("P %d %d %d %d\n", kGemmBM, kGemmBN, kGemmBK, kGemmPadH);
  for (int kc = 0; kc < 2; ++kc)
    for (int i = 0; i < kGemmBM * kGemmBK; ++i) {
      int o, k;
      gemm_stage_coords(i, kc != 0, &o, &k);
      std::printf("S %d %d %d %d %d\n", kc, i, o, k, mma_smem_index(o, k));
    }
  for (int warp = 0; warp < 8; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int f = 0; f < 2; ++f)
        for (int ks = 0; ks < kGemmBK; ks += 16) {
          for (int reg = 0; reg < 4; ++reg)
            std::printf("A %d %d %d %d %d %d\n", warp, lane, f, ks, reg,
                        mma_a_index(warp, lane, f, ks, reg));
          for (int reg = 0; reg < 2; ++reg)
            std::printf("B %d %d %d %d %d %d\n", warp, lane, f, ks, reg,
                        mma_b_index(warp, lane, f, ks, reg));
        }
  for (int warp = 0; warp < 8; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int mf = 0; mf < 2; ++mf)
        for (int nf = 0; nf < 2; ++nf)
          for (int i = 0; i < 4; ++i)
            std::printf("C %d %d %d %d %d %d %d\n", warp, lane, mf, nf, i,
                        mma_c_row(warp, lane, mf, i), mma_c_col(warp, lane, nf, i));
  return 0;
}
