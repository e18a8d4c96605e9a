// CPU executor of persistent-kernel plans (docs/plan_format.md): worker threads stand in for SMs,
// each walks its queue, waits on dependency counters, runs the tile op and signals its counter.
#pragma once

#include <cstddef>
#include <cstdint>
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

struct PersistentOptions {
  int64_t timeout_ms = 60000;
  uint64_t chaos_seed = 0;  // 0 = off; else the adversarial test mode (persistent_executor.cc)
};

enum class PersistentStatus { kOk, kInvalidPlan, kDeadlineExceeded, kResourceExhausted, kRace };

struct PersistentResult {
  PersistentStatus status = PersistentStatus::kOk;
  std::string message;
};

// Runs a plan that jax_ark::plan::check_plan (plan_check.hpp) accepted against these buffers, to
// completion on num_workers threads (the caller is worker 0; the others are borrowed from a bounded
// process-wide bank of threads).
PersistentResult run_plan(const int32_t* words, const PersistentBuffers& buffers,
                          const PersistentOptions& options);

}  // namespace jax_ark::cpu
