// One cooperative kernel launch: the runtime starts every block at once or fails the launch, which
// the spin waits between blocks (ranks of the harness, workers of the persistent kernel) rely on.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace jax_ark::gpu {

template <typename... KernelParams, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(KernelParams...), unsigned grid, unsigned block,
                               size_t dynamic_smem_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = dynamic_smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace jax_ark::gpu
