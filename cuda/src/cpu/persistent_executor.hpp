// CPU executor of persistent-kernel plans (docs/plan_format.md): worker threads stand in for SMs,
// each walks its queue, waits on dependency counters, runs the tile op and signals its counter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "jax_ark/plan_format.hpp"
#include "persistent_region.hpp"

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

// Plan v3 communication (PUT ops): this rank's place in its group and the group's symmetric
// regions at this call site (persistent_region.hpp), reused by every call there.
struct PersistentComm {
  int rank = 0;
  int size = 0;         // = the plan's group_size
  int64_t run_id = 0;   // XLA's run id: the ranks' k-th calls here must be one execution
  std::shared_ptr<PersistentRegion> region;
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
