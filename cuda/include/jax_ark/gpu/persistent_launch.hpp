// Host interface of the CUDA persistent-loop executor (cuda/src/gpu/persistent_kernel.cu), used by
// the `ark_persistent` FFI handler (xla_ffi/gpu/persistent.cc). Enqueue only: nothing here
// synchronizes with the GPU, so the handler stays asynchronous like every XLA op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "jax_ark/gpu/common.hpp"
#include "jax_ark/gpu/persistent_comm_device.hpp"

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
  // A plan with put tasks: this rank's view of the group's symmetric regions (n == 0: none).
  // counters then holds int32[num_tasks * (1 + group_size)] like the CPU executor's (only the
  // first num_tasks are used: the signals live in the regions).
  PersistentCommDevice comm;
  // Where the call's epoch comes from when comm.epoch is 0: this rank's control words in device
  // memory (the communicator's RankControl; its `epoch` starts at 1). Every block reads it when
  // the kernel starts and the last block to finish advances it, so no host step counts calls and
  // a launch replayed from a CUDA graph gets the next epoch (XLA's path). The harness passes
  // explicit epochs instead (nullptr here).
  RankControl* comm_control = nullptr;
};

// Zeroes the counters (and the profile) and launches the kernel on `stream`. Returns an empty
// string on success, otherwise a message (bad arguments or a failing CUDA call, named).
std::string persistent_enqueue(cudaStream_t stream, const PersistentLaunchArgs& args);

// Calls of every rank of a group, each call ONE cooperative launch on the current device (the
// single-GPU harness), back to back on `stream` with no host step between them: calls[c][r] is
// rank r's part of call c (same plan, same num_workers; comm.rank = r, comm.epoch = the call's).
// The blocks of rank `skip_rank` (if >= 0) return at once, so its peers' waits time out. `start` /
// `stop` (optional) are recorded around the launches. Waits for the host-to-device copy of the
// parameters before the first launch (a harness, not XLA's path). Same contract otherwise.
std::string persistent_group_enqueue(cudaStream_t stream,
                                     const std::vector<std::vector<PersistentLaunchArgs>>& calls,
                                     int32_t skip_rank = -1, cudaEvent_t start = nullptr,
                                     cudaEvent_t stop = nullptr);

// What the symmetric region of a plan with put tasks needs, from the plan words on the host:
// the workspace bytes [0, inbox_bytes) that hold the inboxes (and nothing else: checked), and the
// region's layout (all zero for a plan without a group). Empty string on success, else why the
// plan cannot run with puts on a GPU.
struct PersistentCommNeeds {
  int32_t group_size = 0;
  int64_t inbox_bytes = 0;
  PersistentSymLayout layout;
};
std::string persistent_comm_needs(const int32_t* words, int64_t num_words, PersistentCommNeeds* out);

// Runs calls.size() back-to-back calls (epochs 1..C) of a plan with put tasks on every rank of a
// group of n_ranks on the current GPU: calls[c][r][i] are the bytes of rank r's FFI operand i
// (storage-0 tensors, constants included) for call c. Returns each call's and rank's user outputs
// (bytes). A plan without a group runs as n_ranks independent copies (baselines).
// skip_rank >= 0: that rank's blocks return at once (its peers' waits time out). Throws
// std::runtime_error with the device's error record (rank, peer, task, op) on failure.
std::vector<std::vector<std::vector<std::string>>> persistent_group_run(
    const std::vector<int32_t>& plan_words, int32_t n_ranks,
    const std::vector<std::vector<std::vector<std::string>>>& calls, int64_t timeout_ms,
    int64_t chaos_seed, int32_t skip_rank);

// Microseconds per call of `iters` back-to-back calls of such a plan on every rank (inputs as one
// call of persistent_group_run), timed with CUDA events around the launches only.
double persistent_group_time(const std::vector<int32_t>& plan_words, int32_t n_ranks,
                             const std::vector<std::vector<std::string>>& inputs, int32_t iters,
                             int64_t timeout_ms);

// If a run enqueued earlier on the current device recorded a failure (a dependency wait that timed
// out, a malformed plan seen on the device), returns true, fills `message` and `is_timeout`, and
// clears the record. Never blocks.
bool persistent_take_failure(std::string* message, bool* is_timeout);

// How many blocks of the persistent kernel CUDA device `device` keeps resident at once (SMs x
// blocks per SM at the kernel's shared memory): the most workers a plan may have there. The planner
// asks this at trace time; the calling thread's current device is restored. Empty string on success.
std::string persistent_max_workers(int device, int* blocks);

}  // namespace jax_ark::gpu
