// The CPU executor's symmetric regions for plan v3 put tasks: one region per rank of a group at one
// call site, allocated once and reused by every call there, in the GPU runtime's layout and driven
// by the GPU runtime's own protocol functions (jax_ark/gpu/persistent_comm_device.hpp: epochs in
// the signals, an "entered" word per rank). So every CPU test of a comm plan runs the protocol the
// CUDA kernel runs.
//
// Why not XLA's workspace: it is a fresh buffer of every call, so the ranks had to meet each call
// to exchange its address before any put (an all_gather through the HostCommunicator), and on 2
// cores with 8 ranks that meeting was about half of a small call's context switches. With a
// region that outlives the calls, a rank sends the moment its tile is ready.
//
// One difference from the GPU: a rank opens its region for call e when its call e - 1 ENDS (the
// GPU kernel announces at the start of call e). The protocol needs only that q awaited every
// signal of its call e - 1 before a peer writes call e's tiles into q's inbox; on host threads
// that holds at the end of q's call, and senders then never wait for a late receiver to start
// (the device programs of one process start up to milliseconds apart on 2 cores).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "host_communicator.hpp"
#include "jax_ark/gpu/persistent_comm_device.hpp"

namespace jax_ark::cpu {

class PersistentRegion {
 public:
  // The region of (group, call site) `key`, created on first use for this plan (its words); a
  // broken one is replaced. nullptr with `error` set when the cached region was made for another
  // plan (another rank runs a different plan at the same call site).
  static std::shared_ptr<PersistentRegion> get(const CommunicatorKey& key, const int32_t* words,
                                                int64_t num_words, int64_t inbox_bytes,
                                                std::string* error);

  PersistentRegion(const CommunicatorKey& key, const int32_t* words, int64_t num_words,
                   int64_t inbox_bytes);
  PersistentRegion(const PersistentRegion&) = delete;
  PersistentRegion& operator=(const PersistentRegion&) = delete;

  // Starts rank `rank`'s next call (its epoch, counted per rank from 1; the k-th call of every
  // rank is the same collective) and returns the protocol's view of the group for it. Empty
  // `error` on success; an error when the rank is already inside a call here (two devices
  // claiming one rank) or the region is broken.
  gpu::PersistentCommDevice begin(int32_t rank, int64_t run_id, std::string* error);
  // Ends the call: opens the rank's region for its next call. `ok` false (the call failed):
  // breaks the region instead, so peers waiting on this rank fail at once and the next call of
  // every rank starts a fresh region.
  void end(const gpu::PersistentCommDevice& c, bool ok, const std::string& reason,
           bool timed_out = false);
  // Breaks the region outside a call: this rank fails after a call that ended well (chaos mode's
  // comparison of its runs), so peers waiting for its next run fail at once, not at their deadline.
  void abandon(const std::string& reason) { fail(reason, false); }

  // After a store into `rank`'s region that a waiter may sleep on (a signal, its entered word).
  void ring(int32_t rank);
  // Sleeps until ring(rank) or for at most max_us, unless *word >= target once this thread is
  // registered as a sleeper (so a ring between the caller's last poll and the sleep is never
  // missed). The caller rechecks its condition either way.
  void sleep_unless_at_least(int32_t rank, const uint64_t* word, uint64_t target, int64_t max_us);

  // The XLA run id rank `rank` posted for its call of epoch `epoch` (valid once one of its
  // signals of that epoch was acquired): the ranks' k-th calls must be one execution.
  int64_t run_id(int32_t rank, uint64_t epoch) const {
    return slots_[rank].run_id[epoch & 1].load(std::memory_order_relaxed);
  }
  // How many calls rank `rank` has begun here, and whether it is inside one now: what a timeout
  // says about the peer it waited for (not started yet, or started and still running).
  uint64_t calls_begun(int32_t rank) const {
    return slots_[rank].epoch.load(std::memory_order_relaxed);
  }
  bool in_call(int32_t rank) const { return slots_[rank].busy.load(std::memory_order_relaxed); }
  // Rank `rank`'s region bytes (the protocol's peers[rank]; tests read signals there).
  uint8_t* bytes(int32_t rank) const { return regions_[rank]; }
  bool broken() const { return broken_.load(std::memory_order_acquire); }
  std::string broken_reason() const;
  // Whether the failure that broke the region was a timeout: the ranks that then give up report
  // that status too, so every device's error has the root cause's code (XLA reports any one).
  bool broke_by_timeout() const;
  const CommunicatorKey& key() const { return key_; }

 private:
  // Host-side state of one rank (the protocol's words live in the region bytes).
  struct alignas(64) Slot {
    std::atomic<bool> busy{false};
    std::atomic<uint64_t> epoch{0};  // the rank's calls begun here (peers read it for errors)
    std::atomic<int64_t> run_id[2] = {0, 0};  // by epoch parity
    std::atomic<uint32_t> doorbell{0};        // bumped by ring(); futex word of sleepers
    std::atomic<int32_t> sleepers{0};
  };

  void fail(const std::string& reason, bool timed_out);

  const CommunicatorKey key_;
  const std::vector<int32_t> plan_;  // the plan it was made for (compared at every get)
  const int64_t inbox_bytes_;
  const gpu::PersistentSymLayout layout_;
  std::unique_ptr<Slot[]> slots_;
  std::vector<std::unique_ptr<uint64_t[]>> bytes_;  // per rank, 8-byte aligned, zeroed
  std::vector<uint8_t*> regions_;                   // their addresses, the protocol's `peers`
  std::atomic<bool> broken_{false};
  mutable std::mutex mu_;
  std::string broken_reason_;
  bool broke_by_timeout_ = false;  // guarded by mu_

  friend class PersistentRegionRegistry;
};

}  // namespace jax_ark::cpu
