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

#include "jax_ark/gpu/clock_device.cuh"

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
  int32_t reserved;
  char op_name[kPersistentNameChars];      // name of `op` (truncated, NUL-terminated)
  char dep_op_name[kPersistentNameChars];  // name of `dep_op`
};

enum : int32_t {
  kPersistentOk = 0,
  kPersistentTimeout = 1,
  kPersistentBadPlan = 2,
};

#if defined(__CUDACC__)

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

// Shared state of one kernel run, visible to all blocks.
//  abort_word: device memory owned by the host runtime, one per device, never reset. A run with
//    sequence number `seq` is aborted iff *abort_word >= seq; the first failing block of the run
//    raises it with atomicMax (so no per-call memset is needed, and a failure never leaks into a
//    later call, whose seq is larger).
struct PersistentRunState {
  uint32_t* abort_word;
  uint32_t seq;
  PersistentErrorRecord* error;  // host-mapped pinned memory
  uint64_t timeout_ns;           // bound of every single wait
};

__device__ __forceinline__ bool persistent_aborted(const PersistentRunState& run) {
  return persistent_load_relaxed(run.abort_word) >= run.seq;
}

// Marks the run aborted. Returns true for exactly one caller per run: the one that must write the
// error record.
__device__ __forceinline__ bool persistent_raise_abort(const PersistentRunState& run) {
  return atomicMax(run.abort_word, run.seq) < run.seq;
}

// Publishes a filled record (fields written through `rec` beforehand by the same thread).
// Keeps an older, not yet reported record rather than overwriting it.
__device__ inline void persistent_publish_record(const PersistentRunState& run,
                                                 const PersistentErrorRecord& local) {
  volatile PersistentErrorRecord* rec = run.error;
  if (rec == nullptr || rec->status != kPersistentOk) return;
  const char* src = reinterpret_cast<const char*>(&local);
  volatile char* dst = reinterpret_cast<volatile char*>(rec);
  // Everything but `status` (the first field), byte by byte over PCIe: rare path, size ~130 B.
  for (size_t i = sizeof(int32_t); i < sizeof(PersistentErrorRecord); ++i) dst[i] = src[i];
  __threadfence_system();  // the fields reach host memory before the status that publishes them
  rec->status = local.status;
  __threadfence_system();
}

#endif  // __CUDACC__

}  // namespace jax_ark::gpu
