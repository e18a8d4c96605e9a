// Device-side synchronization for the persistent loop kernel: dependency counters with
// acquire/release ordering, bounded waits on %globaltimer, and the error record that a timed-out
// wait leaves for the host.
//
// Memory-ordering contract (docs/cuda_executor.md has the full argument):
//  producer block:  all threads store the tile -> __syncthreads() -> thread 0: fence.acq_rel.gpu +
//                   red.release.gpu.add(counter)
//  consumer block:  thread 0: ld.acquire.gpu(counter) until >= target -> __syncthreads() -> all
//                   threads load the tile with ld.global.cg (L2, never the non-coherent/L1 path).
// The barrier carries CTA-scope causality between the block's threads and thread 0; the
// release/acquire pair carries it across SMs at gpu scope.
#pragma once

#include <cstdint>

namespace jax_ark::gpu {

// Written by the kernel into host-mapped pinned memory when a wait times out. `status` is written
// last (after a system-scope fence), so a host that sees status != 0 sees the whole record.
struct PersistentErrorRecord {
  int32_t status;        // 0 = ok, 1 = dependency wait timed out, 2 = bad plan seen on device
  int32_t task;          // task index that was waiting (or that was malformed)
  int32_t op;            // its opcode
  int32_t worker;        // worker queue (= block) that waited
  int32_t counter;       // counter index waited on
  uint32_t value_seen;   // last counter value observed
  uint32_t value_wanted; // value the task needed
  int32_t detail;        // extra code (bad-plan reason), 0 otherwise
  uint64_t waited_ns;    // how long it waited before giving up
};

enum : int32_t {
  kPersistentOk = 0,
  kPersistentTimeout = 1,
  kPersistentBadPlan = 2,
};

#if defined(__CUDACC__)

__device__ __forceinline__ uint64_t persistent_globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint32_t persistent_smid() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__device__ __forceinline__ uint32_t persistent_load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t persistent_load_relaxed(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Release increment. The explicit fence makes the ordering independent of how the compiler or a
// future PTX revision treats red.release; it costs far less than one dependency hop.
__device__ __forceinline__ void persistent_release_add(uint32_t* p, uint32_t v) {
  asm volatile("fence.acq_rel.gpu;\n\tred.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v)
               : "memory");
}

__device__ __forceinline__ void persistent_store_relaxed(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Shared state of one kernel run, visible to all blocks (lives in the call's workspace).
struct PersistentRunState {
  uint32_t* abort_flag;                  // device memory, zeroed per call; nonzero = stop
  PersistentErrorRecord* error;          // host-mapped pinned memory (may be null: no report)
  uint64_t timeout_ns;                   // bound for every single wait
};

// Records the first failure of this run in the host-visible record and raises the abort flag so
// every other block stops at its next wait instead of timing out on its own.
__device__ inline void persistent_report_failure(const PersistentRunState& run, int32_t status,
                                                 int32_t task, int32_t op, int32_t worker,
                                                 int32_t counter, uint32_t seen, uint32_t wanted,
                                                 int32_t detail, uint64_t waited_ns) {
  // Only the first block to raise the flag writes the record (atomicCAS returns the old value).
  if (atomicCAS(run.abort_flag, 0u, 1u) == 0u && run.error != nullptr) {
    volatile PersistentErrorRecord* rec = run.error;
    rec->task = task;
    rec->op = op;
    rec->worker = worker;
    rec->counter = counter;
    rec->value_seen = seen;
    rec->value_wanted = wanted;
    rec->detail = detail;
    rec->waited_ns = waited_ns;
    __threadfence_system();  // the fields reach host memory before the status that publishes them
    rec->status = status;
    __threadfence_system();
  }
}

// Thread 0 of a block waits until counters[counter] >= wanted (a bounded spin). Returns false if
// the run was aborted (by this wait's timeout or by another block). Called by ONE thread; the
// caller broadcasts the result to the block through shared memory and a __syncthreads().
__device__ inline bool persistent_wait_counter(const PersistentRunState& run,
                                               const uint32_t* counters, int32_t counter,
                                               uint32_t wanted, int32_t task, int32_t op,
                                               int32_t worker) {
  const uint32_t* p = counters + counter;
  uint32_t seen = persistent_load_acquire(p);
  if (seen >= wanted) return true;  // fast path: no timer read at all
  const uint64_t start = persistent_globaltimer_ns();
  uint32_t spins = 0;
  while (true) {
    seen = persistent_load_acquire(p);
    if (seen >= wanted) return true;
    // The timer and the abort flag are checked every 64 polls: a poll is an L2 round trip
    // (~0.5-1 us), so the bound is still enforced to within ~100 us, and the hot loop stays short.
    if ((++spins & 63u) == 0u) {
      if (persistent_load_relaxed(run.abort_flag) != 0u) return false;
      const uint64_t waited = persistent_globaltimer_ns() - start;
      if (waited > run.timeout_ns) {
        persistent_report_failure(run, kPersistentTimeout, task, op, worker, counter, seen, wanted,
                                  0, waited);
        return false;
      }
    }
  }
}

#endif  // __CUDACC__

}  // namespace jax_ark::gpu
