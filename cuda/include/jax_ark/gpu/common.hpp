// Types shared by the host runtime and the device kernels of the GPU collectives.
//
// Everything here is plain data: it is copied by value into kernel parameters or lives in memory
// that both sides read (the error record is host-mapped pinned memory).
#pragma once

#include <cstdint>

namespace jax_ark::gpu {

// Limits of the kernel parameter tables (permute routes) and of the per-block flag array.
constexpr int kMaxRanks = 64;
constexpr int kMaxBlocks = 32;
constexpr int kThreads = 512;
// Chunked flags hold (epoch << kRoundBits) | (round + 1): rounds of one call (both all-reduce
// phases together) must stay below 2^kRoundBits - 1, leaving 44 bits of epoch (~10^13 calls).
constexpr int kRoundBits = 20;
constexpr uint64_t kMaxRoundsPerCall = (1ull << kRoundBits) - 2;

// Operation codes of the `ark_collective` contract (docs/internals.md).
enum OpCode : int32_t {
  kAllReduce = 0,
  kAllGather = 1,
  kReduceScatter = 2,
  kPermute = 3,
  kAllToAll = 4,
};
enum ReduceCode : int32_t { kSum = 0, kMax = 1, kMin = 2 };
enum DTypeCode : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kS32 = 3 };

inline int dtype_size(int32_t dtype) { return (dtype == kF32 || dtype == kS32) ? 4 : 2; }
const char* op_name(int32_t op);

// Static shape of one rank's scratch; identical on every rank of a communicator (peers compute
// offsets into each other's scratch with it).
struct CommConfig {
  int32_t n_ranks = 1;
  int32_t blocks = 16;          // blocks per kernel of the chunked path (each block syncs per round)
  uint32_t piece_bytes = 32768; // bytes per (call half, round parity, source rank, block) slot
  uint32_t ll_bytes = 65536;    // largest per-peer message sent with the LL protocol
  // Persistent plans with put tasks: bytes of the symmetric region after the collectives' scratch
  // (persistent_comm_device.hpp; one communicator per plan call site, so its own region).
  uint64_t extra_bytes = 0;
};

// Written once by the device when a wait times out (or the rank operand is inconsistent); lives in
// host-mapped pinned memory so the host reads it without synchronizing any stream.
struct ErrorRecord {
  int32_t state;  // 0: no error; 1: fields below are valid (written last, after a system fence)
  int32_t op;
  int32_t rank;   // the rank that gave up waiting
  int32_t peer;   // the rank it waited for (-2: the rank operand disagreed with the communicator)
  uint64_t epoch;
  int32_t device;
  int64_t comm_id;
  uint64_t waited_ns;
};

// Per-rank control words in device memory, never touched by peers.
// The epoch is 64-bit: a 32-bit one wraps after 2^32 calls (hours of back-to-back small calls),
// and after a wrap `>=` flag waits pass on stale flags and LL packets match never-written ones.
struct RankControl {
  uint64_t epoch;        // sequence number of the next call; starts at 1
  uint32_t blocks_done;  // blocks of the running call that finished; the last one bumps `epoch`
  uint32_t abort;        // set by the first failing block so the others stop waiting
  uint32_t error_claim;  // CAS guard: only one failure is recorded
};

// Everything one call needs besides the communicator; passed by value to the kernel.
struct CollectiveArgs {
  int32_t op = kAllReduce;
  int32_t reduce = kSum;
  int32_t dtype = kF32;
  const void* x = nullptr;
  void* y = nullptr;
  const int32_t* rank_operand = nullptr;  // device int32: checked against the communicator's rank
  uint64_t block_bytes = 0;  // M: bytes of one per-peer block (x for all_reduce / all_gather /
                             // permute; x[j] for reduce_scatter / all_to_all)
  uint64_t timeout_ns = 0;
  int32_t send_to[kMaxRanks];  // permute routes (-1 = none)
  int32_t recv_from[kMaxRanks];
};

}  // namespace jax_ark::gpu
