// The GPU's global nanosecond clock, shared by every bounded wait and profile record on the device.
#pragma once

#include <cstdint>

namespace jax_ark::gpu {

// %globaltimer: nanoseconds, the same clock on every SM (unlike clock64), so deadlines computed in
// one block hold in every other.
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace jax_ark::gpu
