// Rendezvous of the CPU collectives (see host_communicator.hpp for the protocol).
#include "host_communicator.hpp"

#include <cstring>
#include <functional>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "host_collectives.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ARK_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define ARK_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define ARK_CPU_RELAX() ((void)0)
#endif

namespace jax_ark::cpu {
namespace {

using Clock = std::chrono::steady_clock;

// Top bit of the arrival/departure counts: set once the communicator is broken.
constexpr uint64_t kPoisoned = uint64_t{1} << 63;

// Waiting is tiered: most rendezvous complete within microseconds when the group's threads run
// in parallel, so a short busy spin catches them without a syscall. With more ranks than cores
// (8 devices on 2 cores) spinning steals the core a late rank needs, so after a few microseconds
// we yield, and after that sleep on the condition variable until woken or the deadline.
constexpr int kSpinIterations = 64;
constexpr auto kYieldPhase = std::chrono::microseconds(50);
// A sleeping waiter wakes at least this often to look at the process-wide cancel flag (besides
// being woken by cancel_all itself), so a cancellation is seen even if a wakeup raced past it.
constexpr auto kCancelPollPeriod = std::chrono::milliseconds(100);

// Set once by HostCommunicator::cancel_all; the reason is written before the flag is released.
std::atomic<bool> g_cancelled{false};
std::mutex g_cancel_mu;
std::string g_cancel_reason;

// The process-wide cache of communicators. Never destroyed: XLA's pool threads may still run a
// collective while static destructors run at interpreter exit, and a destroyed map would crash
// them. The communicators it holds are released with the process.
class Registry {
 public:
  static Registry& instance() {
    static Registry* registry = new Registry();
    return *registry;
  }

  std::shared_ptr<HostCommunicator> get(const CommunicatorKey& key,
                                        bool (*is_broken)(const HostCommunicator&)) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = map_[key];
    if (!slot || is_broken(*slot)) slot = std::make_shared<HostCommunicator>(key);
    return slot;
  }

  // Every cached communicator, for cancel_all to wake their waiters.
  std::vector<std::shared_ptr<HostCommunicator>> all() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::shared_ptr<HostCommunicator>> out;
    out.reserve(map_.size());
    for (auto& [key, comm] : map_)
      if (comm) out.push_back(comm);
    return out;
  }

  // Drops `comm` if the cache still holds it (a fresh one may already have replaced it).
  void drop(const HostCommunicator* comm) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(comm->key());
    if (it != map_.end() && it->second.get() == comm) map_.erase(it);
  }

 private:
  std::mutex mu_;
  std::unordered_map<CommunicatorKey, std::shared_ptr<HostCommunicator>, CommunicatorKeyHash> map_;
};

const char* phase_verb(bool arrival) { return arrival ? "arrive" : "finish"; }

}  // namespace

HostCommunicator::HostCommunicator(const CommunicatorKey& key)
    : key_(key),
      slots_(new Slot[static_cast<size_t>(key.size)]),
      group_inputs_(static_cast<size_t>(key.size)),
      group_outputs_(static_cast<size_t>(key.size)) {}

std::shared_ptr<HostCommunicator> HostCommunicator::get(const CommunicatorKey& key) {
  return Registry::instance().get(key, [](const HostCommunicator& c) {
    return c.broken_.load(std::memory_order_acquire);
  });
}

bool HostCommunicator::cancelled() { return g_cancelled.load(std::memory_order_acquire); }

void HostCommunicator::cancel_all(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(g_cancel_mu);
    if (g_cancelled.load(std::memory_order_relaxed)) return;
    g_cancel_reason = reason;
    g_cancelled.store(true, std::memory_order_release);
  }
  for (const auto& comm : Registry::instance().all()) {
    // Under the communicator's lock, so a waiter between its check and its sleep cannot miss it.
    { std::lock_guard<std::mutex> lock(comm->mu_); }
    comm->cv_.notify_all();
  }
}

