// Communication of the persistent loop kernel (plan v3 PUT ops) on GPUs: the symmetric region every
// rank of a group holds, and the entry / signal protocol over it. Written once for the device and
// host threads (protocol.hpp): the kernel runs it, and tests/protocol_host_test.cc runs the same
// functions with host threads as ranks and workers.
//
// Why a region of its own: XLA's workspace result is a fresh buffer of XLA's allocator, which no
// peer has mapped. Each rank instead owns one symmetric region (cudaMalloc'ed once, opened by peers
// through the same-process pointer or CUDA IPC), reused by every call of the plan:
//   [0, 8)                           entered: the epoch of the call this rank has entered
//   [signals_offset, + 8 * T * G)    signal[task][slot]: written by the slot's sender
//   [inbox_offset, + inbox_bytes)    the plan's inboxes, at their workspace byte offsets
// The planner places every inbox below `inbox_bytes` in the workspace and no other tensor there
// (inboxes are live for the whole plan, so they are placed first), so the kernel maps workspace
// offsets below `inbox_bytes` into the region and the plan format does not change.
//
// No reset between calls, no host step: values carry the call's epoch (the k-th call of the site
// has epoch k on every rank, counted by each rank itself: under XLA on a GPU in the rank's control
// word in device memory, which the kernel reads at its start and its last block advances
// (current_epoch / retire_block, so a launch replayed from a CUDA graph is the next call); by the
// harness per launch; on the CPU by the region's per-rank call count).
//  - A signal holds (epoch << 32) | runs, runs = the sender's finished runs of the task (1 outside
//    loops, iteration + 1 inside), so signals only grow and a wait `>=` never passes on a value
//    of an older call.
//  - A rank writes into peer q's region during call e only after q announced `entered >= e`. q
//    announces at the start of its call e, after its call e - 1 ended (stream order), and in that
//    call q awaited every signal a peer sent it, each the last write of its sender into q. So no
//    write of call e can land in an inbox slice q still reads for call e - 1, and none of call
//    e - 1 is still in flight. One flag poll per (block, peer, call), no host rendezvous. The CPU
//    executor runs these same functions over host regions (cuda/src/cpu/persistent_region.hpp),
//    announcing when a call ends rather than when it starts.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "jax_ark/gpu/protocol.hpp"

namespace jax_ark::gpu {

// The largest group whose per-block "peer entered" cache fits one 64-bit mask.
constexpr int32_t kPersistentMaxGroup = 64;

struct PersistentSymLayout {
  uint64_t signals_offset = 0;
  uint64_t inbox_offset = 0;
  uint64_t total_bytes = 0;

  ARK_PROTO_HD static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
  ARK_PROTO_HD static PersistentSymLayout of(int64_t num_tasks, int32_t group_size,
                                             int64_t inbox_bytes) {
    PersistentSymLayout l;
    l.signals_offset = 256;
    const uint64_t signals = static_cast<uint64_t>(num_tasks) * static_cast<uint64_t>(group_size);
    l.inbox_offset = round_up(l.signals_offset + 8 * signals, 256);
    l.total_bytes = round_up(l.inbox_offset + static_cast<uint64_t>(inbox_bytes), 4096);
    return l;
  }
};

// What one rank's kernel sees; copied by value into the kernel parameters. n == 0: no group.
struct PersistentCommDevice {
  uint8_t* const* peers = nullptr;  // device array [n]: every rank's region (mine included)
  uint8_t* local = nullptr;         // my region (== peers[rank])
  int32_t rank = 0;
  int32_t n = 0;
  uint64_t epoch = 0;               // >= 1: this call's number at this site, equal on all ranks
  int64_t inbox_bytes = 0;          // workspace byte offsets [0, inbox_bytes) live in the region
  int32_t num_tasks = 0;
  uint64_t signals_offset = 0;
  uint64_t inbox_offset = 0;
};

ARK_PROTO_HD uint64_t put_signal_value(uint64_t epoch, uint32_t runs) {
  return (epoch << 32) | runs;
}

ARK_PROTO_HD uint64_t* entered_word(uint8_t* region) { return reinterpret_cast<uint64_t*>(region); }

ARK_PROTO_HD uint64_t* put_signal_word(const PersistentCommDevice& c, uint8_t* region,
                                       int32_t task, int32_t slot) {
  return reinterpret_cast<uint64_t*>(region + c.signals_offset) +
         static_cast<size_t>(task) * static_cast<size_t>(c.n) + slot;
}

// The inbox area of a rank's region: workspace byte offset o of an inbox lives at inbox(...) + o.
ARK_PROTO_HD uint8_t* inbox_area(const PersistentCommDevice& c, uint8_t* region) {
  return region + c.inbox_offset;
}

// Called once per call by one thread of the rank, before any of its puts are awaited by peers'
// entry waits: peers may write into this rank's region from now on.
ARK_PROTO_HD void announce_entered(const PersistentCommDevice& c) {
  proto::AtomicRef<uint64_t, proto::Scope::kSystem>(entered_word(c.local)).store_release(c.epoch);
}

// Waits until peer q has entered this call (see the header comment). `give_up` is polled every
// `check_every` polls (deadline, abort word); false when it gave up. `seen`: the last value read.
template <typename GiveUp>
ARK_PROTO_HD bool wait_peer_entered(const PersistentCommDevice& c, int32_t q, GiveUp give_up,
                                    uint64_t* seen) {
  const proto::AtomicRef<uint64_t, proto::Scope::kSystem> word(entered_word(c.peers[q]));
  return proto::wait_at_least(word, c.epoch, give_up, 32u, seen);
}

// After this rank's tile of (task, slot) is stored into q's inbox: the sender's one release at
// system scope. The caller orders every thread's tile stores before it (a block barrier), and the
// release is cumulative over them, as in signal_peer (communicator_device.hpp).
ARK_PROTO_HD void signal_put(const PersistentCommDevice& c, int32_t q, int32_t task, int32_t slot,
                             uint32_t runs) {
  proto::AtomicRef<uint64_t, proto::Scope::kSystem>(put_signal_word(c, c.peers[q], task, slot))
      .store_release(put_signal_value(c.epoch, runs));
}

// Waits until slot `slot` of task `task` holds this call's tile of run `runs - 1` (acquire).
template <typename GiveUp>
ARK_PROTO_HD bool wait_put(const PersistentCommDevice& c, int32_t task, int32_t slot,
                           uint32_t runs, GiveUp give_up, uint64_t* seen) {
  const proto::AtomicRef<uint64_t, proto::Scope::kSystem> word(
      put_signal_word(c, c.local, task, slot));
  return proto::wait_at_least(word, put_signal_value(c.epoch, runs), give_up, 32u, seen);
}

}  // namespace jax_ark::gpu
