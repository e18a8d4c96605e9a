// Runs the GPU runtime's device-side protocol code on host threads (tests/test_protocol_host.py).
//
// The functions exercised here are the ones the CUDA kernels call, from the same headers
// (communicator_device.hpp, persistent_sync_device.cuh, persistent_comm_device.hpp, protocol.hpp),
// compiled by the host compiler with its __atomic builtins instead of libcu++: LL calls (ll_call),
// flag signal/wait with epochs and rounds (signal_peer, WaitContext::wait_flag, round_seq), the
// per-call epoch (current_epoch, retire_block), bounded waits and error records, the persistent
// kernel's queue walk and dependency counters (persistent_wait_deps, persistent_release_task,
// abort word) and its put protocol (announce_entered, wait_peer_entered, signal_put, wait_put).
// Threads stand in for ranks (or a rank's blocks) and for persistent workers; the test checks every
// output word against a reference computed independently, and the payload is plain memory, so a
// missing acquire/release shows up under ThreadSanitizer (the pytest also builds a TSan binary).
//
// Usage (one mode per run; prints `key=value` lines, exit 0 iff every check passed):
//   ll        N CALLS LANES SEED        random LL calls of every op, back to back
//   pingpong  N CALLS BLOCKS SEED       chunked-style rounds: puts, signal, wait, check
//   timeout   N SKIP                    rank SKIP never starts: the others must give up, naming it
//   stale                               old-epoch packets/flags must not satisfy a new call's waits
//   persistent PLAN SEED [DROP]         worker threads run a plan's queues (binary plan file);
//                                       with DROP, task DROP never releases its counter
//   put G W CALLS TASKS LOOP_RUNS SEED [ROUTES [BREAK [EPOCHS]]]
//                                       G ranks x W workers run CALLS calls of a plan of put
//                                       tasks; ROUTES all|ring|mixed (default mixed); BREAK
//                                       none|no_entry_wait|entry_epoch_minus_1|no_put_wait breaks
//                                       the protocol on purpose (exit 1 expected); EPOCHS host
//                                       (default: call e is given epoch e, as the harness does) or
//                                       device (each worker reads its rank's control word at the
//                                       call's start and the last one done advances it, as the
//                                       kernel on XLA's path does: retire_block); device_unretired
//                                       reads it but never advances it (exit 1 expected)
//   put_timeout G SKIP                  rank SKIP never enters: the others' entry waits give up
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "jax_ark/gpu/communicator_device.hpp"
#include "jax_ark/gpu/persistent_comm_device.hpp"
#include "jax_ark/gpu/persistent_sync_device.cuh"
#include "jax_ark/plan_format.hpp"

namespace ag = jax_ark::gpu;
namespace pf = jax_ark::plan;