CollectiveStatus HostCommunicator::cancelled_status(const CollectiveCall& call) const {
  std::string reason;
  {
    std::lock_guard<std::mutex> lock(g_cancel_mu);
    reason = g_cancel_reason;
  }
  std::ostringstream s;
  s << "ark_collective " << collective_op_name(call.op) << " at rank " << call.rank
    << " cancelled: " << reason;
  return {CollectiveStatus::Code::kAborted, s.str()};
}

std::string HostCommunicator::describe(const CollectiveCall& call, uint64_t epoch) const {
  std::ostringstream s;
  s << "group comm_key=" << key_.comm_key << " color=" << key_.color << " size=" << key_.size
    << ", site=" << key_.site << ", call #" << epoch << " at this site";
  return s.str();
}

bool HostCommunicator::mark_broken_locked(const CollectiveStatus& reason) {
  if (broken_.load(std::memory_order_relaxed)) return false;  // keep the first cause
  broken_reason_ = reason;
  broken_.store(true, std::memory_order_release);
  arrivals_.fetch_or(kPoisoned, std::memory_order_acq_rel);
  departures_.fetch_or(kPoisoned, std::memory_order_acq_rel);
  return true;
}

void HostCommunicator::after_broken() {
  cv_.notify_all();
  Registry::instance().drop(this);
}

void HostCommunicator::mark_broken(const CollectiveStatus& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    mark_broken_locked(reason);
  }
  after_broken();
}

bool HostCommunicator::poison_if_incomplete(std::atomic<uint64_t>& counter, uint64_t target,
                                            const CollectiveStatus& reason) {
  {
    // Under mu_, so whoever sees the poison and then takes mu_ also sees broken_reason_.
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t c = counter.load(std::memory_order_acquire);
    while (true) {
      if (c & kPoisoned) return true;  // someone else broke it first
      if (c >= target) return false;   // the last rank arrived just in time
      if (counter.compare_exchange_weak(c, c | kPoisoned, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
        break;
    }
    mark_broken_locked(reason);
  }
  after_broken();
  return true;
}

CollectiveStatus HostCommunicator::aborted_status(const CollectiveCall& call) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream s;
  s << "ark_collective " << collective_op_name(call.op) << " at rank " << call.rank
    << " aborted because its group failed: " << broken_reason_.message;
  return {broken_reason_.code, s.str()};
}

void HostCommunicator::count_in(std::atomic<uint64_t>& counter, uint64_t target) {
  // acq_rel: the release publishes this rank's slot; the RMW chain makes every earlier rank's
  // release visible to whoever reads the final count with acquire.
  if (counter.fetch_add(1, std::memory_order_acq_rel) + 1 == target) {
    // Taking the lock orders this notify after any waiter's check-then-sleep, so none misses it.
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
  }
}

CollectiveStatus HostCommunicator::wait_for_count(std::atomic<uint64_t>& counter,
                                                  uint64_t target, Phase phase,
                                                  const CollectiveCall& call, uint64_t epoch) {
  // A poisoned count has the top bit set, so it compares >= target; check the bit first.
  auto done = [&] {
    const uint64_t c = counter.load(std::memory_order_acquire);
    return !(c & kPoisoned) && c >= target;
  };
  auto poisoned = [&] { return (counter.load(std::memory_order_acquire) & kPoisoned) != 0; };

  for (int i = 0; i < kSpinIterations; ++i) {
    if (done()) return CollectiveStatus::Ok();
    ARK_CPU_RELAX();
  }
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(call.timeout_ms);
  const auto yield_until = std::min(deadline, start + kYieldPhase);
  while (Clock::now() < yield_until) {
    if (done()) return CollectiveStatus::Ok();
    if (poisoned()) return aborted_status(call);
    std::this_thread::yield();
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    while (!done() && !poisoned() && !cancelled()) {
      const auto now = Clock::now();
      if (now >= deadline) break;
      cv_.wait_until(lock, std::min(deadline, now + kCancelPollPeriod));
    }
  }
  if (done()) return CollectiveStatus::Ok();
  if (poisoned()) return aborted_status(call);
  if (cancelled()) {
    // Break the group too, so peers fail now and the next program builds a fresh communicator.
    const CollectiveStatus status = cancelled_status(call);
    if (!poison_if_incomplete(counter, target, status)) return CollectiveStatus::Ok();
    return aborted_status(call);
  }

  // Timed out: name the first peer that is missing, so the user can tell a rank that never
  // called this collective from a slow one.
  const bool arrival = phase == Phase::kArrival;
  int missing = -1;
  for (int p = 0; p < key_.size && missing < 0; ++p) {
    const auto& slot = slots_[static_cast<size_t>(p)];
    const uint64_t seen =
        (arrival ? slot.arrived_epoch : slot.departed_epoch).load(std::memory_order_acquire);
    if (seen < epoch) missing = p;
  }
  std::ostringstream s;
  s << "ark_collective " << collective_op_name(call.op) << " timed out after " << call.timeout_ms
    << " ms: rank " << call.rank << " waited for rank " << missing << " to " << phase_verb(arrival)
    << " (" << describe(call, epoch) << ")"
    << (arrival ? "; that rank never reached this collective (is it inside a branch or loop "
                  "that not every rank of the group runs?)"
                : "; that rank did not finish its share of the work in time");
  const CollectiveStatus timed_out{CollectiveStatus::Code::kDeadlineExceeded, s.str()};
  if (!poison_if_incomplete(counter, target, timed_out)) return CollectiveStatus::Ok();
  {
    // Another rank may have given up first; then quote its cause (the first one) instead.
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_reason_.message == timed_out.message) return timed_out;
  }
  return aborted_status(call);
}

