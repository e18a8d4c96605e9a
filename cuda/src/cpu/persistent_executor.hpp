// CPU executor of persistent-kernel plans (docs/plan_format.md): worker threads stand in for SMs,
// each walks its queue, waits on dependency counters, runs the tile op and signals its counter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "jax_ark/plan_format.hpp"

namespace jax_ark::cpu {

struct PersistentBuffers {
  std::vector<void*> args;           // FFI operands, in plan order (not the plan itself)
  std::vector<size_t> arg_bytes;     // their sizes, for the bounds check
  std::vector<void*> results;        // user outputs
  std::vector<size_t> result_bytes;
  uint8_t* workspace = nullptr;
  size_t workspace_bytes = 0;
  int32_t* counters = nullptr;       // num_tasks
  int64_t* profile = nullptr;        // num_tasks * 4, or null
};

enum class PersistentStatus {
  kOk, kInvalidPlan, kDeadlineExceeded, kResourceExhausted, kRace, kAborted
};

struct PersistentResult {
  PersistentStatus status = PersistentStatus::kOk;
  std::string message;
};

// Plan v3 communication (PUT ops): this rank's place in its group and how to meet the group.
struct PersistentComm {
  int rank = 0;
  int size = 0;  // = the plan's group_size
  // Called once in every run of the plan, by the first worker that reaches a put task (so after
  // this rank reset its counters and, in chaos mode, poisoned its workspace): meets every rank
  // of the group and returns their
  // workspace and counters pointers (the symmetric workspace), indexed by rank. A peer can only
  // write into this rank's buffers after this meeting, so nothing it puts can be erased by the
  // reset, and the meeting's epochs keep back-to-back calls apart.
  std::function<PersistentResult(std::vector<uint8_t*>* workspaces, std::vector<int32_t*>* counters)>
      exchange;
};

struct PersistentOptions {
  int64_t timeout_ms = 60000;
  uint64_t chaos_seed = 0;  // 0 = off; else the adversarial test mode (persistent_executor.cc)
  // Matmul terms as fused multiply-adds (k order unchanged) where the CPU has FMA: twice the
  // peak multiply-add rate (measured: about 20% less matmul task time), results within float32
  // rounding of the plan format's order, not bitwise. Set from JAX_ARK_CPU_FMA per call.
  bool fused_matmul = false;
  const PersistentComm* comm = nullptr;  // required when the plan's group_size > 0
};

// Runs a plan that jax_ark::plan::check_plan (plan_check.hpp) accepted against these buffers, to
// completion on num_workers threads (the caller is worker 0; the others are borrowed from a bounded
// process-wide bank of threads).
PersistentResult run_plan(const int32_t* words, const PersistentBuffers& buffers,
                          const PersistentOptions& options);

}  // namespace jax_ark::cpu
