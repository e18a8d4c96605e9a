// The GPU's global nanosecond clock, shared by every bounded wait and profile record on the device.
#pragma once

#include <stdint.h>

#include "jax_ark/gpu/protocol.hpp"

namespace jax_ark::gpu {

// %globaltimer: nanoseconds, the same clock on every SM (unlike clock64), so deadlines computed in
// one block hold in every other. One definition with the protocol's waits (proto::now_ns).
__device__ __forceinline__ uint64_t global_timer_ns() { return proto::now_ns(); }

}  // namespace jax_ark::gpu
