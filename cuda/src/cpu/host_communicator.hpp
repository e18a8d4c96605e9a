// The CPU backend's communicator: the rendezvous that lets the n ranks of a group (n XLA CPU
// devices, each running its part of the program on its own pool thread) meet inside one
// `ark_collective` call, work on each other's buffers, and leave together.
//
// Protocol per call (one meeting point, work split across ranks):
//   1. post: a rank writes its input/output pointers, the call's signature and the run id into its
//      slot, then counts itself in as arrived for epoch e (its own call counter, see below);
//   2. wait until all n ranks arrived for epoch e, check every slot carries the same signature and
//      run id (a mismatch is an error, never wrong data);
//   3. work directly on peers' memory: ranks claim work units from a shared counter until none are
//      left (host_collectives.hpp), so the work is split across the ranks that have a core;
//   4. count itself as departed and wait until all n departed: peers may still be reading this
//      rank's input or writing its output, and XLA frees or reuses those buffers once we return.
//
// Small calls (input <= kSmallMessageBytes) meet once instead of twice: in step 1 each rank also
// copies its input into a staging area of the communicator, and in step 3 each rank computes its
// own output alone from the staged inputs. No rank then touches another rank's buffers, so there
// is nothing to wait for in step 4. Staging and posted calls are double-buffered by epoch parity:
// a rank can only reuse parity e's copy at epoch e + 2, after every peer arrived at e + 1, i.e.
// finished reading epoch e. At 4 KiB per rank the second rendezvous was most of the call's time
// on a 2-core machine (8 threads waking each other twice); the redundant reduction (each rank
// folds all n staged inputs) costs less than one wake-up at these sizes.
//
// Sites, then epochs: XLA:CPU does NOT run a group's custom calls in the same order on every device
// (its thunk executor runs independent thunks in dataflow order, possibly concurrently, and a
// while/cond body is one thunk of the enclosing computation). So every call carries the `site` id
// of its call site (assigned at trace time, the same on every device), and one communicator serves
// one (group, site): calls at different sites are never paired, and may run concurrently on one
// rank without sharing any state. Within a site, calls are sequential on every device (a loop
// re-entering the site), so each rank counts its own calls there and the k-th call of every rank is
// the same collective.
//
// Failure: every wait has a deadline. A rank that times out (or sees a mismatch) marks the
// communicator broken and drops it from the cache: the ranks still waiting fail at once instead of
// timing out one by one, late arrivals fail fast, and the next program builds a fresh communicator
// on every rank, so a rank that never arrived is not left one epoch behind forever.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "jax_ark/collective_types.hpp"

namespace jax_ark::cpu {

// Result of a collective call; the FFI layer maps it to an ffi::Error. A plain struct (no
// exceptions) because it crosses into the FFI handler.
struct CollectiveStatus {
  enum class Code { kOk, kInvalidArgument, kDeadlineExceeded, kAborted };
  Code code = Code::kOk;
  std::string message;

  bool ok() const { return code == Code::kOk; }
  static CollectiveStatus Ok() { return {}; }
};

// Which (group, call site) a communicator serves: comm_key names the mesh and the group's axes,
// color the group among those that share them, size the number of ranks, site the call site.
struct CommunicatorKey {
  int64_t comm_key;
  int32_t color;
  int32_t size;
  int64_t site;

