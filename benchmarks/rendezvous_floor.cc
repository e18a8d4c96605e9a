// Three no-op FFI targets for benchmarks/rendezvous_floor.py: each copies x + 1 into its result
// and then meets every other device's call of the same execution, with nothing else to do. What
// they cost under an 8-device shard_map is the floor of ANY layer with one collective on the CPU
// backend's threads (ark's or jax.lax's), whatever the collective moves.
//  * rendezvous_block: the last of `ranks` arrivals wakes the others through a condition variable.
//  * rendezvous_spin: the others poll, yielding the core between polls.
//  * rendezvous_async: the handler returns an XLA FFI Future at once; the last arrival completes
//    every rank's future, so no thread waits at all.
// Every wait is bounded (kTimeout): a rank that never comes fails the call, naming the target.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr auto kTimeout = std::chrono::seconds(20);

void plus_one(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  for (size_t i = 0; i < x.element_count(); ++i) y->typed_data()[i] = x.typed_data()[i] + 1.0f;
}

ffi::Error timed_out(const char* target, int64_t ranks) {
  return ffi::Error(ffi::ErrorCode::kDeadlineExceeded,
                    std::string(target) + ": not all " + std::to_string(ranks) + " ranks arrived");
}

std::mutex block_mu;
std::condition_variable block_cv;
int64_t block_arrived = 0;
uint64_t block_round = 0;

ffi::Error Block(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t ranks) {
  plus_one(x, y);
  std::unique_lock<std::mutex> lock(block_mu);
  const uint64_t round = block_round;
  if (++block_arrived == ranks) {
    block_arrived = 0;
    ++block_round;
    block_cv.notify_all();
    return ffi::Error::Success();
  }
  if (!block_cv.wait_for(lock, kTimeout, [&] { return block_round != round; }))
    return timed_out("rendezvous_block", ranks);
  return ffi::Error::Success();
}

std::atomic<int64_t> spin_arrived{0};
std::atomic<uint64_t> spin_round{0};

ffi::Error Spin(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t ranks) {
  plus_one(x, y);
  const uint64_t round = spin_round.load(std::memory_order_acquire);
  if (spin_arrived.fetch_add(1, std::memory_order_acq_rel) == ranks - 1) {
    spin_arrived.store(0, std::memory_order_relaxed);
    spin_round.fetch_add(1, std::memory_order_release);
    return ffi::Error::Success();
  }
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (spin_round.load(std::memory_order_acquire) == round) {
    if (std::chrono::steady_clock::now() > deadline) return timed_out("rendezvous_spin", ranks);
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

// The async target: arrivals park their promises; the last one completes them all. A watchdog
// would be needed to bound a round whose last rank never comes; here a late arrival fails the
// parked ranks instead when it finds them older than kTimeout (enough for a benchmark).
std::mutex async_mu;
std::vector<ffi::Promise> async_parked;
std::chrono::steady_clock::time_point async_first;

ffi::Future Async(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t ranks) {
  plus_one(x, y);
  ffi::Promise mine;
  ffi::Future future(mine);
  std::vector<ffi::Promise> done;
  bool stale = false;
  {
    std::lock_guard<std::mutex> lock(async_mu);
    const auto now = std::chrono::steady_clock::now();
    if (async_parked.empty()) async_first = now;
    stale = now - async_first > kTimeout;
    async_parked.push_back(mine);
    if (stale || static_cast<int64_t>(async_parked.size()) == ranks) done.swap(async_parked);
  }
  for (ffi::Promise& p : done) {
    if (stale)
      p.SetError(timed_out("rendezvous_async", ranks));
    else
      p.SetAvailable();
  }
  return future;
}

auto binding() {
  return ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>(
      "ranks");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RendezvousBlock, Block, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RendezvousSpin, Spin, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RendezvousAsync, Async, binding());
