// Host interface of the CUDA persistent-loop executor (cuda/src/gpu/persistent_kernel.cu), used by
// the `ark_persistent` FFI handler (xla_ffi/gpu/persistent.cc). Enqueue only: nothing here
// synchronizes with the GPU, so the handler stays asynchronous like every XLA op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace jax_ark::gpu {

// Operand / result pointers travel in the kernel's parameter block (4 KiB limit on sm_80).
constexpr int kPersistentMaxArgs = 128;
constexpr int kPersistentMaxResults = 48;

struct PersistentLaunchArgs {
  const int32_t* plan = nullptr;    // device copy of the plan words (the last FFI operand)
  int64_t plan_words = 0;
  void* const* args = nullptr;      // FFI operands with storage 0, in order
  int num_args = 0;
  void* const* results = nullptr;   // user outputs (storage 1), in order
  int num_results = 0;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  int32_t* counters = nullptr;      // int32[num_tasks], zeroed here (cudaMemsetAsync) before launch
  int64_t* profile = nullptr;       // int64[num_tasks * 4] or null
  int num_workers = 0;
  int num_tasks = 0;
  int64_t timeout_ms = 0;
  int64_t chaos_seed = 0;
};

// Zeroes the counters (and the profile) and launches the kernel on `stream`. Returns an empty
// string on success, otherwise a message (bad arguments or a failing CUDA call, named).
std::string persistent_enqueue(cudaStream_t stream, const PersistentLaunchArgs& args);

// If a run enqueued earlier on the current device recorded a failure (a dependency wait that timed
// out, a malformed plan seen on the device), returns true, fills `message` and `is_timeout`, and
// clears the record. Never blocks.
bool persistent_take_failure(std::string* message, bool* is_timeout);

// How many blocks of the persistent kernel CUDA device `device` keeps resident at once (SMs x
// blocks per SM at the kernel's shared memory): the most workers a plan may have there. The planner
// asks this at trace time; the calling thread's current device is restored. Empty string on success.
std::string persistent_max_workers(int device, int* blocks);

}  // namespace jax_ark::gpu
