// Memory-model primitives of the GPU runtime's device-side protocol, written once for the device
// and for host threads.
//
// Everything that decides WHEN a rank or a worker may proceed (LL packets, flag waits, epochs,
// dependency counters) is built from the handful of operations below, in headers whose functions
// are `__host__ __device__`. nvcc maps them onto libcu++'s `cuda::atomic_ref` (PTX ld/st with
// .relaxed/.acquire/.release at gpu or sys scope); a plain host compiler maps them onto the GCC/Clang
// `__atomic` builtins with the same orderings. tests/protocol_host_test.cc then runs the very code
// the kernels run, with host threads standing in for ranks and workers (under ThreadSanitizer too).
//
// Waits (wait_word) probe once with an ACQUIRE load, so a value that is already there costs one
// load as ever; otherwise they poll with RELAXED loads (no L1 invalidation per poll on the device)
// and take ONE acquire once the value is there: an acquire fence at the word's scope on the device,
// an acquire re-load of the same (monotonic) word on the host, which synchronizes the same way and
// is what ThreadSanitizer models (it ignores standalone fences), so host runs check the ordering.
#pragma once

#include <stdint.h>

#include <chrono>
#include <thread>

#if defined(__CUDACC__)
#include <cuda/atomic>
#define ARK_PROTO_HD __host__ __device__ __forceinline__
#else
#define ARK_PROTO_HD inline
#endif

namespace jax_ark::gpu::proto {

// gpu: the ranks/workers are blocks of kernels on one GPU. sys: a peer may be another GPU (P2P
// stores over NVLink/PCIe) or the host (mapped error records).
enum class Scope { kGpu, kSystem };

#if defined(__CUDACC__)
template <Scope S>
struct CudaScope;
template <>
struct CudaScope<Scope::kGpu> {
  static constexpr cuda::thread_scope value = cuda::thread_scope_device;
};
template <>
struct CudaScope<Scope::kSystem> {
  static constexpr cuda::thread_scope value = cuda::thread_scope_system;
};
#endif

// An atomic view of a plain word in shared (device, peer or mapped) memory. The words are laid out
// by the runtime as plain integers (zeroed by cudaMemset), hence a ref and not std::atomic.
template <typename T, Scope S>
class AtomicRef {
 public:
  ARK_PROTO_HD explicit AtomicRef(T* p) : p_(p) {}
  ARK_PROTO_HD explicit AtomicRef(const T* p) : p_(const_cast<T*>(p)) {}

#if defined(__CUDACC__)
  ARK_PROTO_HD T load_relaxed() const { return ref().load(cuda::memory_order_relaxed); }
  ARK_PROTO_HD T load_acquire() const { return ref().load(cuda::memory_order_acquire); }
  ARK_PROTO_HD void store_relaxed(T v) const { ref().store(v, cuda::memory_order_relaxed); }
  ARK_PROTO_HD void store_release(T v) const { ref().store(v, cuda::memory_order_release); }
  ARK_PROTO_HD T fetch_add_acq_rel(T v) const {
    return ref().fetch_add(v, cuda::memory_order_acq_rel);
  }
  ARK_PROTO_HD T fetch_max_relaxed(T v) const {
    return ref().fetch_max(v, cuda::memory_order_relaxed);
  }
  // Upgrades an earlier relaxed load of this word that saw the awaited value to an acquire.
  ARK_PROTO_HD void acquire_after_relaxed_load() const {
#if defined(__CUDA_ARCH__)
    cuda::atomic_thread_fence(cuda::memory_order_acquire, CudaScope<S>::value);
#else
    (void)load_acquire();
#endif
  }
  // Strong CAS; true when *p was `expected` and now holds `desired`.
  ARK_PROTO_HD bool compare_exchange(T expected, T desired) const {
    return ref().compare_exchange_strong(expected, desired, cuda::memory_order_acq_rel,
                                         cuda::memory_order_relaxed);
  }