namespace {

uint64_t mix(uint64_t x) {  // splitmix64 finalizer: deterministic pseudo-random words
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
uint64_t mix(uint64_t a, uint64_t b, uint64_t c = 0, uint64_t d = 0) {
  return mix(a ^ mix(b ^ mix(c ^ mix(d))));
}

void pause_us(uint64_t us) {
  if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// The host side of a kernel boundary between two calls of one rank: all its lanes (blocks) finish
// call e before any starts call e + 1 (on the GPU: stream order of two kernels).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

// N ranks of one communicator in host memory, laid out exactly like the GPU runtime's scratch.
struct Group {
  ag::CommConfig config;
  ag::ScratchLayout layout;
  std::vector<std::unique_ptr<uint64_t[]>> scratch;  // uint64 storage: 8-byte aligned packets
  std::vector<uint8_t*> peers;
  std::vector<ag::RankControl> control;
  std::vector<ag::ErrorRecord> error;
  std::vector<ag::CommDevice> comm;

  Group(int n, int blocks, uint32_t piece_bytes, uint32_t ll_bytes)
      : control(n), error(n), comm(n) {
    config.n_ranks = n;
    config.blocks = blocks;
    config.piece_bytes = piece_bytes;
    config.ll_bytes = ll_bytes;
    layout = ag::ScratchLayout::of(config);
    for (int r = 0; r < n; ++r) {
      scratch.emplace_back(new uint64_t[layout.total_bytes / 8]());
      peers.push_back(reinterpret_cast<uint8_t*>(scratch.back().get()));
    }
    for (int r = 0; r < n; ++r) {
      control[r] = ag::RankControl{1, 0, 0, 0};  // epochs start at 1 (0 = never written)
      std::memset(&error[r], 0, sizeof(ag::ErrorRecord));
      ag::CommDevice& c = comm[r];
      c.peers = peers.data();
      c.local = peers[r];
      c.control = &control[r];
      c.error = &error[r];
      c.comm_id = 7;
      c.n = n;
      c.rank = r;
      c.device = 0;
      c.blocks = blocks;
      c.piece_bytes = piece_bytes;
      c.ll_slot_packets = layout.ll_slot_packets;
      c.flags_offset = layout.flags_offset;
      c.ll_offset = layout.ll_offset;
      c.chunk_offset = layout.chunk_offset;
    }
  }
};

// Folds of 32-bit words in rank order, as WordFold<T, R> does in the kernels.
struct SumI32 {
  uint32_t acc = 0;
  void first(uint32_t w) { acc = w; }
  void next(uint32_t w) { acc += w; }  // wraps like XLA's integer sum
  uint32_t result() const { return acc; }
};
struct SumF32 {
  float acc = 0.f;
  static float f(uint32_t w) {
    float v;
    std::memcpy(&v, &w, 4);
    return v;
  }
  void first(uint32_t w) { acc = f(w); }
  void next(uint32_t w) { acc += f(w); }
  uint32_t result() const {
    uint32_t w;
    std::memcpy(&w, &acc, 4);
    return w;
  }
};

int fail(const char* what) {
  std::fprintf(stderr, "usage error: %s\n", what);
  return 2;
}

// ---- ll: random LL calls of every op, back to back --------------------------------------------
struct CallSpec {
  int32_t op;
  bool f32;  // reducing ops: float32 sum, else int32 sum
  uint64_t m;
  int32_t shift;  // permute: send to (r + shift) % n; shift 0 = rank 0 sends nowhere
  uint64_t skew_us;
};

CallSpec call_spec(uint64_t seed, int call, int n, uint32_t ll_bytes) {
  const uint64_t h = mix(seed, 1, call);
  CallSpec s;
  s.op = static_cast<int32_t>(h % 5);
  s.f32 = (h >> 8) & 1;
  const bool reducing = s.op == ag::kAllReduce || s.op == ag::kReduceScatter;
  // Random sizes up to the LL capacity, with byte tails for the ops that only move bytes.
  const uint64_t cap = std::min<uint64_t>(ll_bytes, 4096);
  s.m = 1 + (h >> 16) % cap;
  if (reducing) s.m = std::max<uint64_t>(4, s.m / 4 * 4);
  s.shift = static_cast<int32_t>((h >> 40) % n);
  s.skew_us = ((h >> 48) % 4 == 0) ? (h >> 52) % 200 : 0;
  return s;
}

uint32_t input_word(uint64_t seed, int call, int rank, uint64_t i) {
  const uint64_t h = mix(seed, 2 + call, rank, i);
  // Finite floats of moderate size for the f32 sums (exponent kept in range).
  return static_cast<uint32_t>(h & 0x807FFFFFu) | (static_cast<uint32_t>(100 + (h >> 40) % 40) << 23);
}

std::vector<uint8_t> make_input(uint64_t seed, int call, int rank, uint64_t bytes) {
  std::vector<uint8_t> x(bytes);
  for (uint64_t i = 0; i < bytes; i += 4) {
    const uint32_t w = input_word(seed, call, rank, i / 4);
    std::memcpy(x.data() + i, &w, std::min<uint64_t>(4, bytes - i));
  }
  return x;
}

// What rank r must hold after `spec`, computed from the inputs without the protocol.
std::vector<uint8_t> expected_output(uint64_t seed, int call, const CallSpec& s, int n, int r) {
  const uint64_t m = s.m;
  std::vector<std::vector<uint8_t>> xs;
  const bool per_peer = s.op == ag::kReduceScatter || s.op == ag::kAllToAll;
  for (int j = 0; j < n; ++j) xs.push_back(make_input(seed, call, j, per_peer ? n * m : m));
  if (s.op == ag::kAllReduce || s.op == ag::kReduceScatter) {
    std::vector<uint8_t> y(m);
    const uint64_t at = s.op == ag::kReduceScatter ? r * m : 0;
    for (uint64_t w = 0; w < m / 4; ++w) {
      SumI32 si;
      SumF32 sf;
      for (int j = 0; j < n; ++j) {
        uint32_t v;
        std::memcpy(&v, xs[j].data() + at + w * 4, 4);
        if (j == 0) si.first(v), sf.first(v);
        else si.next(v), sf.next(v);
      }
      const uint32_t out = s.f32 ? sf.result() : si.result();
      std::memcpy(y.data() + w * 4, &out, 4);
    }
    return y;
  }
  if (s.op == ag::kPermute) {
    std::vector<uint8_t> y(m, 0);
    const int from = (r - s.shift + n) % n;
    if (!(s.shift == 0 && from == 0)) std::memcpy(y.data(), xs[from].data(), m);
    return y;
  }
  std::vector<uint8_t> y(n * m);
  for (int j = 0; j < n; ++j)
    std::memcpy(y.data() + j * m, xs[j].data() + (s.op == ag::kAllToAll ? r * m : 0), m);
  return y;
}

int run_ll(int n, int calls, int lanes, uint64_t seed) {
  if (n < 1 || n > ag::kMaxRanks || calls < 1 || lanes < 1) return fail("ll N CALLS LANES SEED");
  const uint32_t ll_bytes = 4096;
  Group g(n, 1, 4096, ll_bytes);
  std::vector<std::unique_ptr<Barrier>> barriers;
  for (int r = 0; r < n; ++r) barriers.emplace_back(new Barrier(lanes));
  std::vector<uint64_t> mismatches(n * lanes, 0), failures(n * lanes, 0);
  // x / y of every rank, rebuilt by lane 0 of the rank between calls (behind the rank's barrier).
  std::vector<std::vector<uint8_t>> xs(n), ys(n);

  auto rank_lane = [&](int r, int lane) {
    for (int call = 0; call < calls; ++call) {
      const CallSpec s = call_spec(seed, call, n, ll_bytes);
      const bool per_peer = s.op == ag::kReduceScatter || s.op == ag::kAllToAll;
      const bool gathers = s.op == ag::kAllGather || s.op == ag::kAllToAll;
      if (lane == 0) {
        xs[r] = make_input(seed, call, r, per_peer ? n * s.m : s.m);
        ys[r].assign(gathers ? n * s.m : s.m, 0xAB);
        pause_us(s.skew_us * ((r + call) % 3));  // ranks enter the call at different times
      }
      barriers[r]->wait();
      ag::CollectiveArgs a;
      a.op = s.op;
      a.dtype = s.f32 ? ag::kF32 : ag::kS32;
      a.x = xs[r].data();
      a.y = ys[r].data();
      a.block_bytes = s.m;
      for (int j = 0; j < ag::kMaxRanks; ++j) a.send_to[j] = a.recv_from[j] = -1;
      for (int j = 0; j < n; ++j) {
        const int to = (j + s.shift) % n;
        if (s.shift == 0 && j == 0) continue;  // a rank with no route: its receiver gets zeros
        a.send_to[j] = to;
        a.recv_from[to] = j;
      }
      a.timeout_ns = 20'000'000'000ull;
      const uint64_t epoch = ag::current_epoch(&g.control[r]);
      const ag::WaitContext w = ag::WaitContext::begin(g.comm[r], s.op, epoch, a.timeout_ns);
      const ag::Lanes ln{static_cast<uint64_t>(lane), static_cast<uint64_t>(lanes), lane, lanes};
      const uint8_t* x = xs[r].data();
      uint8_t* y = ys[r].data();
      const bool ok = s.op == ag::kAllReduce || s.op == ag::kReduceScatter
                          ? (s.f32 ? ag::ll_call<SumF32>(w, a, x, y, ln)
                                   : ag::ll_call<SumI32>(w, a, x, y, ln))
                          : ag::ll_call<SumI32>(w, a, x, y, ln);
      if (!ok) ++failures[r * lanes + lane];
      ag::retire_block(&g.control[r], static_cast<uint32_t>(lanes), epoch);
      barriers[r]->wait();
      if (lane == 0) {
        const std::vector<uint8_t> want = expected_output(seed, call, s, n, r);
        if (want != ys[r]) ++mismatches[r * lanes];
      }
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    for (int l = 0; l < lanes; ++l) threads.emplace_back(rank_lane, r, l);
  for (auto& t : threads) t.join();
  uint64_t bad = 0, failed = 0;
  for (uint64_t v : mismatches) bad += v;
  for (uint64_t v : failures) failed += v;
  bool epochs_ok = true;
  for (int r = 0; r < n; ++r) epochs_ok = epochs_ok && g.control[r].epoch == 1u + calls;
  std::printf("mode=ll ranks=%d calls=%d lanes=%d mismatches=%llu wait_failures=%llu epochs_ok=%d\n",
              n, calls, lanes, static_cast<unsigned long long>(bad),
              static_cast<unsigned long long>(failed), epochs_ok ? 1 : 0);
  return bad == 0 && failed == 0 && epochs_ok ? 0 : 1;
}

// ---- pingpong: the chunked protocol's rounds ---------------------------------------------------
// Every round each (rank, block) writes one piece into every peer's chunk area (slot: call half,
// round parity, my rank, block), raises flag[me][block] = round_seq(epoch, g) on every peer, waits
// for every peer's flag, and checks the pieces it received. Rounds per call vary, ranks skew.
uint32_t piece_word(uint64_t epoch, uint32_t g, int src, int dst, int block, uint32_t k) {
  return static_cast<uint32_t>(mix(epoch, g, (static_cast<uint64_t>(src) << 32) | dst,
                                   (static_cast<uint64_t>(block) << 32) | k));
}

int run_pingpong(int n, int calls, int blocks, uint64_t seed) {
  if (n < 1 || n > ag::kMaxRanks || calls < 1 || blocks < 1 || blocks > ag::kMaxBlocks)
    return fail("pingpong N CALLS BLOCKS SEED");
  const uint32_t piece_bytes = 256;
  Group g(n, blocks, piece_bytes, 1024);
  std::vector<std::unique_ptr<Barrier>> barriers;
  for (int r = 0; r < n; ++r) barriers.emplace_back(new Barrier(blocks));
  std::vector<uint64_t> mismatches(n * blocks, 0), failures(n * blocks, 0), rounds_done(n * blocks, 0);
  const uint32_t words = piece_bytes / 4;

  auto rank_block = [&](int r, int b) {
    const ag::CommDevice& c = g.comm[r];
    for (int call = 0; call < calls; ++call) {
      const uint64_t h = mix(seed, 3, call);
      const uint32_t rounds = 1 + static_cast<uint32_t>(h % 6);
      if (b == 0) pause_us(((h >> 8) % 3 == 0) ? ((h >> 16) + r) % 150 : 0);
      const uint64_t epoch = ag::current_epoch(c.control);
      const uint32_t half = static_cast<uint32_t>(epoch & 1u);
      const ag::WaitContext w = ag::WaitContext::begin(c, ag::kAllGather, epoch, 20'000'000'000ull);
      bool ok = true;
      for (uint32_t k = 0; ok && k < rounds; ++k) {
        const uint32_t parity = k & 1u;
        for (int jj = 0; jj < n; ++jj) {
          const int j = (r + jj) % n;
          auto* dst = reinterpret_cast<uint32_t*>(c.piece(c.peers[j], half, parity, r, b));
          for (uint32_t i = 0; i < words; ++i) dst[i] = piece_word(epoch, k, r, j, b, i);
        }
        const uint64_t seq = ag::round_seq(epoch, k);
        for (int j = 0; j < n; ++j) ag::signal_peer(c, j, b, seq);
        for (int j = 0; ok && j < n; ++j) ok = w.wait_flag(j, b, seq);
        if (!ok) break;
        for (int j = 0; j < n; ++j) {
          const auto* src = reinterpret_cast<const uint32_t*>(c.piece(c.local, half, parity, j, b));
          for (uint32_t i = 0; i < words; ++i)
            if (src[i] != piece_word(epoch, k, j, r, b, i)) {
              ++mismatches[r * blocks + b];
              break;
            }
        }
        ++rounds_done[r * blocks + b];
      }
      if (!ok) ++failures[r * blocks + b];
      ag::retire_block(c.control, static_cast<uint32_t>(blocks), epoch);
      barriers[r]->wait();
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    for (int b = 0; b < blocks; ++b) threads.emplace_back(rank_block, r, b);
  for (auto& t : threads) t.join();
  uint64_t bad = 0, failed = 0, total_rounds = 0, want_rounds = 0;
  for (uint64_t v : mismatches) bad += v;
  for (uint64_t v : failures) failed += v;
  for (uint64_t v : rounds_done) total_rounds += v;
  for (int call = 0; call < calls; ++call) want_rounds += 1 + mix(seed, 3, call) % 6;
  want_rounds *= static_cast<uint64_t>(n) * blocks;
  bool epochs_ok = true;
  for (int r = 0; r < n; ++r) epochs_ok = epochs_ok && g.control[r].epoch == 1u + calls;
  std::printf("mode=pingpong ranks=%d calls=%d blocks=%d rounds=%llu mismatches=%llu "
              "wait_failures=%llu epochs_ok=%d\n",
              n, calls, blocks, static_cast<unsigned long long>(total_rounds),
              static_cast<unsigned long long>(bad), static_cast<unsigned long long>(failed),
              epochs_ok ? 1 : 0);
  return bad == 0 && failed == 0 && epochs_ok && total_rounds == want_rounds ? 0 : 1;
}

// ---- timeout: a rank that never starts ---------------------------------------------------------
void print_records(const Group& g, int n) {
  for (int r = 0; r < n; ++r) {
    const ag::ErrorRecord& e = g.error[r];
    std::printf("record rank=%d state=%d op=%s rec_rank=%d peer=%d epoch=%llu waited_ms=%.1f\n", r,
                e.state, e.state ? (e.op == ag::kAllReduce ? "all_reduce" : "all_gather") : "-",
                e.rank, e.peer, static_cast<unsigned long long>(e.epoch), e.waited_ns / 1e6);
  }
}

int run_timeout(int n, int skip) {
  if (n < 2 || n > ag::kMaxRanks || skip < 0 || skip >= n) return fail("timeout N SKIP");
  // LL all-reduce (flags of the chunked path: see `stale`), 200 ms bound per call.
  Group g(n, 1, 4096, 4096);
  const uint64_t timeout_ns = 200'000'000ull;
  std::vector<std::vector<uint8_t>> xs(n, std::vector<uint8_t>(64, 1)), ys(n, std::vector<uint8_t>(64));
  std::vector<int> ok(n, -1);
  std::vector<double> took_ms(n, 0);
  auto rank = [&](int r) {
    ag::CollectiveArgs a;
    a.op = ag::kAllReduce;
    a.dtype = ag::kS32;
    a.x = xs[r].data();
    a.y = ys[r].data();
    a.block_bytes = 64;
    a.timeout_ns = timeout_ns;
    const uint64_t t0 = jax_ark::gpu::proto::now_ns();
    const uint64_t epoch = ag::current_epoch(&g.control[r]);
    const ag::WaitContext w = ag::WaitContext::begin(g.comm[r], a.op, epoch, timeout_ns);
    ok[r] = ag::ll_call<SumI32>(w, a, xs[r].data(), ys[r].data(), ag::Lanes{0, 1, 0, 1}) ? 1 : 0;
    ag::retire_block(&g.control[r], 1, epoch);
    took_ms[r] = (jax_ark::gpu::proto::now_ns() - t0) / 1e6;
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    if (r != skip) threads.emplace_back(rank, r);
  for (auto& t : threads) t.join();
  print_records(g, n);
  double worst = 0;
  bool all_failed = true;
  for (int r = 0; r < n; ++r)
    if (r != skip) {
      worst = std::max(worst, took_ms[r]);
      all_failed = all_failed && ok[r] == 0;
    }
  std::printf("mode=timeout ranks=%d skip=%d all_failed=%d worst_ms=%.1f\n", n, skip,
              all_failed ? 1 : 0, worst);
  return all_failed ? 0 : 1;
}

// ---- stale: values of older calls never satisfy a newer call's waits ---------------------------
int run_stale() {
  int failures = 0;
  auto check = [&](bool cond, const char* what) {
    std::printf("check %s=%d\n", what, cond ? 1 : 0);
    if (!cond) ++failures;
  };
  // LL flags: the epochs sharing a call's scratch half (e - 2k) never share its flag, across the
  // 32-bit boundaries where a 32-bit epoch (or flag = epoch) would wrap.
  bool distinct = true;
  for (uint64_t e : {3ull, 0xFFFFFFFEull, 0xFFFFFFFFull, 0x100000000ull, 0x100000001ull,
                     0x1FFFFFFFEull, (1ull << 40) + 5})
    for (uint64_t k = 1; k <= 4096 && 2 * k < e; ++k)
      distinct = distinct && ag::ll_flag_of(e - 2 * k) != ag::ll_flag_of(e) &&
                 ag::ll_flag_of(e - 2 * k) != 0u;
  check(distinct, "ll_flags_distinct");
  // Chunked flags: every round of call e-1 is below round 0 of call e.
  check(ag::round_seq(41, static_cast<uint32_t>(ag::kMaxRoundsPerCall)) < ag::round_seq(42, 0),
        "round_seq_monotonic");

  // Through the real waits: rank 0 in call e = 5; rank 1's slot in rank 0's scratch holds a packet
  // and a flag left by call 3 (same half) and call 4.
  Group g(2, 1, 256, 256);
  const ag::CommDevice& c0 = g.comm[0];
  const uint64_t e = 5;
  g.control[0].epoch = e;
  const uint32_t half = static_cast<uint32_t>(e & 1u);
  uint64_t* slot = c0.ll_slot(c0.local, half, 1);
  jax_ark::gpu::proto::store_packet(slot + 1, 0xDEADBEEFu, ag::ll_flag_of(e - 2));
  *c0.flag(c0.local, 1, 0) = ag::round_seq(e - 1, 7);
  const ag::WaitContext w = ag::WaitContext::begin(c0, ag::kAllGather, e, 50'000'000ull);
  uint32_t data = 0;
  check(!ag::communicator_poisoned(&g.control[0]), "fresh_communicator_not_poisoned");
  check(!w.wait_packet(slot + 1, 1, data), "stale_packet_rejected");
  check(g.error[0].state == 1 && g.error[0].peer == 1 && g.error[0].rank == 0 &&
            g.error[0].epoch == e && g.error[0].waited_ns >= 50'000'000ull,
        "stale_packet_timeout_recorded");
  // What a call replayed from a CUDA graph checks instead of the FFI handler's host check.
  check(ag::communicator_poisoned(&g.control[0]), "failure_poisons_communicator");
  // A fresh context (abort cleared): the stale flag must not pass either, the current one must.
  g.control[0].abort = 0;
  g.control[0].error_claim = 0;
  std::memset(&g.error[0], 0, sizeof(ag::ErrorRecord));
  const ag::WaitContext w2 = ag::WaitContext::begin(c0, ag::kAllGather, e, 50'000'000ull);
  check(!w2.wait_flag(1, 0, ag::round_seq(e, 0)), "stale_flag_rejected");
  check(g.error[0].state == 1 && g.error[0].peer == 1, "stale_flag_timeout_recorded");
  g.control[0].abort = 0;
  const ag::WaitContext w3 = ag::WaitContext::begin(c0, ag::kAllGather, e, 50'000'000ull);
  jax_ark::gpu::proto::store_packet(slot + 1, 0x12345678u, ag::ll_flag_of(e));
  check(w3.wait_packet(slot + 1, 1, data) && data == 0x12345678u, "current_packet_accepted");
  *c0.flag(c0.local, 1, 0) = ag::round_seq(e, 0);
  check(w3.wait_flag(1, 0, ag::round_seq(e, 0)), "current_flag_accepted");
  std::printf("mode=stale failures=%d\n", failures);
  return failures == 0 ? 0 : 1;
}

// ---- persistent: worker threads walk a real plan's queues --------------------------------------
std::string op_name(const pf::PlanView& plan, int32_t op) {
  if (op < 0 || op >= plan.header().num_ops) return "";
  const pf::OpRecord& o = plan.op(op);
  if (o.name_at < 0 || o.name_len <= 0 || o.name_at + o.name_len > plan.header().names_bytes) return "";
  return std::string(plan.name_chars() + o.name_at, o.name_len);
}

int run_persistent(const char* path, uint64_t seed, int32_t drop) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail("persistent: cannot read the plan file");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<int64_t> storage((bytes.size() + 7) / 8 + 1, 0);  // 8-byte aligned words
  std::memcpy(storage.data(), bytes.data(), bytes.size());
  const auto* words = reinterpret_cast<const int32_t*>(storage.data());
  const pf::PlanView plan{words};
  const pf::Header& h = plan.header();
  if (bytes.size() < 32 * 4 || h.magic != pf::kMagic || h.total_words * 4 != static_cast<int64_t>(bytes.size()))
    return fail("persistent: not a binary plan");
  const int32_t num_tasks = h.num_tasks, workers = h.num_workers;

  std::vector<int32_t> counters(num_tasks, 0);
  std::vector<uint64_t> value(num_tasks, 0);  // plain memory: the "tile" each task writes
  std::vector<int32_t> runs(num_tasks, 0);
  uint32_t abort_word = 0;
  jax_ark::gpu::PersistentErrorRecord record{};
  const jax_ark::gpu::PersistentRunState run{&abort_word, 1u, &record,
                                             drop >= 0 ? 300'000'000ull : 20'000'000'000ull};
  // A task's tile: its id mixed with its dependencies' tiles, read as plain memory right after the
  // dependency wait (the counter's acquire is what makes them visible).
  auto tile_of = [&](int32_t t, const std::vector<uint64_t>& v) {
    uint64_t acc = mix(seed, 4, t);
    for (int32_t e = plan.dep_begin(t); e < plan.dep_end(t); ++e) acc = mix(acc, v[plan.dep(e)]);
    return acc;
  };

  auto worker = [&](int32_t wk) {
    for (int32_t q = plan.queue_begin(wk); q < plan.queue_end(wk); ++q) {
      const int32_t task = plan.queue_task(q);
      if (jax_ark::gpu::persistent_aborted(run)) return;
      pause_us(mix(seed, 5, task) % 4 == 0 ? mix(seed, 6, task) % 300 : 0);  // chaos, as on the GPU
      const jax_ark::gpu::DepWaitResult r =
          jax_ark::gpu::persistent_wait_deps(plan, num_tasks, counters.data(), task, 0, 1, run);
      if (r.status != jax_ark::gpu::DepWait::kReady) {
        if (r.status != jax_ark::gpu::DepWait::kAborted && jax_ark::gpu::persistent_raise_abort(run)) {
          jax_ark::gpu::PersistentErrorRecord rec{};
          rec.status = r.status == jax_ark::gpu::DepWait::kTimedOut ? jax_ark::gpu::kPersistentTimeout
                                                                     : jax_ark::gpu::kPersistentBadPlan;
          rec.worker = wk;
          rec.task = task;
          rec.op = plan.task(task).op;
          rec.dep_task = r.dep_task;
          rec.dep_op = r.dep_task >= 0 ? plan.task(r.dep_task).op : -1;
          rec.counter_seen = static_cast<int32_t>(r.seen);
          rec.waited_ns = r.waited_ns;
          rec.call_seq = run.seq;
          std::snprintf(rec.op_name, sizeof(rec.op_name), "%s", op_name(plan, rec.op).c_str());
          std::snprintf(rec.dep_op_name, sizeof(rec.dep_op_name), "%s",
                        op_name(plan, rec.dep_op).c_str());
          jax_ark::gpu::persistent_publish_record(run, rec);
        }
        return;
      }
      value[task] = tile_of(task, value);
      ++runs[task];
      if (task != drop) jax_ark::gpu::persistent_release_task(counters.data(), task);
    }
  };
  std::vector<std::thread> threads;
  for (int32_t w = 0; w < workers; ++w) threads.emplace_back(worker, w);
  for (auto& t : threads) t.join();

  if (record.status != jax_ark::gpu::kPersistentOk) {
    std::printf("record status=%d worker=%d task=%d op=%d op_name=%s dep_task=%d dep_op=%d "
                "dep_op_name=%s counter_seen=%d waited_ms=%.1f\n",
                record.status, record.worker, record.task, record.op, record.op_name,
                record.dep_task, record.dep_op, record.dep_op_name, record.counter_seen,
                record.waited_ns / 1e6);
  }
  // Reference: the same tiles in task order (the planner numbers tasks topologically).
  std::vector<uint64_t> want(num_tasks, 0);
  for (int32_t t = 0; t < num_tasks; ++t) want[t] = tile_of(t, want);
  int32_t wrong = 0, not_once = 0;
  for (int32_t t = 0; t < num_tasks; ++t) {
    if (runs[t] != 1) ++not_once;
    else if (value[t] != want[t]) ++wrong;
  }
  std::printf("mode=persistent workers=%d tasks=%d edges=%d wrong=%d not_run_once=%d aborted=%d\n",
              workers, num_tasks, h.num_dep_edges, wrong, not_once, abort_word >= run.seq ? 1 : 0);
  if (drop >= 0) return record.status == jax_ark::gpu::kPersistentTimeout && wrong == 0 ? 0 : 1;
  return wrong == 0 && not_once == 0 && record.status == jax_ark::gpu::kPersistentOk ? 0 : 1;
}


// ---- put: the persistent kernel's PUT protocol (persistent_comm_device.hpp) --------------------
// G ranks x W workers (blocks) run C back-to-back calls (epochs 1..C) of one "plan" of T put
// tasks, each rank over its own symmetric region, as the header describes the kernel's use: one
// thread announces the call, a sender waits once per (worker, peer, call) for the peer's entry,
// stores its tile into the peer's inbox slot with plain stores and signals (epoch, runs); the
// receiver waits for each of its slots and checks every word. Tasks inside the loop run K times
// and write slice k of a stacked inbox. What must hold: no tile is read before it arrived (a
// stale tile) and no tile of call e+1 lands while its receiver is still in call e (an early
// overwrite); both show up as a word holding another call's value. A worker is ONE thread that
// both stores and signals; on the GPU a block's threads store, meet at a barrier, and one thread
// releases (cumulativity across the block is not exercised here).
enum class PutBreak { kNone, kNoEntryWait, kEntryEpochMinus1, kNoPutWait };

struct PutTask {
  int32_t slots = 0;               // B: slots of its inbox (<= G, the signal table's width)
  int32_t words = 0;               // 32-bit words of one tile
  int32_t runs = 1;                // K inside the loop, else 1
  int32_t worker = 0;              // the worker (block) whose queue holds it, equal on every rank
  uint64_t inbox_at = 0;           // byte offset of its inbox [runs][slots][words] in the area
  std::vector<int32_t> recv_from;  // [G][B]: the rank writing slot b of rank q's inbox, -1: nobody
  const char* route = "";
};

struct PutPlan {
  int32_t ranks = 0, workers = 0;
  std::vector<PutTask> tasks;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> queue;  // per worker: (task, run)
  int64_t inbox_bytes = 0;
};

// routes: "all" = default routing only (every rank sends its tile to every rank's slot `rank`);
// "ring" = ppermutes to the next rank only, a full ring or with pairs dropped (a ring matmul, a
// pipeline): each rank waits for its neighbours only, so a stalled rank lets the ranks far from
// it run several calls ahead; "mixed" = default routing, rings of any shift and random partial
// perms. The plan is fixed by the seed; every call runs it.
PutPlan make_put_plan(int32_t g, int32_t w, int32_t num_tasks, int32_t loop_runs,
                      const std::string& routes, uint64_t seed) {
  PutPlan plan;
  plan.ranks = g;
  plan.workers = w;
  // Tasks [loop_begin, loop_end) form the body of a top-level loop of loop_runs iterations.
  const int32_t loop_begin = num_tasks / 3, loop_end = num_tasks - num_tasks / 3;
  const uint64_t worker_shift = mix(seed, 20);
  const bool neighbours = routes == "ring";
  for (int32_t t = 0; t < num_tasks; ++t) {
    const uint64_t h = mix(seed, 21, t);
    PutTask task;
    task.words = 1 + static_cast<int32_t>(h % 40);
    task.runs = (t >= loop_begin && t < loop_end) ? loop_runs : 1;
    task.worker = static_cast<int32_t>((t + worker_shift) % w);  // round robin: no idle worker
    // 0 default, 1 ring, 2 partial perm; "mixed" takes them in turn, so 3 tasks have all three.
    int32_t kind = routes == "all"    ? 0
                   : routes == "ring" ? 1 + static_cast<int32_t>((h >> 8) % 2)
                                      : static_cast<int32_t>((t + worker_shift) % 3);
    if (g == 1) kind = 0;
    if (kind == 0) {
      task.route = "default";
      task.slots = g;
      for (int32_t q = 0; q < g; ++q)
        for (int32_t b = 0; b < g; ++b) task.recv_from.push_back(b);
    } else if (kind == 1) {
      task.route = "ring";
      task.slots = 1;
      const int32_t shift = neighbours ? 1 : 1 + static_cast<int32_t>((h >> 16) % (g - 1));
      for (int32_t q = 0; q < g; ++q) task.recv_from.push_back((q - shift + g) % g);
    } else {
      // A permutation with 1..G/2 of its pairs dropped: those receivers zero-fill.
      task.route = "partial";
      task.slots = 1;
      std::vector<int32_t> perm(g);
      for (int32_t i = 0; i < g; ++i) perm[i] = neighbours ? (i + 1) % g : i;
      for (int32_t i = g - 1; i > 0 && !neighbours; --i)
        std::swap(perm[i], perm[mix(seed, 22, t, i) % (i + 1)]);
      task.recv_from.assign(g, -1);
      for (int32_t i = 0; i < g; ++i) task.recv_from[perm[i]] = i;  // perm: sender i -> perm[i]
      const int32_t dropped = 1 + static_cast<int32_t>((h >> 24) % std::max(1, g / 2));
      for (int32_t i = 0; i < dropped; ++i) task.recv_from[mix(seed, 23, t, i) % g] = -1;
    }
    task.inbox_at = static_cast<uint64_t>(plan.inbox_bytes);
    const int64_t bytes = int64_t{4} * task.runs * task.slots * task.words;
    plan.inbox_bytes += (bytes + 15) / 16 * 16;
    plan.tasks.push_back(std::move(task));
  }
  // Queue order, as the planner's loop order: tasks before the loop, the loop's iterations, the
  // tasks after it (every rank has the same queues, which the no-cycle argument relies on).
  plan.queue.resize(w);
  auto push = [&](int32_t t, int32_t k) { plan.queue[plan.tasks[t].worker].emplace_back(t, k); };
  for (int32_t t = 0; t < loop_begin; ++t) push(t, 0);
  for (int32_t k = 0; k < loop_runs; ++k)
    for (int32_t t = loop_begin; t < loop_end; ++t) push(t, k);
  for (int32_t t = loop_end; t < num_tasks; ++t) push(t, 0);
  return plan;
}

// Word i of the tile `sender` puts into slot `slot` of run `run` of task `task` in call `epoch`.
uint32_t put_word(uint64_t seed, uint64_t epoch, int32_t run, int32_t sender, int32_t task,
                  int32_t slot, int32_t i) {
  const uint64_t who = (static_cast<uint64_t>(sender) << 32) | static_cast<uint32_t>(task);
  const uint64_t where = (static_cast<uint64_t>(slot) << 32) | static_cast<uint32_t>(i);
  return static_cast<uint32_t>(mix(mix(seed, 24, epoch, static_cast<uint64_t>(run)), who, where));
}

// Everything a run of the put mode reports; counters are atomics (workers of all ranks add).
struct PutReport {
  std::atomic<uint64_t> tiles{0}, bad_tiles{0}, stale{0}, early{0}, bad_signals{0}, gave_up{0},
      bad_epochs{0};
  std::atomic<int32_t> max_lead{0};
  std::mutex m;
  std::vector<std::string> lines;  // the first messages, printed after the run

  void say(const std::string& s, bool always = false) {
    std::lock_guard<std::mutex> lock(m);
    if (always || lines.size() < 12) lines.push_back(s);
  }
};

struct PutOptions {
  int32_t calls = 1;
  uint64_t seed = 0;
  PutBreak brk = PutBreak::kNone;
  int32_t skip_rank = -1;       // this rank never starts (the timeout case)
  uint64_t timeout_ns = 20'000'000'000ull;
  bool pauses = true;
  bool device_epochs = false;  // the epoch from the rank's control word (see the usage above)
  bool retire = true;          // device_epochs: advance it at the call's end (false: a broken kernel)
};

struct PutTotals {
  uint64_t bad_tiles = 0, bad_signals = 0, gave_up = 0, bad_epochs = 0;
};

PutTotals run_put_plan(const PutPlan& plan, const PutOptions& opt, const char* mode_line) {
  const int32_t g = plan.ranks, w = plan.workers;
  const int32_t num_tasks = static_cast<int32_t>(plan.tasks.size());
  const ag::PersistentSymLayout layout =
      ag::PersistentSymLayout::of(num_tasks, g, plan.inbox_bytes);
  std::vector<std::unique_ptr<uint64_t[]>> storage;  // zeroed, as cudaMemset leaves the region
  std::vector<uint8_t*> regions;
  for (int32_t r = 0; r < g; ++r) {
    storage.emplace_back(new uint64_t[layout.total_bytes / 8]());
    regions.push_back(reinterpret_cast<uint8_t*>(storage.back().get()));
  }
  std::vector<ag::PersistentCommDevice> base(g);
  for (int32_t r = 0; r < g; ++r) {
    ag::PersistentCommDevice& c = base[r];
    c.peers = regions.data();
    c.local = regions[r];
    c.rank = r;
    c.n = g;
    c.inbox_bytes = plan.inbox_bytes;
    c.num_tasks = num_tasks;
    c.signals_offset = layout.signals_offset;
    c.inbox_offset = layout.inbox_offset;
  }
  std::vector<std::unique_ptr<Barrier>> barriers;
  for (int32_t r = 0; r < g; ++r) barriers.emplace_back(new Barrier(w));
  // Per rank, as the kernel's abort word: once one worker gave up, the rank's other workers stop
  // waiting too (and the rank runs no further call, as a failed communicator).
  std::unique_ptr<std::atomic<bool>[]> aborted(new std::atomic<bool>[g]);
  std::unique_ptr<std::atomic<int32_t>[]> entered_call(new std::atomic<int32_t>[g]);
  for (int32_t r = 0; r < g; ++r) aborted[r] = false, entered_call[r] = 0;
  std::vector<ag::RankControl> control(g, ag::RankControl{1, 0, 0, 0});  // device_epochs only
  PutReport report;
  const uint64_t seed = opt.seed;

  auto slot_words = [&](int32_t q, int32_t t, int32_t k, int32_t b) {
    const PutTask& task = plan.tasks[t];
    return reinterpret_cast<uint32_t*>(regions[q] + layout.inbox_offset + task.inbox_at) +
           (static_cast<size_t>(k) * task.slots + b) * task.words;
  };
  // Checks one received tile of call `e`; names the call whose value a wrong word holds.
  auto check_tile = [&](int32_t e, int32_t r, int32_t t, int32_t k, int32_t b, const char* when) {
    const PutTask& task = plan.tasks[t];
    const int32_t p = task.recv_from[r * task.slots + b];
    const uint32_t* got = slot_words(r, t, k, b);
    report.tiles.fetch_add(1, std::memory_order_relaxed);
    for (int32_t i = 0; i < task.words; ++i) {
      const uint32_t want = p < 0 ? 0u : put_word(seed, e, k, p, t, b, i);
      if (got[i] == want) continue;
      std::string holds = "matches no call";
      if (p >= 0 && got[i] == 0) holds = "zero: never written";
      for (int32_t d = -3; p >= 0 && d <= g + 1; ++d) {
        const int64_t other = int64_t{e} + d;
        if (d == 0 || other < 1 || got[i] != put_word(seed, other, k, p, t, b, i)) continue;
        holds = (d < 0 ? "stale: the value of call " : "early overwrite: the value of call ") +
                std::to_string(other);
        break;
      }
      (holds.rfind("early", 0) == 0 ? report.early : report.stale).fetch_add(1);
      report.bad_tiles.fetch_add(1);
      char line[384];
      std::snprintf(line, sizeof(line),
                    "bad tile (%s): call=%d rank=%d peer=%d task=%d (%s) slot=%d run=%d word=%d "
                    "got=0x%08x want=0x%08x: %s",
                    when, e, r, p, t, task.route, b, k, i, got[i], want, holds.c_str());
      report.say(line);
      return;
    }
  };

  auto worker = [&](int32_t r, int32_t wk) {
    for (int32_t call = 0; call < opt.calls && !aborted[r].load(); ++call) {
      const int32_t e = call + 1;
      ag::PersistentCommDevice c = base[r];
      c.epoch = opt.device_epochs ? ag::current_epoch(&control[r]) : static_cast<uint64_t>(e);
      if (c.epoch != static_cast<uint64_t>(e)) {
        // Every worker of every rank must read the k-th call's epoch as k, with no host count.
        report.bad_epochs.fetch_add(1);
        char line[128];
        std::snprintf(line, sizeof(line), "bad epoch: call=%d rank=%d worker=%d read=%llu", e, r,
                      wk, static_cast<unsigned long long>(c.epoch));
        report.say(line);
      }
      const uint64_t deadline = jax_ark::gpu::proto::now_ns() + opt.timeout_ns;
      auto give_up = [&] { return aborted[r].load() || jax_ark::gpu::proto::now_ns() > deadline; };
      // A wait that gave up: names this rank, the peer it waited for and what for. `deadline`:
      // this wait ran out of the call's time; `abort`: another worker of the rank gave up first.
      auto gave_up = [&](const char* wait, int32_t peer, int32_t t, int32_t b, int32_t k,
                         uint64_t seen, uint64_t started_ns) {
        const uint64_t now = jax_ark::gpu::proto::now_ns();
        aborted[r].store(true);
        report.gave_up.fetch_add(1);
        char line[320];
        std::snprintf(line, sizeof(line),
                      "gave_up call=%d rank=%d worker=%d wait=%s peer=%d task=%d slot=%d run=%d "
                      "seen_epoch=%llu seen_runs=%u waited_ms=%.1f reason=%s",
                      e, r, wk, wait, peer, t, b, k, static_cast<unsigned long long>(seen >> 32),
                      static_cast<uint32_t>(seen), (now - started_ns) / 1e6,
                      now > deadline ? "deadline" : "abort");
        report.say(line, true);
      };
      if (wk == 0) {
        // A stalled rank keeps its peers' sends to it waiting: the ranks around it in a ring
        // run ahead of it by up to their distance to it.
        const uint64_t h = mix(seed, 30, e);
        if (opt.pauses && h % 4 == 0 && static_cast<int32_t>((h >> 8) % g) == r)
          pause_us(1000 + (h >> 16) % 3000);
        ag::announce_entered(c);
        entered_call[r].store(e);
        int32_t slowest = e;
        for (int32_t q = 0; q < g; ++q)
          if (q != opt.skip_rank) slowest = std::min(slowest, entered_call[q].load());
        int32_t lead = report.max_lead.load();
        while (e - slowest > lead && !report.max_lead.compare_exchange_weak(lead, e - slowest)) {
        }
      }
      uint64_t entered_seen = 0;  // peers this worker saw entered in this call (the kernel's mask)
      for (const auto& [t, k] : plan.queue[wk]) {
        if (aborted[r].load()) break;
        const PutTask& task = plan.tasks[t];
        const uint32_t runs = static_cast<uint32_t>(k) + 1u;
        // Copy phase: my tile into every (q, b) that routes from me, peers in a rotated order.
        bool sent_all = true;
        for (int32_t j = 1; j <= g && sent_all; ++j) {
          const int32_t q = (r + j) % g;
          for (int32_t b = 0; b < task.slots; ++b) {
            if (task.recv_from[q * task.slots + b] != r) continue;
            if (!((entered_seen >> q) & 1u) && opt.brk != PutBreak::kNoEntryWait) {
              ag::PersistentCommDevice entry = c;
              if (opt.brk == PutBreak::kEntryEpochMinus1) entry.epoch = c.epoch - 1;
              uint64_t seen = 0;
              const uint64_t started = jax_ark::gpu::proto::now_ns();
              if (!ag::wait_peer_entered(entry, q, give_up, &seen)) {
                gave_up("entry", q, t, b, k, seen << 32, started);
                sent_all = false;
                break;
              }
            }
            entered_seen |= uint64_t{1} << q;
            const uint64_t h = mix(mix(seed, 31, e, r), q, t, k);
            if (opt.pauses && h % 16 == 0) pause_us((h >> 8) % 100);
            uint32_t* dst = slot_words(q, t, k, b);
            for (int32_t i = 0; i < task.words; ++i) dst[i] = put_word(seed, e, k, r, t, b, i);
            ag::signal_put(c, q, t, b, runs);
          }
        }
        if (!sent_all) break;
        // Wait phase: each of my slots from its sender (or zero-filled: nobody writes it).
        for (int32_t b = 0; b < task.slots; ++b) {
          const int32_t p = task.recv_from[r * task.slots + b];
          if (p < 0) {
            std::memset(slot_words(r, t, k, b), 0, 4 * static_cast<size_t>(task.words));
          } else if (opt.brk != PutBreak::kNoPutWait) {
            uint64_t seen = 0;
            const uint64_t started = jax_ark::gpu::proto::now_ns();
            if (!ag::wait_put(c, t, b, runs, give_up, &seen)) {
              gave_up("put", p, t, b, k, seen, started);
              break;
            }
          }
          const uint64_t h = mix(mix(seed, 32, e, r), b, t, k);
          if (opt.pauses && h % 16 == 0) pause_us((h >> 8) % 200);
          check_tile(e, r, t, k, b, "after its wait");
        }
      }
      // The kernel's last statement on XLA's path: the rank's last worker done advances the epoch.
      if (opt.device_epochs && opt.retire)
        ag::retire_block(&control[r], static_cast<uint32_t>(w), c.epoch);
      barriers[r]->wait();  // the kernel's end: every block of the rank is done with call e
      if (wk == 0 && !aborted[r].load()) {
        // Until the rank announces call e + 1, nothing of call e + 1 may have landed: every slot
        // still holds call e's tile, every signal call e's final value. A pause here leaves the
        // peers all the time they need to break that, if the entry wait let them.
        const uint64_t h = mix(seed, 33, e, r);
        if (opt.pauses && h % 8 == 0) pause_us((h >> 8) % 1000);
        for (int32_t t = 0; t < num_tasks; ++t) {
          const PutTask& task = plan.tasks[t];
          for (int32_t k = 0; k < task.runs; ++k)
            for (int32_t b = 0; b < task.slots; ++b) check_tile(e, r, t, k, b, "at the call's end");
          for (int32_t b = 0; b < task.slots; ++b) {
            const bool written = task.recv_from[r * task.slots + b] >= 0;
            const uint64_t want =
                written ? ag::put_signal_value(c.epoch, static_cast<uint32_t>(task.runs)) : 0;
            const uint64_t got = *ag::put_signal_word(c, c.local, t, b);
            if (got == want) continue;
            report.bad_signals.fetch_add(1);
            char line[256];
            std::snprintf(line, sizeof(line),
                          "bad signal: call=%d rank=%d task=%d slot=%d got=(%llu, %u) "
                          "want=(%llu, %u)",
                          e, r, t, b, static_cast<unsigned long long>(got >> 32),
                          static_cast<uint32_t>(got), static_cast<unsigned long long>(want >> 32),
                          static_cast<uint32_t>(want));
            report.say(line);
          }
        }
      }
      barriers[r]->wait();  // the end-of-call check done before the next call's announce
    }
  };
  std::vector<std::thread> threads;
  for (int32_t r = 0; r < g; ++r)
    if (r != opt.skip_rank)
      for (int32_t wk = 0; wk < w; ++wk) threads.emplace_back(worker, r, wk);
  for (auto& th : threads) th.join();
  for (const std::string& s : report.lines) std::printf("%s\n", s.c_str());
  // Every (rank, call, task, run, slot) tile is checked twice: after its wait, at the call's end.
  int32_t loop_tasks = 0, kinds[3] = {0, 0, 0}, zero_filled = 0;
  uint64_t want_tiles = 0;
  for (const PutTask& t : plan.tasks) {
    loop_tasks += t.runs > 1;
    ++kinds[t.route[0] == 'd' ? 0 : t.route[0] == 'r' ? 1 : 2];
    for (int32_t from : t.recv_from) zero_filled += from < 0;
    const uint64_t ranks_run = static_cast<uint64_t>(g - (opt.skip_rank >= 0 ? 1 : 0));
    want_tiles += 2ull * static_cast<uint64_t>(t.runs * t.slots) * ranks_run * opt.calls;
  }
  std::printf("%s tasks=%d default=%d ring=%d partial=%d zero_filled_slots=%d loop_tasks=%d "
              "tiles=%llu want_tiles=%llu bad_tiles=%llu stale=%llu early=%llu bad_signals=%llu "
              "gave_up=%llu max_lead=%d bad_epochs=%llu\n",
              mode_line, num_tasks, kinds[0], kinds[1], kinds[2], zero_filled, loop_tasks,
              static_cast<unsigned long long>(report.tiles.load()),
              static_cast<unsigned long long>(want_tiles),
              static_cast<unsigned long long>(report.bad_tiles.load()),
              static_cast<unsigned long long>(report.stale.load()),
              static_cast<unsigned long long>(report.early.load()),
              static_cast<unsigned long long>(report.bad_signals.load()),
              static_cast<unsigned long long>(report.gave_up.load()), report.max_lead.load(),
              static_cast<unsigned long long>(report.bad_epochs.load()));
  return PutTotals{report.bad_tiles.load(), report.bad_signals.load(), report.gave_up.load(),
                   report.bad_epochs.load()};
}

int run_put(int g, int w, int calls, int num_tasks, int loop_runs, uint64_t seed,
            const std::string& routes, const std::string& brk, const std::string& epochs) {
  const PutBreak b = brk == "none"                  ? PutBreak::kNone
                     : brk == "no_entry_wait"       ? PutBreak::kNoEntryWait
                     : brk == "entry_epoch_minus_1" ? PutBreak::kEntryEpochMinus1
                     : brk == "no_put_wait"         ? PutBreak::kNoPutWait
                                                    : static_cast<PutBreak>(-1);
  if (g < 1 || g > ag::kPersistentMaxGroup || w < 1 || w > 64 || calls < 1 || num_tasks < 1 ||
      loop_runs < 1 || (routes != "all" && routes != "ring" && routes != "mixed") ||
      static_cast<int>(b) < 0 ||
      (epochs != "host" && epochs != "device" && epochs != "device_unretired"))
    return fail("put G W CALLS TASKS LOOP_RUNS SEED [all|ring|mixed "
                "[none|no_entry_wait|entry_epoch_minus_1|no_put_wait "
                "[host|device|device_unretired]]]");
  const PutPlan plan = make_put_plan(g, w, num_tasks, loop_runs, routes, seed);
  PutOptions opt;
  opt.calls = calls;
  opt.seed = seed;
  opt.brk = b;
  opt.device_epochs = epochs != "host";
  opt.retire = epochs != "device_unretired";
  char line[256];
  std::snprintf(line, sizeof(line),
                "mode=put ranks=%d workers=%d calls=%d runs=%d routes=%s break=%s epochs=%s", g, w,
                calls, loop_runs, routes.c_str(), brk.c_str(), epochs.c_str());
  const PutTotals r = run_put_plan(plan, opt, line);
  return r.bad_tiles == 0 && r.bad_signals == 0 && r.gave_up == 0 && r.bad_epochs == 0 ? 0 : 1;
}

// Rank SKIP never starts its call: every other rank's entry wait for it gives up at the deadline,
// naming itself and SKIP; exit 0 iff that happened and nothing else failed.
int run_put_timeout(int g, int skip) {
  if (g < 2 || g > ag::kPersistentMaxGroup || skip < 0 || skip >= g)
    return fail("put_timeout G SKIP");
  const PutPlan plan = make_put_plan(g, 2, 2, 1, "all", 1);
  PutOptions opt;
  opt.calls = 1;
  opt.seed = 1;
  opt.skip_rank = skip;
  opt.timeout_ns = 200'000'000ull;
  opt.pauses = false;
  char line[128];
  std::snprintf(line, sizeof(line), "mode=put_timeout ranks=%d skip=%d", g, skip);
  const uint64_t t0 = jax_ark::gpu::proto::now_ns();
  const PutTotals r = run_put_plan(plan, opt, line);
  std::printf("elapsed_ms=%.1f\n", (jax_ark::gpu::proto::now_ns() - t0) / 1e6);
  return r.bad_tiles == 0 && r.bad_signals == 0 && r.gave_up > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return fail("mode");
  const std::string mode = argv[1];
  auto arg = [&](int i) { return i < argc ? std::strtoll(argv[i], nullptr, 10) : -1; };
  if (mode == "ll" && argc == 6)
    return run_ll(static_cast<int>(arg(2)), static_cast<int>(arg(3)), static_cast<int>(arg(4)),
                  static_cast<uint64_t>(arg(5)));
  if (mode == "pingpong" && argc == 6)
    return run_pingpong(static_cast<int>(arg(2)), static_cast<int>(arg(3)),
                        static_cast<int>(arg(4)), static_cast<uint64_t>(arg(5)));
  if (mode == "timeout" && argc == 4) return run_timeout(static_cast<int>(arg(2)), static_cast<int>(arg(3)));
  if (mode == "stale" && argc == 2) return run_stale();
  if (mode == "persistent" && (argc == 4 || argc == 5))
    return run_persistent(argv[2], static_cast<uint64_t>(arg(3)),
                          argc == 5 ? static_cast<int32_t>(arg(4)) : -1);
  if (mode == "put" && argc >= 8 && argc <= 11)
    return run_put(static_cast<int>(arg(2)), static_cast<int>(arg(3)), static_cast<int>(arg(4)),
                   static_cast<int>(arg(5)), static_cast<int>(arg(6)),
                   static_cast<uint64_t>(arg(7)), argc >= 9 ? argv[8] : "mixed",
                   argc >= 10 ? argv[9] : "none", argc >= 11 ? argv[10] : "host");
  if (mode == "put_timeout" && argc == 4)
    return run_put_timeout(static_cast<int>(arg(2)), static_cast<int>(arg(3)));
  return fail("unknown mode or argument count");
}
