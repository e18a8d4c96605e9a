// Device twin of the communicator: a plain struct copied by value into kernels, with the small
// inline put / signal / wait primitives the collective kernels are built from.
//
// Scratch layout of every rank (identical offsets on all ranks, see CommConfig):
//   [flags]  uint64 flag[src rank][kMaxBlocks]   written by peers (release), polled by me (acquire)
//   [ll]     uint2  packet[half 2][src rank][ll_slot_packets]   LL packets {data word, epoch}
//   [chunk]  bytes  piece[half 2][round parity 2][src rank][block][piece_bytes]
// `half` is the call's epoch parity, `round parity` the parity of the round inside a call.
// Peers only ever WRITE into my scratch and I only READ my own (push model), so every remote
// access is a store and every load is local.
#pragma once

#include <cstddef>
#include <cstdint>

#include "jax_ark/gpu/common.hpp"
#if defined(__CUDACC__)
#include "jax_ark/gpu/clock_device.cuh"
#endif

#if defined(__CUDACC__)
#define ARK_HOST_DEVICE __host__ __device__
#else
#define ARK_HOST_DEVICE
#endif

namespace jax_ark::gpu {

struct ScratchLayout {
  uint64_t flags_offset = 0;
  uint64_t ll_offset = 0;
  uint64_t chunk_offset = 0;
  uint64_t total_bytes = 0;
  uint32_t ll_slot_packets = 0;  // header packet + data packets, per source rank

  ARK_HOST_DEVICE static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

  static ScratchLayout of(const CommConfig& c) {
    ScratchLayout l;
    const uint64_t n = static_cast<uint64_t>(c.n_ranks);
    l.flags_offset = 0;
    l.ll_offset = round_up(n * kMaxBlocks * sizeof(uint64_t), 256);
    l.ll_slot_packets = static_cast<uint32_t>(round_up(1 + (c.ll_bytes + 3) / 4, 32));
    l.chunk_offset = round_up(l.ll_offset + 2 * n * l.ll_slot_packets * 8ull, 256);
    l.total_bytes = round_up(
        l.chunk_offset + 2ull * 2ull * n * static_cast<uint64_t>(c.blocks) * c.piece_bytes, 4096);
    return l;
  }
};

struct CommDevice {
  uint8_t* const* peers = nullptr;  // device array [n]: every rank's scratch (mine included)
  uint8_t* local = nullptr;         // my scratch (== peers[rank])
  RankControl* control = nullptr;   // device memory, private to this rank
  ErrorRecord* error = nullptr;     // device pointer to host-mapped memory
  int64_t comm_id = 0;
  int32_t n = 1;
  int32_t rank = 0;
  int32_t device = 0;
  int32_t blocks = 1;
  uint32_t piece_bytes = 0;
  uint32_t ll_slot_packets = 0;
  uint64_t flags_offset = 0;
  uint64_t ll_offset = 0;
  uint64_t chunk_offset = 0;

#if defined(__CUDACC__)
  __device__ uint64_t* flag(uint8_t* base, int src, int block) const {
    return reinterpret_cast<uint64_t*>(base + flags_offset) + static_cast<size_t>(src) * kMaxBlocks +
           block;
  }
  __device__ uint2* ll_slot(uint8_t* base, uint32_t half, int src) const {
    return reinterpret_cast<uint2*>(base + ll_offset) +
           (static_cast<size_t>(half) * n + src) * ll_slot_packets;
  }
  __device__ uint8_t* piece(uint8_t* base, uint32_t half, uint32_t parity, int src,
                            int block) const {
    const size_t index = ((static_cast<size_t>(half) * 2 + parity) * n + src) * blocks + block;
    return base + chunk_offset + index * piece_bytes;
  }
#endif
};

#if defined(__CUDACC__)

// ---- memory-model primitives ---------------------------------------------------------------
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// LL packets: data (low 32 bits) and flag (high 32 bits) travel in ONE aligned 64-bit scalar store,
// so a reader that sees the flag also sees the data (single-copy atomicity of aligned 8-byte
// scalar accesses; vector .v2 accesses are not guaranteed atomic as a whole). volatile keeps the
// polls out of L1.
__device__ __forceinline__ uint2 load_packet(const uint2* p) {
  uint64_t v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return make_uint2(static_cast<uint32_t>(v), static_cast<uint32_t>(v >> 32));
}
__device__ __forceinline__ void store_packet(uint2* p, uint32_t data, uint32_t flag) {
  const uint64_t v = (static_cast<uint64_t>(flag) << 32) | data;
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The 32-bit flag of a call's LL packets: never 0 (zeroed scratch = "never written"), and equal
// for two epochs only 2^32 - 1 calls apart, so a packet left in a slot by an older call (its
// half holds epochs e-2, e-4, ...) cannot pass for the current call's.
ARK_HOST_DEVICE inline uint32_t ll_flag_of(uint64_t epoch) {
  return static_cast<uint32_t>(epoch % 0xFFFFFFFFull) + 1u;
}

// ---- bounded waits -------------------------------------------------------------------------
// A wait spins on a local word; every 256 spins it checks %globaltimer against the call's deadline
// and the rank's abort word. On failure the first failing thread writes the error record.
struct WaitContext {
  CommDevice comm;
  uint64_t start_ns;
  uint64_t deadline_ns;
  int32_t op;
  uint64_t epoch;
  uint32_t ll_flag;  // ll_flag_of(epoch)

  // Claims the record BEFORE raising `abort`: a thread that stops because it saw `abort` must not
  // record its own (innocent) peer as the culprit.
  __device__ void record_failure(int peer) const {
    if (atomicCAS(&comm.control->error_claim, 0u, 1u) == 0u) {
      volatile ErrorRecord* r = comm.error;
      r->op = op;
      r->rank = comm.rank;
      r->peer = peer;
      r->epoch = epoch;
      r->device = comm.device;
      r->comm_id = comm.comm_id;
      r->waited_ns = global_timer_ns() - start_ns;
      __threadfence_system();
      r->state = 1;
      __threadfence_system();
    }
    atomicExch(&comm.control->abort, 1u);
  }
  // True when the caller must stop: deadline passed or another block of this rank failed.
  __device__ bool should_abort(int peer, uint32_t& spins) const {
    if ((++spins & 255u) != 0u) return false;
    const bool aborted = *reinterpret_cast<volatile uint32_t*>(&comm.control->abort) != 0u;
    if (aborted || global_timer_ns() > deadline_ns) {
      record_failure(peer);
      return true;
    }
    return false;
  }
  // Waits until my flag[src][block] >= target. Returns false on timeout/abort.
  __device__ bool wait_flag(int src, int block, uint64_t target) const {
    const uint64_t* f = comm.flag(comm.local, src, block);
    uint32_t spins = 0;
    while (load_acquire_sys(f) < target) {
      if (should_abort(src, spins)) return false;
    }
    return true;
  }
  // Waits until an LL packet carries this call's flag; returns its data word through `data`.
  __device__ bool wait_packet(const uint2* p, int src, uint32_t& data) const {
    uint32_t spins = 0;
    for (;;) {
      const uint2 v = load_packet(p);
      if (v.y == ll_flag) {
        data = v.x;
        return true;
      }
      if (should_abort(src, spins)) return false;
    }
  }
};

#endif  // __CUDACC__

}  // namespace jax_ark::gpu