  bool operator==(const CommunicatorKey& other) const {
    return comm_key == other.comm_key && color == other.color && size == other.size &&
           site == other.site;
  }
};

struct CommunicatorKeyHash {
  size_t operator()(const CommunicatorKey& k) const {
    size_t h = std::hash<int64_t>()(k.comm_key);
    h ^= std::hash<int64_t>()((int64_t{k.color} << 32) | static_cast<uint32_t>(k.size)) +
         0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h ^= std::hash<int64_t>()(k.site) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

// Everything a rank brings to one call. Pointers stay valid until the call returns.
struct CollectiveCall {
  CollectiveOp op;
  ReduceKind reduce;  // kSum for the ops that do not reduce, so signatures compare equal
  ElementType type;
  size_t input_elems;  // element count of x
  size_t block_elems;  // element count of S (see docs/internals.md)
  const void* input;
  void* output;
  int rank;
  int64_t run_id;
  int64_t timeout_ms;
  const int64_t* recv_from;  // permute: n entries; otherwise unused
  uint64_t table_hash;       // permute: hash of send_to/recv_from, so ranks agree on the pattern
};

class HostCommunicator {
 public:
  // Largest input (bytes per rank) that takes the one-rendezvous small-call path.
  static constexpr size_t kSmallMessageBytes = size_t{16} << 10;
  // ... in groups of at most this many ranks (the staging area is 2 x size x 16 KiB).
  static constexpr int kSmallMaxRanks = 64;

  HostCommunicator(const CommunicatorKey& key);
  HostCommunicator(const HostCommunicator&) = delete;
  HostCommunicator& operator=(const HostCommunicator&) = delete;

  // The communicator of `key`, created on first use; thread-safe. A broken one is never returned.
  static std::shared_ptr<HostCommunicator> get(const CommunicatorKey& key);

  // Process-wide cancellation (interpreter exit, Ctrl-C): every collective waiting now or called
  // later fails at once with kAborted and `reason`, instead of holding XLA's threads (and so the
  // process's exit) until its timeout. Irreversible: meant for a process that is going away.
  static void cancel_all(const std::string& reason);
  static bool cancelled();

  // Runs one collective for rank call.rank (0 <= rank < size, checked by the caller). Blocks until
  // the whole group is done with this call or a wait times out.
  CollectiveStatus run(const CollectiveCall& call);

  const CommunicatorKey& key() const { return key_; }

 private:
  // Everything one rank posts for the other ranks to read. Cache-line aligned so a rank writing its
  // slot does not invalidate its neighbours' slots while they spin on them.
  struct alignas(64) Slot {
    // Set while a call of this rank is inside run(): a second thread with the same rank at the
    // same site (two devices claiming one rank, or one traced call site instantiated twice in a
    // program and run concurrently) is an error, not a silent corruption of the slot.
    std::atomic<bool> busy{false};
    // This rank's call counter at this site; only the rank's own (current) thread touches it.
    uint64_t epoch = 0;
    // Last epoch this rank arrived at / departed from: read by peers for error messages only.
    std::atomic<uint64_t> arrived_epoch{0};
    std::atomic<uint64_t> departed_epoch{0};
    // The posted call, copied (not pointed to): a rank that fails fast may return while peers
    // still read its slot, and its stack would be gone. Published by the arrival count (release)
    // and read after it (acquire). Two, by epoch parity: after a small call (no departure wait) a
    // rank may post its next call while a slow peer still checks this one; the call after that
    // waits for every peer to arrive at the next one, so parity e is free again by then.
    CollectiveCall posted[2]{};
  };

  enum class Phase { kArrival, kDeparture };

  // Waits until `counter` reaches target (Ok), is poisoned (kAborted), or the deadline passes
  // (kDeadlineExceeded, after poisoning it).
  CollectiveStatus wait_for_count(std::atomic<uint64_t>& counter, uint64_t target, Phase phase,
                                  const CollectiveCall& call, uint64_t epoch);
  // Counts this rank in; the last one to arrive wakes the sleepers.
  void count_in(std::atomic<uint64_t>& counter, uint64_t target);
  // After a timeout: poisons `counter` unless it reached `target` meanwhile (then returns false
  // and the wait succeeded after all). Deciding under one CAS means the group either completes the
  // epoch on every rank or on none: no rank can start reading a peer that already gave up.
  bool poison_if_incomplete(std::atomic<uint64_t>& counter, uint64_t target,
                            const CollectiveStatus& reason);
  // Marks the communicator broken with `reason`, poisons both counters, wakes every waiter and
  // drops it from the cache.
  void mark_broken(const CollectiveStatus& reason);
  // The part of breaking that needs mu_ held; returns false if already broken.
  bool mark_broken_locked(const CollectiveStatus& reason);
  void after_broken();
  CollectiveStatus cancelled_status(const CollectiveCall& call) const;
  CollectiveStatus aborted_status(const CollectiveCall& call) const;
  std::string describe(const CollectiveCall& call, uint64_t epoch) const;

  const CommunicatorKey key_;
  std::unique_ptr<Slot[]> slots_;
  // Monotonic counts of arrivals and departures over all epochs: epoch e is complete when the
  // count reaches e * size. One counter (instead of polling n slots) lets the last rank in know it
  // is last and wake everybody with a single notify. The top bit (kPoisoned) marks a broken
  // communicator: a poisoned count never reads as complete.
  alignas(64) std::atomic<uint64_t> arrivals_{0};
  alignas(64) std::atomic<uint64_t> departures_{0};
  // Set (under mu_) together with broken_reason_; read without the lock for the fast checks.
  // Work units claimed so far, one counter per epoch parity (see run()).
  alignas(64) std::atomic<uint64_t> next_unit_[2] = {0, 0};
  alignas(64) std::atomic<bool> broken_{false};
  // Sleeping waiters block on cv_; mu_ also guards broken_reason_ and the poisoning.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  // The first failure; ranks that fail because of it report its code (a timeout stays
  // DEADLINE_EXCEEDED on every rank) and quote its message.
  CollectiveStatus broken_reason_;
  // The posted buffers by rank, in the layout the work units take. Rank r writes entry r before it
  // counts itself in (published like its slot) and nobody rewrites it before the departure.
  std::vector<const void*> group_inputs_;
  std::vector<void*> group_outputs_;
  // Small calls: [parity][rank] inputs of kSmallMessageBytes each, allocated on the first small
  // call (most call sites move large arrays and never need it).
  std::once_flag staging_once_;
  std::unique_ptr<char[]> staging_;
};

}  // namespace jax_ark::cpu