 private:
  ARK_PROTO_HD cuda::atomic_ref<T, CudaScope<S>::value> ref() const {
    return cuda::atomic_ref<T, CudaScope<S>::value>(*p_);
  }
#else
  T load_relaxed() const { return __atomic_load_n(p_, __ATOMIC_RELAXED); }
  T load_acquire() const { return __atomic_load_n(p_, __ATOMIC_ACQUIRE); }
  void store_relaxed(T v) const { __atomic_store_n(p_, v, __ATOMIC_RELAXED); }
  void store_release(T v) const { __atomic_store_n(p_, v, __ATOMIC_RELEASE); }
  T fetch_add_acq_rel(T v) const { return __atomic_fetch_add(p_, v, __ATOMIC_ACQ_REL); }
  T fetch_max_relaxed(T v) const {
    T seen = __atomic_load_n(p_, __ATOMIC_RELAXED);
    while (seen < v &&
           !__atomic_compare_exchange_n(p_, &seen, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return seen;
  }
  void acquire_after_relaxed_load() const { (void)load_acquire(); }
  bool compare_exchange(T expected, T desired) const {
    return __atomic_compare_exchange_n(p_, &expected, desired, false, __ATOMIC_ACQ_REL,
                                       __ATOMIC_RELAXED);
  }

 private:
#endif
  T* p_;
};

// Called right after a sys-scope release that publishes an error record: the release already
// orders the record, the fence only makes the device push it out to the host now rather than at
// kernel exit. Host threads share one coherent memory, so there is nothing to push.
ARK_PROTO_HD void push_out_system() {
#if defined(__CUDA_ARCH__)
  cuda::atomic_thread_fence(cuda::memory_order_seq_cst, cuda::thread_scope_system);
#endif
}

// Nanoseconds of a clock shared by every waiter: %globaltimer on the device (the same on every SM,
// unlike clock64), the steady clock on the host.
ARK_PROTO_HD uint64_t now_ns() {
#if defined(__CUDA_ARCH__)
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
#endif
}

// One iteration of a spin loop. The device keeps the loop a single load; host threads stand in
// for many more ranks than there are cores, so they give the core away.
ARK_PROTO_HD void spin_pause() {
#if !defined(__CUDA_ARCH__)
  std::this_thread::yield();
#endif
}

// Polls `ready()` until it returns true (-> true) or, checked every `check_every` polls (a power
// of two), `give_up()` returns true (-> false). The deadline / abort checks stay off the hot loop.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Ready, typename GiveUp>
ARK_PROTO_HD bool spin_until(Ready ready, GiveUp give_up, uint32_t check_every) {
  for (uint32_t spins = 1;; ++spins) {
    if (ready()) return true;
    if ((spins & (check_every - 1u)) == 0u && give_up()) return false;
    spin_pause();
  }
}

// Waits until *word >= target, with acquire ordering on success (see the top of this file).
// `give_up()` is asked every `check_every` polls; `seen` gets the last value read.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, Scope S, typename GiveUp>
ARK_PROTO_HD bool wait_at_least(const AtomicRef<T, S>& word, T target, GiveUp give_up,
                                uint32_t check_every, T* seen) {
  *seen = word.load_acquire();
  if (*seen >= target) return true;
  const bool ok =
      spin_until([&] { return (*seen = word.load_relaxed()) >= target; }, give_up, check_every);
  if (ok) word.acquire_after_relaxed_load();
  return ok;
}

// ---- LL packets ---------------------------------------------------------------------------
// Data (low 32 bits) and flag (high 32 bits) travel in ONE aligned 64-bit atomic store, so a
// reader that sees the flag also sees the data (single-copy atomicity); no fence on either side.
struct Packet {
  uint32_t data;
  uint32_t flag;
};
ARK_PROTO_HD void store_packet(uint64_t* slot, uint32_t data, uint32_t flag) {
  AtomicRef<uint64_t, Scope::kSystem>(slot).store_relaxed((static_cast<uint64_t>(flag) << 32) |
                                                          data);
}
ARK_PROTO_HD Packet load_packet(const uint64_t* slot) {
  const uint64_t v = AtomicRef<uint64_t, Scope::kSystem>(slot).load_relaxed();
  return Packet{static_cast<uint32_t>(v), static_cast<uint32_t>(v >> 32)};
}

// The 32-bit flag of a call's LL packets: never 0 (zeroed scratch = "never written"), and equal
// for two epochs only 2^32 - 1 calls apart, so a packet left in a slot by an older call (its
// half holds epochs e-2, e-4, ...) cannot pass for the current call's.
ARK_PROTO_HD uint32_t ll_flag_of(uint64_t epoch) {
  return static_cast<uint32_t>(epoch % 0xFFFFFFFFull) + 1u;
}

}  // namespace jax_ark::gpu::proto