CollectiveStatus HostCommunicator::run(const CollectiveCall& call) {
  const int n = key_.size;
  Slot& mine = slots_[static_cast<size_t>(call.rank)];

  if (mine.busy.exchange(true, std::memory_order_acquire)) {
    std::ostringstream s;
    // (No epoch in this message: it belongs to the thread that holds the slot.)
    s << "ark_collective " << collective_op_name(call.op) << ": two calls claim rank "
      << call.rank << " at site " << key_.site << " at the same time (group comm_key="
      << key_.comm_key << " color=" << key_.color << " size=" << n
      << "); either two devices pass the same rank operand (it must be the device's index "
         "within its group), or one traced collective runs twice concurrently in one program "
         "(e.g. a jitted function containing it called twice on independent inputs)";
    const CollectiveStatus status{CollectiveStatus::Code::kInvalidArgument, s.str()};
    mark_broken(status);
    return status;
  }
  // RAII: the slot is released on every return path.
  struct BusyGuard {
    std::atomic<bool>& flag;
    ~BusyGuard() { flag.store(false, std::memory_order_release); }
  } busy_guard{mine.busy};

  // A late arrival on a broken communicator fails now instead of waiting out its timeout.
  if (broken_.load(std::memory_order_acquire)) return aborted_status(call);
  if (cancelled()) return cancelled_status(call);

  const uint64_t epoch = ++mine.epoch;
  const uint64_t target = epoch * static_cast<uint64_t>(n);

  // Every rank decides alike: input_elems is part of the signature checked in step 2 (a rank
  // that disagrees fails the check before anyone reads its staged bytes).
  const size_t input_bytes = call.input_elems * element_size(call.type);
  const bool small = n <= kSmallMaxRanks && input_bytes <= kSmallMessageBytes;
  const size_t parity = epoch & 1;

  // 1. post
  mine.posted[parity] = call;
  if (small) {
    std::call_once(staging_once_, [&] {
      staging_.reset(new char[2 * static_cast<size_t>(n) * kSmallMessageBytes]);
    });
    char* staged = staging_.get() + (parity * n + call.rank) * kSmallMessageBytes;
    if (input_bytes != 0) std::memcpy(staged, call.input, input_bytes);
  } else {
    group_inputs_[static_cast<size_t>(call.rank)] = call.input;
    group_outputs_[static_cast<size_t>(call.rank)] = call.output;
  }
  mine.arrived_epoch.store(epoch, std::memory_order_release);
  count_in(arrivals_, target);

  // 2. meet
  CollectiveStatus status = wait_for_count(arrivals_, target, Phase::kArrival, call, epoch);
  if (!status.ok()) return status;

  for (int p = 0; p < n; ++p) {
    const CollectiveCall& peer = slots_[static_cast<size_t>(p)].posted[parity];
    const bool same = peer.op == call.op && peer.reduce == call.reduce && peer.type == call.type &&
                      peer.input_elems == call.input_elems && peer.table_hash == call.table_hash;
    if (!same || peer.run_id != call.run_id) {
      // Every rank compares all slots with its own, so if any two differ every rank sees a
      // difference and fails: the group fails together instead of exchanging wrong data.
      std::ostringstream s;
      s << "ark_collective " << collective_op_name(call.op) << ": rank " << call.rank
        << " and rank " << p << " disagree on call #" << epoch << " at site " << key_.site
        << " of group comm_key=" << key_.comm_key << " color=" << key_.color << " size=" << n
        << ": ";
      if (!same) {
        s << "rank " << call.rank << " runs " << collective_op_name(call.op) << "/"
          << reduce_kind_name(call.reduce) << " on " << call.input_elems << " "
          << element_type_name(call.type) << " elements, rank " << p << " runs "
          << collective_op_name(peer.op) << "/" << reduce_kind_name(peer.reduce) << " on "
          << peer.input_elems << " " << element_type_name(peer.type) << " elements"
          << (peer.table_hash != call.table_hash ? " (or a different permutation)" : "")
          << "; every rank must run the same collectives at each call site";
      } else {
        s << "they belong to different launches (run ids " << call.run_id << " and "
          << peer.run_id << "); a rank skipped a collective in an earlier launch";
      }
      const CollectiveStatus status{CollectiveStatus::Code::kInvalidArgument, s.str()};
      mark_broken(status);
      return status;
    }
  }

  const CollectiveWork work{call.op, call.reduce, call.type, call.block_elems, call.recv_from};
  const WorkPlan plan = plan_work(work, n);
  // The other unit counter was last used by epoch - 1, which every rank finished before arriving
  // here; it is next used by epoch + 1, which no rank starts before rank 0 is done with this one.
  if (call.rank == 0) next_unit_[(epoch + 1) & 1].store(0, std::memory_order_relaxed);

  if (small) {
    // 3'. each rank makes its own output from the staged inputs; nobody waits to leave.
    std::vector<const void*> staged(static_cast<size_t>(n));
    for (int p = 0; p < n; ++p) {
      staged[static_cast<size_t>(p)] = staging_.get() + (parity * n + p) * kSmallMessageBytes;
    }
    std::vector<void*> outputs(static_cast<size_t>(n), nullptr);
    outputs[static_cast<size_t>(call.rank)] = call.output;
    run_rank_output(work, plan, call.rank, GroupBuffers{staged.data(), outputs.data(), n});
    mine.departed_epoch.store(epoch, std::memory_order_release);
    departures_.fetch_add(1, std::memory_order_acq_rel);  // keeps departures == epoch * n
    return CollectiveStatus::Ok();
  }

  // 3. work: claim units from the shared counter until none are left. Late-waking ranks may find
  // nothing to do, which is the point: the ranks that have a core do the work.
  const GroupBuffers group{group_inputs_.data(), group_outputs_.data(), n};
  std::atomic<uint64_t>& next_unit = next_unit_[epoch & 1];
  for (uint64_t unit = next_unit.fetch_add(1, std::memory_order_relaxed); unit < plan.num_units;
       unit = next_unit.fetch_add(1, std::memory_order_relaxed)) {
    run_work_unit(work, plan, unit, group);
  }
  finish_work(plan);

  // 4. leave together: nobody returns while a peer may still touch its buffers
  mine.departed_epoch.store(epoch, std::memory_order_release);
  count_in(departures_, target);
  return wait_for_count(departures_, target, Phase::kDeparture, call, epoch);
}

}  // namespace jax_ark::cpu
