// Synchronization of the persistent loop kernel: dependency counters with acquire/release
// ordering, bounded waits, the run's abort word, and the error record that a timed-out wait leaves
// for the host. Written once for the device and host threads (protocol.hpp): the kernel runs it,
// and tests/protocol_host_test.cc runs the same functions with host threads as workers.
//
// Memory-ordering contract (docs/cuda_executor.md has the full argument):
//  producer block:  all threads store the tile -> __syncthreads() -> thread 0: fence.acq_rel.gpu +
//                   red.release.gpu.add(counter)
//  consumer block:  waiting threads: ld.relaxed.gpu(counter) until >= target, then ONE
//                   ld.acquire.gpu of it -> __syncthreads() -> all threads load the tile with
//                   ld.global.cg (L2, never the non-coherent/L1 path).
// The barrier carries CTA-scope causality between the block's threads and thread 0; the
// release/acquire pair carries it across SMs at gpu scope.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "jax_ark/gpu/protocol.hpp"
#include "jax_ark/plan_format.hpp"

namespace jax_ark::gpu {

// Written by the kernel into host-mapped pinned memory when a run fails. `status` is written last
// (after a system-scope fence), so a host that sees status != 0 sees the whole record. The host
// (xla_ffi/gpu/persistent.cc) reads it before enqueueing the next call and then clears `status`.
constexpr int kPersistentNameChars = 48;
struct PersistentErrorRecord {
  int32_t status;        // kPersistentOk / kPersistentTimeout / kPersistentBadPlan
  int32_t worker;        // worker (= block) that failed
  int32_t task;          // task that was about to run
  int32_t op;            // its op index
  int32_t dep_task;      // dependency (= counter index) waited for, -1 if none
  int32_t dep_op;        // op of that dependency, -1 if none
  int32_t counter_seen;  // last value of counters[dep_task] observed
  int32_t detail;        // bad-plan reason code, 0 otherwise
  uint64_t waited_ns;    // how long the wait lasted before giving up
  uint32_t call_seq;     // which call (per-device sequence number) failed
  // kPersistentPeerTimeout (a PUT task waiting for a peer rank): who waited for whom and for what.
  int32_t rank;          // this rank in the plan's group (-1 without a group)
  int32_t peer;          // the peer rank awaited
  int32_t slot;          // the inbox slot awaited; -1: the peer's entry into this call
  int32_t run;           // the run of the put task (iteration + 1 in a loop, else 1)
  int32_t reserved;
  char op_name[kPersistentNameChars];      // name of `op` (truncated, NUL-terminated)
  char dep_op_name[kPersistentNameChars];  // name of `dep_op`
};

enum : int32_t {
  kPersistentOk = 0,
  kPersistentTimeout = 1,
  kPersistentBadPlan = 2,
  kPersistentPeerTimeout = 3,
};

// Shared state of one kernel run, visible to all blocks.
//  abort_word: device memory owned by the host runtime, one per device, never reset. A run with
//    sequence number `seq` is aborted iff *abort_word >= seq; the first failing block of the run
//    raises it with an atomic max (so no per-call memset is needed, and a failure never leaks into
//    a later call, whose seq is larger).
struct PersistentRunState {
  uint32_t* abort_word;
  uint32_t seq;
  PersistentErrorRecord* error;  // host-mapped pinned memory
  uint64_t timeout_ns;           // bound of every single wait
};

ARK_PROTO_HD bool persistent_aborted(const PersistentRunState& run) {
  return proto::AtomicRef<uint32_t, proto::Scope::kGpu>(run.abort_word).load_relaxed() >= run.seq;
}

// Marks the run aborted. Returns true for exactly one caller per run: the one that must write the
// error record.
ARK_PROTO_HD bool persistent_raise_abort(const PersistentRunState& run) {
  return proto::AtomicRef<uint32_t, proto::Scope::kGpu>(run.abort_word).fetch_max_relaxed(run.seq) <
         run.seq;
}

// Publishes a finished tile: counters[task] = finished iterations (1 outside loops; iteration i
// of a loop task stores i + 1: counters only grow, never reset). The caller orders every thread's
// tile stores before this (a block barrier on the device); the release is cumulative over them.
ARK_PROTO_HD void persistent_release_task(int32_t* counters, int32_t task, uint32_t finished = 1u) {
  proto::AtomicRef<uint32_t, proto::Scope::kGpu>(reinterpret_cast<uint32_t*>(counters + task))
      .store_release(finished);
}

// How a dependency wait ended.
enum class DepWait : int32_t { kReady = 0, kBadPlan, kTimedOut, kAborted };
struct DepWaitResult {
  DepWait status;
  int32_t dep_task;    // the dependency that failed (-1: the task's dependency range itself)
  uint32_t seen;       // last counter value observed
  uint64_t waited_ns;  // how long the failed wait lasted
};

// Waits for dependencies lane, lane + lanes, ... of `task` (counters[d] >= 1 for each) with
// proto::wait_at_least: one acquire probe (a set counter costs one load, no clock read), then
// relaxed polls and one acquire; the clock and the abort word every 32 polls (a poll is one L2
// round trip, ~0.3 us). The clock starts at the first check, so the bound is timeout + ~10 us. Device: lane = thread, lanes = threads of the block (a layer with 128 producer
// tiles costs one round trip, not 128). Host: one thread per worker, lane 0 of 1.
// Plan v3 loops: `iters` are the iterations of the task's loops (outermost first; QueueCursor::iters)
// for the run it is about to do, and each dependency's target is plan::LoopView::dep_target (the
// caller checked the loop section and the task's op). nullptr: the task is outside loops.
ARK_PROTO_HD DepWaitResult persistent_wait_deps(const plan::PlanView& plan, int32_t num_tasks,
                                                const int32_t* counters, int32_t task, int32_t lane,
                                                int32_t lanes, const PersistentRunState& run,
                                                const int64_t* iters = nullptr) {
  const int64_t no_iters[plan::kMaxLoopDepth] = {0, 0};
  if (iters == nullptr) iters = no_iters;
  const int32_t begin = plan.dep_begin(task), end = plan.dep_end(task);
  if (begin < 0 || begin > end || end > plan.header().num_dep_edges)
    return DepWaitResult{DepWait::kBadPlan, -1, 0u, 0u};
  const plan::LoopView loops{plan.words};
  const bool has_loops = loops.num_loops() > 0;
  for (int32_t e = begin + lane; e < end; e += lanes) {
    const int32_t d = plan.dep(e);
    if (d < 0 || d >= num_tasks) return DepWaitResult{DepWait::kBadPlan, d, 0u, 0u};
    uint32_t target = 1u;
    if (has_loops) {
      const int32_t d_op = plan.task(d).op;
      if (d_op < 0 || d_op >= plan.header().num_ops) return DepWaitResult{DepWait::kBadPlan, d, 0u, 0u};
      target = static_cast<uint32_t>(loops.dep_target(plan.task(task).op, d_op, iters));
    }
    const proto::AtomicRef<uint32_t, proto::Scope::kGpu> c(
        reinterpret_cast<const uint32_t*>(counters + d));
    uint64_t t0 = 0;  // the clock is read only once the first probe found the counter unset
    uint64_t waited = 0;
    bool aborted = false;
    uint32_t seen = 0;
    const bool ready = proto::wait_at_least(
        c, target,
        [&] {
          if (t0 == 0) t0 = proto::now_ns();
          if (persistent_aborted(run)) return aborted = true;
          waited = proto::now_ns() - t0;
          return waited > run.timeout_ns;
        },
        32u, &seen);
    if (!ready)
      return DepWaitResult{aborted ? DepWait::kAborted : DepWait::kTimedOut, d, seen, waited};
  }
  return DepWaitResult{DepWait::kReady, -1, 0u, 0u};
}

#if defined(__CUDACC__)
}  // namespace jax_ark::gpu
#include "jax_ark/gpu/clock_device.cuh"
namespace jax_ark::gpu {

__device__ __forceinline__ uint32_t persistent_smid() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

#endif  // __CUDACC__

// Publishes a filled record (fields written through `rec` beforehand by the same thread).
// Keeps an older, not yet reported record rather than overwriting it.
ARK_PROTO_HD void persistent_publish_record(const PersistentRunState& run,
                                            const PersistentErrorRecord& local) {
  volatile PersistentErrorRecord* rec = run.error;
  if (rec == nullptr || rec->status != kPersistentOk) return;
  const char* src = reinterpret_cast<const char*>(&local);
  volatile char* dst = reinterpret_cast<volatile char*>(rec);
  // Everything but `status` (the first field), byte by byte over PCIe: rare path, size ~130 B.
  for (size_t i = sizeof(int32_t); i < sizeof(PersistentErrorRecord); ++i) dst[i] = src[i];
  // The fields reach host memory before the status that publishes them.
  proto::AtomicRef<int32_t, proto::Scope::kSystem>(&run.error->status).store_release(local.status);
  proto::push_out_system();
}

}  // namespace jax_ark::gpu
