// Symmetric regions of the CPU executor's put tasks (see persistent_region.hpp).
#include "persistent_region.hpp"

#include <cstring>
#include <mutex>
#include <unordered_map>

#include "jax_ark/plan_format.hpp"

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <chrono>
#include <thread>

namespace jax_ark::cpu {

// The process-wide cache of regions. Never destroyed, like the communicators' (XLA's pool threads
// may still run a plan while static destructors run at interpreter exit). Regions are released
// with the process: each holds its plan's inboxes once per rank, as XLA's workspace held them
// during a call.
class PersistentRegionRegistry {
 public:
  static PersistentRegionRegistry& instance() {
    static PersistentRegionRegistry* registry = new PersistentRegionRegistry();
    return *registry;
  }

  std::shared_ptr<PersistentRegion> get(const CommunicatorKey& key, const int32_t* words,
                                        int64_t num_words, int64_t inbox_bytes, std::string* error) {
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<PersistentRegion>& slot = map_[key];
    if (!slot || slot->broken()) {
      slot = std::make_shared<PersistentRegion>(key, words, num_words, inbox_bytes);
    } else if (static_cast<int64_t>(slot->plan_.size()) != num_words ||
               std::memcmp(slot->plan_.data(), words, sizeof(int32_t) * num_words) != 0) {
      *error = "another rank of the group runs a different plan at the same call site (put tasks "
               "need one plan on every rank of the group)";
      return nullptr;
    }
    return slot;
  }

  // Drops `region` if the cache still holds it (a fresh one may already have replaced it).
  void drop(const PersistentRegion* region) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(region->key());
    if (it != map_.end() && it->second.get() == region) map_.erase(it);
  }

 private:
  std::mutex mu_;
  std::unordered_map<CommunicatorKey, std::shared_ptr<PersistentRegion>, CommunicatorKeyHash> map_;
};

std::shared_ptr<PersistentRegion> PersistentRegion::get(const CommunicatorKey& key,
                                                        const int32_t* words, int64_t num_words,
                                                        int64_t inbox_bytes, std::string* error) {
  return PersistentRegionRegistry::instance().get(key, words, num_words, inbox_bytes, error);
}

PersistentRegion::PersistentRegion(const CommunicatorKey& key, const int32_t* words,
                                   int64_t num_words, int64_t inbox_bytes)
    : key_(key),
      plan_(words, words + num_words),
      inbox_bytes_(inbox_bytes),
      layout_(gpu::PersistentSymLayout::of(plan::PlanView{words}.header().num_tasks, key.size,
                                           inbox_bytes)),
      slots_(new Slot[static_cast<size_t>(key.size)]) {
  const size_t region_words = layout_.total_bytes / 8;
  for (int32_t r = 0; r < key.size; ++r) {
    bytes_.emplace_back(new uint64_t[region_words]());  // zeroed: no signal of any call yet
    regions_.push_back(reinterpret_cast<uint8_t*>(bytes_.back().get()));
    // Open for the first call (see the header: a rank's region opens when its previous call ends).
    *gpu::entered_word(regions_.back()) = 1;
  }
}

gpu::PersistentCommDevice PersistentRegion::begin(int32_t rank, int64_t run_id, std::string* error) {
  gpu::PersistentCommDevice c;
  Slot& mine = slots_[rank];
  if (mine.busy.exchange(true, std::memory_order_acquire)) {
    *error = "rank " + std::to_string(rank) + " is already inside a call of this plan at this call "
             "site (two devices claim one rank, or the call site runs twice at once)";
    return c;
  }
  if (broken()) {
    mine.busy.store(false, std::memory_order_release);
    *error = broken_reason();
    return c;
  }
  c.epoch = mine.epoch.fetch_add(1, std::memory_order_relaxed) + 1;
  // Read by peers only after they acquired one of this call's signals, released after this store.
  mine.run_id[c.epoch & 1].store(run_id, std::memory_order_relaxed);
  c.peers = regions_.data();
  c.local = regions_[rank];
  c.rank = rank;
  c.n = key_.size;
  c.inbox_bytes = inbox_bytes_;
  c.num_tasks = plan::PlanView{plan_.data()}.header().num_tasks;
  c.signals_offset = layout_.signals_offset;
  c.inbox_offset = layout_.inbox_offset;
  return c;
}

void PersistentRegion::end(const gpu::PersistentCommDevice& c, bool ok, const std::string& reason,
                           bool timed_out) {
  if (ok) {
    // Every signal of call c.epoch was awaited: peers may put call c.epoch + 1's tiles.
    gpu::PersistentCommDevice next = c;
    next.epoch = c.epoch + 1;
    gpu::announce_entered(next);
    ring(c.rank);
  } else {
    fail(reason, timed_out);
  }
  slots_[c.rank].busy.store(false, std::memory_order_release);
}

void PersistentRegion::fail(const std::string& reason, bool timed_out) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.load(std::memory_order_relaxed)) return;
    broken_reason_ = reason;
    broke_by_timeout_ = timed_out;
    broken_.store(true, std::memory_order_release);
  }
  PersistentRegionRegistry::instance().drop(this);
  for (int32_t r = 0; r < key_.size; ++r) ring(r);
}

bool PersistentRegion::broke_by_timeout() const {
  std::lock_guard<std::mutex> lock(mu_);
  return broke_by_timeout_;
}

std::string PersistentRegion::broken_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return "the group's put region at this call site broke in an earlier failure: " + broken_reason_;
}

void PersistentRegion::ring(int32_t rank) {
  Slot& s = slots_[rank];
  // The caller's store (a release) before the sleepers load: with the sleeper's registration
  // before its load of the word (sleep_unless_at_least), one of the two sees the other.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  s.doorbell.fetch_add(1, std::memory_order_seq_cst);
  if (s.sleepers.load(std::memory_order_seq_cst) == 0) return;
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&s.doorbell), FUTEX_WAKE_PRIVATE, INT32_MAX,
          nullptr, nullptr, 0);
#endif
}

void PersistentRegion::sleep_unless_at_least(int32_t rank, const uint64_t* word, uint64_t target,
                                             int64_t max_us) {
  Slot& s = slots_[rank];
  s.sleepers.fetch_add(1, std::memory_order_seq_cst);
  const uint32_t seen = s.doorbell.load(std::memory_order_seq_cst);
  // Registered first, then the word: a ring() after the store we wait for either sees us as a
  // sleeper (and wakes us, or changed the doorbell before our futex call) or came before this
  // load, which then sees the store.
  if (__atomic_load_n(word, __ATOMIC_SEQ_CST) < target && !broken()) {
#ifdef __linux__
    timespec ts{static_cast<time_t>(max_us / 1000000), static_cast<long>((max_us % 1000000) * 1000)};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&s.doorbell), FUTEX_WAIT_PRIVATE, seen, &ts,
            nullptr, 0);
#else
    (void)seen;
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(max_us, 50)));
#endif
  }
  s.sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace jax_ark::cpu
