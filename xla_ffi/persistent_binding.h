// The attributes of the `ark_persistent` FFI call (docs/plan_format.md, "The FFI call
// ark_persistent"; emitted by jax_ark/_persistent/_call.py), for every platform's handler: one
// list, so the CPU and CUDA handlers cannot drift from each other or from the lowering.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jax_ark {

// Ffi::Bind() with the platform's context (the CPU handler's RunId, the CUDA handler's stream),
// the operands and results, and the call's attributes; a plan with put tasks on a GPU adds its
// communicator's attributes to it.
template <typename Context>
auto persistent_binding() {
  return xla::ffi::Ffi::Bind()
      .Ctx<Context>()
      .RemainingArgs()
      .RemainingRets()
      .template Attr<int64_t>("num_workers")
      .template Attr<int64_t>("num_tasks")
      .template Attr<int64_t>("timeout_ms")
      .template Attr<int64_t>("chaos_seed")
      .template Attr<int64_t>("profile");
}

}  // namespace jax_ark
