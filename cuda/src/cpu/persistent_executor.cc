// CPU executor of persistent-kernel plans. See persistent_executor.hpp and docs/plan_format.md.
//
// Math order follows the plan format exactly (k / r ascending, float32, every product and sum
// rounded: CMakeLists.txt compiles this file with -ffp-contract=off), so results do not depend on
// timing or on which worker ran a tile. The matmul kernels (persistent_kernels.hpp) vectorize
// across output columns only; program loops have their opcode / dtype dispatch hoisted out.
#include "persistent_executor.hpp"

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "host_communicator.hpp"
#include "jax_ark/tile_ops.hpp"
#include "persistent_fusion.hpp"
#include "persistent_kernels.hpp"


namespace jax_ark::cpu {
namespace {

using namespace jax_ark::plan;
using Clock = std::chrono::steady_clock;

constexpr int kSegment = 256;  // elements a program evaluates per pass (registers are float[64][256])
constexpr int64_t kSpinMicros = 200;    // a dependency wait spins / yields this long, then sleeps
constexpr int64_t kSleepMicros = 1000;  // longest single sleep (deadline / failure checks between)

// ---- worker threads: one process-wide bank of parked threads ---------------------------------------
// A call borrows num_workers - 1 threads for its whole duration and gives them back. Its workers
// spin-wait on each other, so they must all run at once: a call never queues work on threads
// another call could hold (the starvation trap in shared/DESIGN.md), it owns its borrowed threads.
// At most kMaxIdleThreads stay parked for later calls (any device's), the rest exit when returned,
// so one call with 1000 workers does not leave 1000 threads behind. A thread that cannot be
// started (address-space or process limits) fails the call instead of hanging it.
constexpr size_t kMaxIdleThreads = 128;
// A helper polls for its next call this long after each call before it parks on its condition
// variable: back-to-back calls (a decode step, a training loop) then start it with one store
// instead of a futex wake, whose latency (tens of microseconds on a VM, measured) is more than a
// small plan's whole run. The caller likewise polls for its helpers' end before it sleeps.
constexpr int64_t kHelperPollMicros = 300;
constexpr int64_t kCallerPollMicros = 200;

// Polls `ready()`, yielding between looks, for at most `micros`; whether it became true.
template <typename Ready>
bool yield_until(Ready ready, int64_t micros) {
  const auto until = Clock::now() + std::chrono::microseconds(micros);
  for (;;) {
    if (ready()) return true;
    if (Clock::now() >= until) return false;
    std::this_thread::yield();
  }
}

// What a borrowed thread runs: job(index), then it counts itself done.
struct CallState {
  const std::function<void(int)>* job = nullptr;
  // The caller's floating-point environment (XLA's threads flush denormals): every worker uses it,
  // so a tile's result never depends on which thread ran it.
  std::fenv_t fp_env;
  std::mutex mu;
  std::condition_variable done_cv;
  std::atomic<int> remaining{0};  // changed under `mu`, so the caller can leave once it holds `mu`
};

class Helper {
 public:
  Helper() { thread_ = std::thread([this] { loop(); }); }  // throws std::system_error
  ~Helper() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void start(CallState* call, int index) {
    index_ = index;
    call_.store(call, std::memory_order_seq_cst);
    // Dekker pair with loop(): it publishes `parked_` before its last look at `call_`, we publish
    // `call_` before looking at `parked_`, so one of us sees the other and no start is lost.
    if (parked_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }

 private:
  // The next call: polled for kHelperPollMicros, then awaited parked.
  CallState* next_call() {
    CallState* c = nullptr;
    const auto take = [&] {
      return (c = call_.exchange(nullptr, std::memory_order_acquire)) != nullptr;
    };
    if (yield_until(take, kHelperPollMicros)) return c;
    std::unique_lock<std::mutex> lock(mu_);
    parked_.store(true, std::memory_order_seq_cst);
    cv_.wait(lock, [&] {
      return stop_ || (c = call_.exchange(nullptr, std::memory_order_seq_cst)) != nullptr;
    });
    parked_.store(false, std::memory_order_relaxed);
    return c;
  }

  void loop() {
    for (;;) {
      CallState* call = next_call();
      if (call == nullptr) return;
      const int index = index_;
      std::fenv_t own;
      std::fegetenv(&own);
      std::fesetenv(&call->fp_env);
      (*call->job)(index);  // never throws: worker_main turns exceptions into a failed run
      std::fesetenv(&own);
      std::lock_guard<std::mutex> lock(call->mu);  // the last touch of *call (the caller's)
      if (call->remaining.fetch_sub(1, std::memory_order_release) == 1) call->done_cv.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<CallState*> call_{nullptr};
  std::atomic<bool> parked_{false};
  int index_ = 0;  // written before call_ is published, read after it is taken
  bool stop_ = false;
  std::thread thread_;  // last: started after the members it uses exist
};

class ThreadBank {
 public:
  // Appends n started helpers to *out, or returns them all and says why not.
  std::string borrow(int n, std::vector<std::unique_ptr<Helper>>* out) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(out->size()) < n && !idle_.empty()) {
        out->push_back(std::move(idle_.back()));
        idle_.pop_back();
      }
    }
    try {
      while (static_cast<int>(out->size()) < n) out->push_back(std::make_unique<Helper>());
    } catch (const std::exception& e) {
      const size_t got = out->size();
      give_back(out);
      return "ark_persistent: could not start " + std::to_string(n) + " worker threads (" +
             std::to_string(got) + " started): " + e.what() + "; use fewer num_workers";
    }
    return "";
  }
  void give_back(std::vector<std::unique_ptr<Helper>>* helpers) {
    std::vector<std::unique_ptr<Helper>> excess;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& h : *helpers) (idle_.size() < kMaxIdleThreads ? idle_ : excess).push_back(std::move(h));
    }
    helpers->clear();
    excess.clear();  // joins those threads, outside the lock
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Helper>> idle_;
};

// Never destroyed: parked threads must not be joined by static destructors at exit.
ThreadBank& thread_bank() {
  static ThreadBank* bank = new ThreadBank;
  return *bank;
}

// Runs job(w) for w in [0, workers), w = 0 on the caller; "" or why the threads could not start.
std::string run_on_workers(int workers, const std::function<void(int)>& job) {
  if (workers == 1) {
    job(0);
    return "";
  }
  std::vector<std::unique_ptr<Helper>> helpers;
  if (std::string err = thread_bank().borrow(workers - 1, &helpers); !err.empty()) return err;
  CallState call;
  call.job = &job;
  std::fegetenv(&call.fp_env);
  call.remaining = workers - 1;
  for (int i = 0; i < workers - 1; ++i) helpers[i]->start(&call, i + 1);
  job(0);
  // Helpers usually finish within microseconds of the caller (kHelperPollMicros says why poll).
  const auto helpers_done = [&] { return call.remaining.load(std::memory_order_acquire) == 0; };
  yield_until(helpers_done, kCallerPollMicros);
  {
    // Also after the poll saw 0: the last helper may still hold `mu` (its notify).
    std::unique_lock<std::mutex> lock(call.mu);
    call.done_cv.wait(lock, helpers_done);
  }
  thread_bank().give_back(&helpers);
  return "";
}

// ---- chaos: an adversarial test mode (chaos_seed != 0) ------------------------------------------------
// A missing dependency d -> t is a race: the result is wrong only if t runs before d, which normal
// timing almost never does. Chaos mode runs the whole plan kChaosRuns times in different adversarial
// orders, with the workspace and outputs poisoned with NaN bytes before each (so stale values of an
// earlier run cannot hide a race), and fails the call if two runs' outputs differ: the executor's
// math never depends on the order, so any difference is a race. The adversaries:
//  * targeted (most runs): tasks run one at a time; a random permutation of the tasks that have
//    dependencies is demanded in turn, each run as early as its listed dependencies and queue order
//    allow (only its ancestors before it; among them the highest id or a random one first), so a
//    consumer with a missing producer tends to run before that producer. One run catches a given
//    missing edge with probability about 1 / (1 + the producer's other consumers): hence 12 runs;
//  * reversed: one at a time, the ready task with the highest id first (consumers early);
//  * stalls: workers run concurrently, each starting after a random per-worker delay, with random
//    long stalls (up to ~3 ms) before half of the tasks.
constexpr int kChaosRuns = 12;
constexpr size_t kChaosMaxTargets = 256;  // demanded tasks per run (the rest: any ready order)

uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Chaos {
  enum Mode { kTargeted, kReversed, kStalls };
  Chaos(const PlanView& p, uint64_t seed, int run_index)
      : rng(mix64(seed * kChaosRuns + run_index)),
        cursors(p.header().num_workers),
        start_delay_us(p.header().num_workers) {
    const Header& h = p.header();
    for (int w = 0; w < h.num_workers; ++w) cursors[w].start(p, LoopView{p.words}, w);
    mode = run_index == 2 ? kReversed : (run_index == 4 ? kStalls : kTargeted);
    highest_first = run_index % 2;
    std::vector<int> rank(h.num_workers);
    for (int w = 0; w < h.num_workers; ++w) rank[w] = w;
    for (int w = h.num_workers - 1; w > 0; --w) std::swap(rank[w], rank[next() % (w + 1)]);
    for (int w = 0; w < h.num_workers; ++w) start_delay_us[w] = rank[w] * (500 + next() % 1500);
    if (mode != kTargeted) return;
    done.assign(h.num_tasks, 0);
    in_closure.assign(h.num_tasks, 0);
    queue_prev.assign(h.num_tasks, -1);
    for (int w = 0; w < h.num_workers; ++w)
      for (int q = p.queue_begin(w) + 1; q < p.queue_end(w); ++q) queue_prev[p.queue_task(q)] = p.queue_task(q - 1);
    for (int t = 0; t < h.num_tasks; ++t)
      if (p.dep_end(t) > p.dep_begin(t)) targets.push_back(t);
    for (size_t i = targets.size(); i > 1; --i) std::swap(targets[i - 1], targets[next() % i]);
    if (targets.size() > kChaosMaxTargets) targets.resize(kChaosMaxTargets);
  }
  uint64_t next() { return rng = mix64(rng); }
  // kStalls: 0 for half of the tasks, else 50 us * 2^(0..6).
  int64_t stall_us(uint64_t& worker_rng) {
    worker_rng = mix64(worker_rng);
    return (worker_rng & 1) ? 0 : int64_t{50} << ((worker_rng >> 1) % 7);
  }
  // kTargeted: marks the ancestors (listed dependencies and queue predecessors) of the first
  // demanded task not yet done.
  void retarget(const PlanView& p) {
    while (next_target < targets.size() && done[targets[next_target]]) ++next_target;
    if (next_target == closure_of) return;
    closure_of = next_target;
    std::fill(in_closure.begin(), in_closure.end(), 0);
    if (next_target == targets.size()) return;
    std::vector<int32_t> stack{targets[next_target]};
    while (!stack.empty()) {
      const int32_t x = stack.back();
      stack.pop_back();
      if (in_closure[x] || done[x]) continue;
      in_closure[x] = 1;
      for (int e = p.dep_begin(x); e < p.dep_end(x); ++e) stack.push_back(p.dep(e));
      if (queue_prev[x] >= 0) stack.push_back(queue_prev[x]);
    }
  }

  Mode mode;
  uint64_t rng;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<QueueCursor> cursors;    // serialized modes: each worker's next task and iteration
  std::vector<int64_t> start_delay_us; // stalls mode
  int granted = -1;                    // serialized modes: the worker allowed to run next
  bool busy = false;                   // a granted task has not finished yet
  std::vector<int32_t> targets, queue_prev;
  std::vector<char> done, in_closure;
  size_t next_target = 0, closure_of = SIZE_MAX;
  bool highest_first = false;  // kTargeted: inside the closure, highest task id first (else random)
};

// ---- the run ----------------------------------------------------------------------------------------
struct Run {
  Run(PlanView p, const PersistentBuffers& b, const PersistentOptions& o)
      : plan(p), loops{p.words}, buf(b), opt(o), t0(Clock::now()) {}
  PlanView plan;
  LoopView loops;  // v3: empty for plans without loops
  const PersistentBuffers& buf;
  const PersistentOptions& opt;
  Clock::time_point t0;
  std::atomic<bool> failed{false};
  // Blocking waits (see wait_for): a waiter that has spun long enough registers in `sleepers` and
  // sleeps on `epoch`; whoever sets a counter while someone sleeps bumps `epoch` and wakes them.
  std::atomic<uint32_t> epoch{0};
  std::atomic<int> sleepers{0};
  std::mutex error_mu;
  PersistentResult error;
  std::unique_ptr<Chaos> chaos;  // test mode only
  // v3 communication: the group's symmetric regions for this run (persistent_region.hpp), in
  // the GPU protocol's view (n == 0 without a group), and the peers known to have opened their
  // region for this run (their entered word reached comm.epoch), by rank.
  gpu::PersistentCommDevice comm;
  std::unique_ptr<std::atomic<uint8_t>[]> peer_open;
  // Eager sends (send_ready_puts): the put tasks in which this rank sends (by their routing), in
  // task order, and per task its send's state (kUnsent, kSending, kSent). Empty in chaos mode
  // and for plans with loops (a send is then made at the task's turn only).
  std::vector<int32_t> own_puts;
  std::unique_ptr<std::atomic<uint8_t>[]> put_claimed;
  // Per absolute instruction, 1 where a gelu_tanh sequence starts (find_fused_gelu); empty when
  // the plan has none.
  std::vector<uint8_t> gelu_at;
  // Puts read in place (docs/plan_format.md, "Puts read in place"; find_read_in_place): per
  // tensor, the index in `in_place` of the put whose inbox it is (-1: none), and per slot of that
  // inbox where its element (b, 0, 0) lies: in the source rank's region, at its source row.
  // Ops writing a read-in-place source first wait until every peer reading it has opened its
  // region for this call (`shared_writer`), i.e. ended the call that read its previous value.
  struct InPlaceInbox {
    int64_t slot_elems = 0;
    std::vector<const char*> slot_base;
  };
  std::vector<int32_t> in_place_of;
  std::vector<InPlaceInbox> in_place;
  std::vector<uint8_t> shared_writer;
  std::vector<int32_t> shared_readers;  // the peers reading any read-in-place source of this rank
  // Chaos mode: per op, whether its read-in-place source was poisoned in this run (poison_source).
  std::unique_ptr<std::atomic<uint8_t>[]> source_poisoned;

  std::string op_name(int op) const {
    const OpRecord& o = plan.op(op);
    return "op " + std::to_string(op) + " '" + std::string(plan.name_chars() + o.name_at, o.name_len) + "'";
  }

  void fail(PersistentStatus status, const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!failed.load()) {
        error.status = status;
        error.message = message;
        failed.store(true);
      }
    }
    wake_sleepers();
    if (chaos) {
      std::lock_guard<std::mutex> lock(chaos->mu);
      chaos->cv.notify_all();
    }
  }

  // Called after a counter store (or a failure): wakes every sleeping waiter so it rechecks.
  void wake_sleepers() {
    std::atomic_thread_fence(std::memory_order_seq_cst);  // order the counter store before the load
    if (sleepers.load(std::memory_order_seq_cst) == 0) return;
    epoch.fetch_add(1, std::memory_order_seq_cst);
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
            nullptr, 0);
#endif
  }

  // Sleeps until wake_sleepers() runs after `seen` was read from epoch, or for at most max_us.
  void sleep_on_epoch(uint32_t seen, int64_t max_us) {
#ifdef __linux__
    timespec ts{static_cast<time_t>(max_us / 1000000), static_cast<long>((max_us % 1000000) * 1000)};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
#else
    (void)seen;
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(max_us, 50)));
#endif
  }

  // View v as iteration `iter` of its reader's loop (and `outer_iter` of the loop around that
  // one) sees it (v3: an xs slice moves per iteration, backwards for scan(reverse=True)).
  ViewRecord view(int v, int64_t iter, int64_t outer_iter) const {
    ViewRecord r = plan.view(v);
    r.offset += loops.view_shift(v, iter, outer_iter);
    return r;
  }

  char* tensor_base(int t) const {
    const TensorRecord& r = plan.tensor(t);
    switch (r.storage) {
      case kStorageArg: return static_cast<char*>(buf.args[r.storage_index]);
      case kStorageResult: return static_cast<char*>(buf.results[r.storage_index]);
      default:
        // The inboxes, placed first in the workspace, live in the group's region.
        if (r.byte_offset < comm.inbox_bytes)
          return reinterpret_cast<char*>(gpu::inbox_area(comm, comm.local)) + r.byte_offset;
        return reinterpret_cast<char*>(buf.workspace) + r.byte_offset;
    }
  }

  // steady_clock's own origin, not the run's start: the ranks of a group (devices of one
  // process) then share one clock, so their timelines line up.
  int64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }
};

struct Scratch {
  int64_t iter = 0;        // the innermost loop iteration of the task being run (0 outside loops)
  int64_t outer_iter = 0;  // the iteration of the loop around that one (0 unless nested)
  bool stacked = false;    // its op writes slice `slice` of a stacked output
  int64_t slice = 0;
  float regs[kMaxProgramLen][kSegment];
  // Where register i's values are after eval_program: regs[i], or (read-only) the accumulator a
  // LOAD_ACC names, or a constant's row of const_rows. Readers go through reg[], never regs[].
  const float* reg[kMaxProgramLen] = {};
  // Constants broadcast once per worker and kept (value bits, dtype), not refilled on every
  // evaluation: a gelu epilogue's four CONSTs were refilled for every 256 elements (perf, 64x256 @
  // 256x1024 gelu on one core: the fill loop was half of eval_program's time).
  // A full pool replaces, round robin, a row the current evaluation does not read.
  static constexpr int kConstRows = 16;
  float const_rows[kConstRows][kSegment];
  uint64_t const_key[kConstRows] = {};   // (dtype, value bits) + 1; 0: empty
  uint64_t const_used[kConstRows] = {};  // the evaluation (eval_seq) that last read the row
  uint64_t eval_seq = 0;
  int const_victim = 0;
  std::vector<float> acc, a_row, b_tile, pro;
  std::vector<ReduceAcc> states;  // a column fold's (value, index) per output (arg kinds)
};

// ---- program evaluation -----------------------------------------------------------------------------
// Every loop below has its opcode / dtype switch hoisted out, so each is a straight loop over the
// segment that the compiler can vectorize (or at least run without per-element dispatch). The
// per-element math is exactly tile_ops.hpp's (apply_unary / apply_binary with a constant opcode
// fold to the same expression; libm calls stay scalar libm calls).

// The element loops below are built for AVX-512 and AVX2 besides the baseline (x86-64's SSE2: 4
// lanes), picked once at load time. Each clone does the same IEEE operations in the same order (no
// FMA: CMakeLists.txt compiles this file with -ffp-contract=off; libm calls stay scalar libm
// calls), so every CPU computes the same bits, up to 16 lanes where it has them: a gelu epilogue
// was 14% of a tensor-parallel MLP's CPU time with 4 lanes (perf, 2026-12-07). -fno-trapping-math
// (also CMakeLists.txt) lets GCC turn the selects into blends; without it it vectorizes nothing.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ARK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define ARK_INLINE_LOOP __attribute__((always_inline)) inline
#else
#define ARK_SIMD_CLONES
#define ARK_INLINE_LOOP inline
#endif

// bf16 round trip (= bf16_to_f32(f32_to_bf16(v)), bit for bit) written as selects so it vectorizes.
inline uint32_t bf16_bits_rne(uint32_t u) {
  const uint32_t nan = (u | 0x00400000u) & 0xFFFF0000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
}

ARK_SIMD_CLONES void round_in_place(float* r, int count, int32_t dt) {
  switch (dt) {
    case kF32:
    case kInt32:
    case kUInt32: break;  // integer registers hold bits: nothing to round
    case kBF16:
      for (int e = 0; e < count; ++e) r[e] = bits_float(bf16_bits_rne(float_bits(r[e])));
      break;
    case kBool:
      for (int e = 0; e < count; ++e) r[e] = r[e] != 0.0f ? 1.0f : 0.0f;
      break;
    default:
      for (int e = 0; e < count; ++e) r[e] = round_to(r[e], dt);
  }
}

template <int32_t kCode>
ARK_INLINE_LOOP void unary_loop(float* r, const float* x, int count, int32_t imm) {
  for (int e = 0; e < count; ++e) r[e] = apply_unary(kCode, x[e], imm);
}
template <int32_t kCode>
ARK_INLINE_LOOP void binary_loop(float* r, const float* x, const float* y, int count) {
  for (int e = 0; e < count; ++e) r[e] = apply_binary(kCode, x[e], y[e]);
}

// tanh without a libm call per element, so the loop vectorizes (gelu's tanhf was a fifth of the
// sequence-parallel MLP's CPU time): |x| < 0.625 an odd minimax polynomial, above
// 1 - 2 / (e^2|x| + 1) with e^y by range reduction (y = n ln2 + r) and a degree-6 polynomial,
// sign restored last.
// Within 2 float32 ulps of libm's tanhf (the plan format allows executors faster transcendental
// functions within a few ulps); exact at 0, +-0 keeps its sign, NaN passes through, |x| >= 10
// gives +-1 as tanhf does.
inline float tanh_approx(float x) {
  const float a = fabsf(x);
  const float z = a * a;
  float small = -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * a + a;
  const float y = 2.0f * (a < 10.0f ? a : 10.0f);  // e^20: 2 / (e + 1) vanishes next to 1; NaN too
  const float n = (y * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float large = 1.0f - 2.0f / (p * scale + 1.0f);
  const float t = a < 0.625f ? small : large;
  return x != x ? x : std::copysign(t, x);
}

ARK_SIMD_CLONES void tanh_loop(float* __restrict r, const float* __restrict x, int count) {
  for (int e = 0; e < count; ++e) r[e] = tanh_approx(x[e]);
}

// The eight instructions of jax.nn.gelu's tanh form (gelu_tanh_at) in one pass: each element gets
// the same float32 operations in the same order, so the same bits.
ARK_SIMD_CLONES void gelu_tanh_loop(float* __restrict r, const float* __restrict x, float c1, float c2,
                                    float one, float half, int count) {
  for (int e = 0; e < count; ++e) {
    const float v = x[e];
    r[e] = v * (half * (one + tanh_approx(c2 * (v + c1 * (v * v * v)))));
  }
}

ARK_SIMD_CLONES void eval_unary(int32_t code, float* r, const float* x, int count, int32_t imm) {
  switch (code) {
    case kTanh:
      if (r == x) {  // in place (a register reused): through a copy, the loop's operands are restrict
        float copy[kSegment];
        std::memcpy(copy, x, sizeof(float) * count);
        tanh_loop(r, copy, count);
      } else {
        tanh_loop(r, x, count);
      }
      return;
#define ARK_UNARY(C) \
  case C: unary_loop<C>(r, x, count, imm); break;
    ARK_UNARY(kNeg) ARK_UNARY(kExp) ARK_UNARY(kLog) ARK_UNARY(kLogistic)
    ARK_UNARY(kSqrt) ARK_UNARY(kRsqrt) ARK_UNARY(kErf) ARK_UNARY(kAbs) ARK_UNARY(kSin)
    ARK_UNARY(kCos) ARK_UNARY(kLog1p) ARK_UNARY(kExpm1) ARK_UNARY(kSquare) ARK_UNARY(kSign)
    ARK_UNARY(kCopy)
#undef ARK_UNARY
    case kIntegerPow:
      if (imm == 2) {
        unary_loop<kSquare>(r, x, count, imm);  // x^2 = x * x: the same single multiplication
      } else if (imm == 3) {
        for (int e = 0; e < count; ++e) r[e] = x[e] * x[e] * x[e];  // (x * x) * x, left to right
      } else {
        unary_loop<kIntegerPow>(r, x, count, imm);
      }
      break;
    default:
      for (int e = 0; e < count; ++e) r[e] = apply_unary(code, x[e], imm);
  }
}

ARK_SIMD_CLONES void eval_binary(int32_t code, float* r, const float* x, const float* y, int count) {
  switch (code) {
#define ARK_BINARY(C) \
  case C: binary_loop<C>(r, x, y, count); break;
    ARK_BINARY(kAdd) ARK_BINARY(kSub) ARK_BINARY(kMul) ARK_BINARY(kDiv) ARK_BINARY(kMax)
    ARK_BINARY(kMin) ARK_BINARY(kPow) ARK_BINARY(kEq) ARK_BINARY(kNe) ARK_BINARY(kLt)
    ARK_BINARY(kLe) ARK_BINARY(kGt) ARK_BINARY(kGe)
#undef ARK_BINARY
    default:
      for (int e = 0; e < count; ++e) r[e] = apply_binary(code, x[e], y[e]);
  }
}

// Integer registers share the float register file (plan_format.hpp: a register is 32 bits); these
// loops view it through a may_alias type so the compiler cannot assume float and uint32 stores
// to the same register never overlap.
typedef uint32_t bits_alias __attribute__((may_alias));

template <int32_t kCode>
ARK_INLINE_LOOP void int_binary_loop(bits_alias* r, const bits_alias* x, const bits_alias* y, int count) {
  for (int e = 0; e < count; ++e) r[e] = apply_int_binary(kCode, x[e], y[e]);
}

ARK_SIMD_CLONES void eval_int_binary(int32_t code, float* r, const float* x, const float* y, int count) {
  bits_alias* rb = reinterpret_cast<bits_alias*>(r);
  const bits_alias* xb = reinterpret_cast<const bits_alias*>(x);
  const bits_alias* yb = reinterpret_cast<const bits_alias*>(y);
  switch (code) {
#define ARK_IBINARY(C) \
  case C: int_binary_loop<C>(rb, xb, yb, count); break;
    ARK_IBINARY(kIAdd) ARK_IBINARY(kISub) ARK_IBINARY(kIMul) ARK_IBINARY(kAnd) ARK_IBINARY(kOr)
    ARK_IBINARY(kXor) ARK_IBINARY(kIMax) ARK_IBINARY(kIMin) ARK_IBINARY(kIEq) ARK_IBINARY(kILt)
#undef ARK_IBINARY
    default:
      for (int e = 0; e < count; ++e) rb[e] = apply_int_binary(code, xb[e], yb[e]);
  }
}

void eval_int_unary(int32_t code, float* r, const float* x, int count, int32_t imm) {
  bits_alias* rb = reinterpret_cast<bits_alias*>(r);
  const bits_alias* xb = reinterpret_cast<const bits_alias*>(x);
  for (int e = 0; e < count; ++e) rb[e] = apply_int_unary(code, xb[e], imm);
}

// r[j] = f32(src[j * stride]) for j < n, the dtype switch outside the loop.
void load_run(float* r, const char* base, int32_t dt, int64_t off, int64_t stride, int n) {
  switch (dt) {
    case kF32: {
      const float* p = reinterpret_cast<const float*>(base) + off;
      if (stride == 1) {
        memcpy(r, p, sizeof(float) * n);
      } else {
        for (int j = 0; j < n; ++j) r[j] = p[j * stride];
      }
      break;
    }
    case kBF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base) + off;
      for (int j = 0; j < n; ++j) r[j] = bf16_to_f32(p[j * stride]);
      break;
    }
    // Index and mask vectors (a dynamic_update_slice's window test and offsets, broadcast with
    // stride 0 over the whole result) load per element too: the dtype switch stays out here.
    case kInt32:
    case kUInt32: {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(base) + off;
      bits_alias* rb = reinterpret_cast<bits_alias*>(r);
      for (int j = 0; j < n; ++j) rb[j] = p[j * stride];
      break;
    }
    case kBool: {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(base) + off;
      for (int j = 0; j < n; ++j) r[j] = p[j * stride] ? 1.0f : 0.0f;
      break;
    }
    default:
      for (int j = 0; j < n; ++j) r[j] = load_element(base, dt, off + j * stride);
  }
}

// The index of flat element `lin` of a row-major space dims[0..rank).
void unravel_index(int64_t lin, int rank, const int64_t* dims, int64_t* idx) {
  for (int d = rank - 1; d >= 0; --d) {
    idx[d] = lin % dims[d];
    lin /= dims[d];
  }
}

// Walks `count` elements of an iteration space dims[0..rank) (rank >= 1) from index start_idx, in
// runs along its innermost dim: visit(e, off, n) for elements e .. e + n - 1, which a view with
// these strides places at off, off + strides[rank - 1], ... (`offset`: the view's element at
// index 0). One call per run keeps the per-element work (a dtype switch, a copy) out of the walk.
template <class Visit>
ARK_INLINE_LOOP void for_each_inner_run(int rank, const int64_t* dims, const int64_t* strides,
                                        const int64_t* start_idx, int64_t offset, int count,
                                        Visit&& visit) {
  int64_t idx[kMaxRank];
  const int last = rank - 1;
  int64_t off = offset;
  for (int d = 0; d < rank; ++d) {
    idx[d] = start_idx[d];
    off += idx[d] * strides[d];
  }
  for (int e = 0; e < count;) {
    const int n = static_cast<int>(std::min<int64_t>(count - e, dims[last] - idx[last]));
    visit(e, off, n);
    e += n;
    off += n * strides[last];
    idx[last] += n;
    for (int d = last; d > 0 && idx[d] >= dims[d]; --d) {  // carry into the outer dims
      off -= idx[d] * strides[d];
      idx[d] = 0;
      ++idx[d - 1];
      off += strides[d - 1];
    }
  }
}

// LOAD_AT (plan v2): the view's element index plus the int32 offset in register `moved`, clamped
// into the tensor (the planner clamps indices as XLA does; the clamp here only keeps a hand-edited
// plan inside its buffer).
// tail_rank > 0: a REDUCE's column pass (eval_program), the view's trailing dims held at tail_idx.
void load_at(const Run& run, const Instruction& ins, int rank, const int64_t* dims,
             const int64_t* start_idx, int64_t col0, int count, const float* moved, float* r,
             int64_t iter, int64_t outer_iter, int tail_rank, const int64_t* tail_idx) {
  ViewRecord v = run.view(ins.a, iter, outer_iter);
  for (int j = 0; j < tail_rank; ++j) v.offset += tail_idx[j] * v.strides[rank + j];
  const TensorRecord& t = run.plan.tensor(v.tensor);
  const char* base = run.tensor_base(v.tensor);
  const bits_alias* delta = reinterpret_cast<const bits_alias*>(moved);
  if (rank == 0) {
    for (int e = 0; e < count; ++e) {
      const int64_t off = v.offset + static_cast<int32_t>(delta[e]);
      r[e] = load_element(base, t.dtype, std::min<int64_t>(std::max<int64_t>(off, 0), t.num_elements - 1));
    }
    return;
  }
  // Walk the iteration space in runs along its innermost dim, as LOAD does, with the dtype
  // switch outside each run: a dynamic_update_slice's full-size select loads its update this
  // way for every element of the result.
  const int64_t inner = v.strides[rank - 1], hi = t.num_elements - 1;
  for_each_inner_run(rank, dims, v.strides, start_idx, v.offset + col0 * inner, count,
                     [&](int e, int64_t off, int n) {
    auto at = [&](int j) {
      const int64_t o = off + j * inner + static_cast<int32_t>(delta[e + j]);
      return std::min<int64_t>(std::max<int64_t>(o, 0), hi);
    };
    switch (t.dtype) {
      case kF32: {
        const float* p = reinterpret_cast<const float*>(base);
        for (int j = 0; j < n; ++j) r[e + j] = p[at(j)];
        break;
      }
      case kBF16: {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
        for (int j = 0; j < n; ++j) r[e + j] = bf16_to_f32(p[at(j)]);
        break;
      }
      default:
        for (int j = 0; j < n; ++j) r[e + j] = load_element(base, t.dtype, at(j));
    }
  });
}

// A row of kSegment copies of CONST value `bits` rounded to dtype dt, filled on first use. Null
// when every row is read by the current evaluation (the caller fills its own register).
const float* const_row(Scratch& s, uint32_t bits, int32_t dt) {
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(dt)) << 32 | bits) + 1;
  for (int i = 0; i < Scratch::kConstRows; ++i) {
    if (s.const_key[i] == key) {
      s.const_used[i] = s.eval_seq;
      return s.const_rows[i];
    }
  }
  for (int tried = 0; tried < Scratch::kConstRows; ++tried) {
    const int i = s.const_victim;
    s.const_victim = (s.const_victim + 1) % Scratch::kConstRows;
    if (s.const_key[i] != 0 && s.const_used[i] == s.eval_seq) continue;
    float* row = s.const_rows[i];
    std::fill(row, row + kSegment, bits_float(bits));
    round_in_place(row, kSegment, dt);
    s.const_key[i] = key;
    s.const_used[i] = s.eval_seq;
    return row;
  }
  return nullptr;
}

ARK_SIMD_CLONES void select_loop(float* r, const float* p, const float* f, const float* t, int count) {
  for (int e = 0; e < count; ++e) r[e] = p[e] != 0.0f ? t[e] : f[e];
}

ARK_SIMD_CLONES void fill_loop(float* r, float v, int count) { std::fill(r, r + count, v); }

// One pass of a REDUCE's column fold (run_reduce_columns) over n outputs: acc = acc + v, or the
// first pass acc = +0 + v (the fold's start, with no fill pass: the same bits, -0 becoming +0).
ARK_SIMD_CLONES void fold_sum_loop(float* __restrict acc, const float* __restrict v, int n, bool first) {
  if (first) {
    for (int e = 0; e < n; ++e) acc[e] = 0.0f + v[e];
  } else {
    for (int e = 0; e < n; ++e) acc[e] = acc[e] + v[e];
  }
}

// The max fold's pass: acc = max(acc, v), a NaN winning; the first from -inf.
ARK_SIMD_CLONES void fold_max_loop(float* __restrict acc, const float* __restrict v, int n, bool first) {
  if (first) {
    for (int e = 0; e < n; ++e) acc[e] = nan_max(-INFINITY, v[e]);
  } else {
    for (int e = 0; e < n; ++e) acc[e] = nan_max(acc[e], v[e]);
  }
}

// The element offset of the `count` float32 elements a LOAD of dtype dt reads from iteration
// index start_idx on, when they are one contiguous run of a float32 tensor (-1 otherwise).
int64_t contiguous_f32_offset(int32_t src_dt, int32_t dt, int rank, const int64_t* dims,
                              const int64_t* strides, const int64_t* start_idx, int64_t offset,
                              int count) {
  if (src_dt != kF32 || dt != kF32 || strides[rank - 1] != 1) return -1;
  // One run: the rest of the innermost row holds count elements, or the view is row-major dense
  // (each stride the product of the dims inside it; dims of 1 never step).
  if (dims[rank - 1] - start_idx[rank - 1] < count) {
    int64_t dense = 1;
    for (int d = rank - 1; d >= 0; --d) {
      if (dims[d] > 1 && strides[d] != dense) return -1;
      dense *= dims[d];
    }
  }
  for (int d = 0; d < rank; ++d) offset += start_idx[d] * strides[d];
  return offset;
}

// Splits n elements of a read-in-place inbox at element offsets off, off + stride, ... into
// pieces within one slot: visit(j, base, rem, k) for elements j .. j + k - 1, which lie at element
// offsets rem, rem + stride, ... of `base`, slot b's source row in the source rank's region.
template <typename Visit>
void for_each_slot_piece(const Run::InPlaceInbox& ib, int64_t off, int64_t stride, int n, Visit visit) {
  for (int j = 0; j < n;) {
    const int64_t o = off + j * stride;
    const int64_t b = o / ib.slot_elems, rem = o - b * ib.slot_elems;
    // the elements of this run that stay in slot b (strides are >= 0: check_plan)
    const int k = stride == 0 ? n - j
                              : static_cast<int>(std::min<int64_t>(
                                    n - j, (ib.slot_elems - 1 - rem) / stride + 1));
    visit(j, ib.slot_base[b], rem, k);
    j += k;
  }
}

void load_in_place_run(float* r, const Run::InPlaceInbox& ib, int32_t dt, int64_t off,
                       int64_t stride, int n) {
  for_each_slot_piece(ib, off, stride, n, [&](int j, const char* base, int64_t rem, int k) {
    load_run(r + j, base, dt, rem, stride, k);
  });
}

// move_elements' copy from a read-in-place inbox: the bytes of each element, from its slot.
void move_in_place_run(char* dst, const Run::InPlaceInbox& ib, int64_t size, int64_t off,
                       int64_t stride, int n) {
  for_each_slot_piece(ib, off, stride, n, [&](int j, const char* base, int64_t rem, int k) {
    if (stride == 1) {
      memcpy(dst + j * size, base + rem * size, k * size);
    } else {
      for (int e = 0; e < k; ++e) memcpy(dst + (j + e) * size, base + (rem + e * stride) * size, size);
    }
  });
}

// Chaos mode: the first task of a read-in-place source's writer in this run (its readers have
// left the previous run) fills the whole source with NaN bytes before any tile is written, so a
// peer still reading the previous value would get another output. The op's other tasks wait
// for the fill (microseconds; the filler waits for nothing).
void poison_source(Run& run, int op) {
  std::atomic<uint8_t>& state = run.source_poisoned[op];
  uint8_t idle = 0;
  if (state.compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
    const TensorRecord& t = run.plan.tensor(run.plan.op(op).out_tensor);
    std::memset(run.tensor_base(run.plan.op(op).out_tensor), 0xFF, t.num_elements * dtype_size(t.dtype));
    state.store(2, std::memory_order_release);
    return;
  }
  while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
}

// Resolves the plan's puts read in place for this run (Run::in_place): per slot of each such
// inbox, the address of its source row in the source rank's region; the ops writing their
// sources; the peers reading this rank's sources.
void find_read_in_place(Run& run) {
  const Header& h = run.plan.header();
  const gpu::PersistentCommDevice& c = run.comm;
  for (int i = 0; i < h.num_ops; ++i) {
    const OpRecord& op = run.plan.op(i);
    if (op.kind != kOpPut || !op.read_in_place) continue;
    if (run.in_place_of.empty()) {
      run.in_place_of.assign(static_cast<size_t>(h.num_tensors), -1);
      run.shared_writer.assign(static_cast<size_t>(h.num_ops), 0);
    }
    const ViewRecord& av = run.plan.view(op.a_view);
    const TensorRecord& src = run.plan.tensor(av.tensor);
    const int64_t size = dtype_size(src.dtype);
    const RouteView route = run.plan.route(op);
    Run::InPlaceInbox ib;
    ib.slot_elems = op.M * op.N;
    for (int b = 0; b < op.B; ++b) {
      const int q = route.recv_from(c.rank, b);  // a rank: check_plan refuses zero slots here
      const char* area = reinterpret_cast<const char*>(gpu::inbox_area(c, c.peers[q]));
      ib.slot_base.push_back(area + src.byte_offset +
                             (av.offset + route.send_row(c.rank, b) * av.strides[0]) * size);
    }
    run.in_place_of[op.out_tensor] = static_cast<int32_t>(run.in_place.size());
    run.in_place.push_back(std::move(ib));
    for (int j = 0; j < h.num_ops; ++j)
      if (run.plan.op(j).out_tensor == av.tensor) run.shared_writer[j] = 1;
    for (int q = 0; q < c.n; ++q) {
      bool reads = false;
      for (int b = 0; b < op.B && !reads; ++b) reads = q != c.rank && route.recv_from(q, b) == c.rank;
      if (reads && std::find(run.shared_readers.begin(), run.shared_readers.end(), q) ==
                       run.shared_readers.end())
        run.shared_readers.push_back(q);
    }
  }
}

// Marks every fused gelu_tanh sequence of the plan's programs in run.gelu_at (once per call: a
// scan of the programs' instructions).
void find_fused_gelu(Run& run) {
  for (const int32_t at : gelu_tanh_starts(run.plan)) {
    if (run.gelu_at.empty()) run.gelu_at.assign(static_cast<size_t>(run.plan.header().code_words / 4), 0);
    run.gelu_at[at] = 1;
  }
}

// Evaluates `len` instructions at code index `at` for iteration flat indices [lin0, lin0 + count)
// of the space `dims[0..rank)`; acc (count floats) feeds LOAD_ACC. Register i's values are then at
// s.reg[i] (the result: s.reg[len - 1]); they stay valid until the next evaluation. A float32
// LOAD of one contiguous run is read in place, not copied; its result register too only when
// alias_result (the caller reads the result before it stores anything that could overlap it).
// col0 > 0 (a block of columns, epilogue_block): the space is a window of a wider one whose
// innermost index is col0 more than the window's; views are indexed in the wider space.
// tail_rank > 0 (a REDUCE's column pass): the iteration space is dims[0..rank) followed by
// tail_rank more dims held at the indices tail_idx; views are indexed over all rank + tail_rank dims.
void eval_program(const Run& run, int at, int len, int rank, const int64_t* dims, int64_t lin0,
                  int count, const float* acc, Scratch& s, int64_t col0 = 0, int tail_rank = 0,
                  const int64_t* tail_idx = nullptr, bool alias_result = false) {
  int64_t start_idx[kMaxRank];
  unravel_index(lin0, rank, dims, start_idx);
  ++s.eval_seq;
  for (int i = 0; i < len; ++i) {
    const Instruction& ins = run.plan.instruction(at + i);
    const int32_t code = opcode_of(ins), dt = dtype_of(ins);
    float* r = s.regs[i];
    s.reg[i] = r;
    if (code == kIntegerPow && !run.gelu_at.empty() && run.gelu_at[at + i]) {
      const auto constant = [&](int k) {  // the value of the CONST instruction k reads first
        return bits_float(static_cast<uint32_t>(run.plan.instruction(at + run.plan.instruction(at + k).a).a));
      };
      float* out = s.regs[i + 7];
      gelu_tanh_loop(out, s.reg[ins.a], constant(i + 1), constant(i + 3), constant(i + 5), constant(i + 6),
                     count);
      for (int k = i + 1; k < i + 7; ++k) s.reg[k] = s.regs[k];  // not computed: nothing reads them
      s.reg[i + 7] = out;
      i += 7;
      continue;
    }
    if (code == kLoadAcc) {
      // Only a MATMUL / REDUCE has an accumulator (check_plan refuses LOAD_ACC elsewhere). An
      // accumulator already in the register's dtype is read where it is, not copied.
      if (acc == nullptr) continue;
      if (dt == kF32 || dt == kInt32 || dt == kUInt32) {  // round_in_place leaves these as they are
        s.reg[i] = acc;
        continue;
      }
      memcpy(r, acc, sizeof(float) * count);
    } else if (code == kConst) {
      const uint32_t bits = static_cast<uint32_t>(ins.a);
      if (const float* row = const_row(s, bits, dt)) {
        s.reg[i] = row;
        continue;
      }
      fill_loop(r, bits_float(bits), count);
    } else if (code == kLoad) {
      const ViewRecord v = run.view(ins.a, s.iter, s.outer_iter);
      const int32_t src_dt = run.plan.tensor(v.tensor).dtype;
      // A read-in-place inbox (read only by LOADs: check_plan) is read slot by slot, where each
      // slot lies in its source rank's region; any other tensor at its own base.
      const int32_t k = run.in_place_of.empty() ? -1 : run.in_place_of[v.tensor];
      const Run::InPlaceInbox* ib = k >= 0 ? &run.in_place[k] : nullptr;
      const char* base = run.tensor_base(v.tensor);
      const auto load = [&](float* to, int64_t off, int64_t stride, int n) {
        if (ib)
          load_in_place_run(to, *ib, src_dt, off, stride, n);
        else
          load_run(to, base, src_dt, off, stride, n);
      };
      if (rank == 0) {  // a scalar space: every element reads the view's one element
        load(r, v.offset, 0, count);
      } else {
        // Walk the iteration space in runs along its innermost dim (one strided load each).
        const int64_t inner = v.strides[rank - 1];
        int64_t offset = v.offset + col0 * inner;
        for (int j = 0; j < tail_rank; ++j) offset += tail_idx[j] * v.strides[rank + j];
        // One contiguous float32 run (inside one slot of an inbox read in place) is read where it
        // is, not copied: a reduce's inbox slots, a bias, a residual.
        const int64_t at = contiguous_f32_offset(src_dt, dt, rank, dims, v.strides, start_idx, offset, count);
        if (at >= 0 && (i + 1 < len || alias_result)) {
          if (ib == nullptr) {
            s.reg[i] = reinterpret_cast<const float*>(base) + at;
            continue;
          }
          const int64_t b = at / ib->slot_elems;
          if (b == (at + count - 1) / ib->slot_elems) {
            s.reg[i] = reinterpret_cast<const float*>(ib->slot_base[b]) + (at - b * ib->slot_elems);
            continue;
          }
        }
        for_each_inner_run(rank, dims, v.strides, start_idx, offset, count,
                           [&](int e, int64_t off, int n) { load(r + e, off, inner, n); });
      }
    } else if (code == kLoadAt) {
      load_at(run, ins, rank, dims, start_idx, col0, count, s.reg[ins.b], r, s.iter, s.outer_iter,
              tail_rank, tail_idx);
    } else if (code == kLoadIter) {
      fill_loop(r, bits_float(static_cast<uint32_t>(s.iter)), count);
    } else if (code == kLoadRank) {  // check_plan allows it only in a plan with a group
      fill_loop(r, bits_float(static_cast<uint32_t>(run.opt.comm ? run.opt.comm->rank : 0)), count);
    } else if (code == kSelect) {
      select_loop(r, s.reg[ins.a], s.reg[ins.b], s.reg[ins.c], count);
    } else if (is_unary(code)) {
      eval_unary(code, r, s.reg[ins.a], count, ins.b);
    } else if (is_int_binary(code)) {
      eval_int_binary(code, r, s.reg[ins.a], s.reg[ins.b], count);
    } else if (is_int_unary(code)) {
      eval_int_unary(code, r, s.reg[ins.a], count, ins.b);
    } else {
      eval_binary(code, r, s.reg[ins.a], s.reg[ins.b], count);
    }
    round_in_place(r, count, dt);
  }
}

// n values stored at flat index `first` of an output of dtype dt.
void store_run(char* base, int32_t dt, int64_t first, const float* v, int n) {
  switch (dt) {
    // memmove: v may be the input it overwrites (a LOAD read in place, epilogue_store)
    case kF32: memmove(reinterpret_cast<float*>(base) + first, v, sizeof(float) * n); break;
    case kBF16: {
      // f32_to_bf16 as selects (the value is stored rounded: the high half of bf16_bits_rne).
      uint16_t* dst = reinterpret_cast<uint16_t*>(base) + first;
      for (int e = 0; e < n; ++e) dst[e] = static_cast<uint16_t>(bf16_bits_rne(float_bits(v[e])) >> 16);
      break;
    }
    default:
      for (int e = 0; e < n; ++e) store_element(base, dt, first + e, v[e]);
  }
}

// Window stores: value e of the flat indices lin0 .. lin0 + n - 1 of the space dims[0..rank)
// goes to the store view's element for its index plus the int32 delta moved[e] (kDropStore: not
// stored). Elements along the innermost dim with one delta (a dynamic_update_slice's window: all
// of them) go as one run when it stays inside the tensor (one element at a time, a ring's eight
// 64 x 128 updates were a third of its compute; perf, one core). An element outside the tensor
// (only a hand-edited plan: the planner clamps every window into its tensor) is clamped into it
// by a map's window store, one task storing in element order, and dropped by a matmul's, whose
// tiles run on several workers and would otherwise race on the clamped element.
void store_window(const Run& run, const OpRecord& op, int rank, const int64_t* dims, int64_t lin0,
                  int n, const float* value, const bits_alias* moved) {
  const ViewRecord& v = run.plan.view(op.store_view_plus1 - 1);
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  char* base = run.tensor_base(op.out_tensor);
  const bool clamp = op.kind == kOpMap;
  // store(e, at, len): elements e .. e + len - 1 (one delta; adjacent when len > 1) at `at` on.
  const auto store = [&](int e, int64_t at, int len) {
    const int32_t delta = static_cast<int32_t>(moved[e]);
    if (delta == kDropStore) return;
    at += delta;
    if (at >= 0 && at + len <= out.num_elements) return store_run(base, out.dtype, at, value + e, len);
    for (int j = 0; j < len; ++j) {
      if (clamp)
        store_element(base, out.dtype, std::min<int64_t>(std::max<int64_t>(at + j, 0), out.num_elements - 1),
                      value[e + j]);
      else if (at + j >= 0 && at + j < out.num_elements)
        store_element(base, out.dtype, at + j, value[e + j]);
    }
  };
  if (rank == 0) {  // a scalar space: each element at the view's one element
    for (int e = 0; e < n; ++e) store(e, v.offset, 1);
    return;
  }
  const int64_t inner = v.strides[rank - 1];
  int64_t start_idx[kMaxRank];
  unravel_index(lin0, rank, dims, start_idx);
  for_each_inner_run(rank, dims, v.strides, start_idx, v.offset, n, [&](int e0, int64_t off, int run_n) {
    if (inner != 1) {
      for (int j = 0; j < run_n; ++j) store(e0 + j, off + j * inner, 1);
      return;
    }
    uint32_t differs = 0;  // the common case, one delta for the whole run, tested without branches
    for (int j = 1; j < run_n; ++j) differs |= moved[e0 + j] ^ moved[e0];
    if (differs == 0) return store(e0, off, run_n);
    for (int j = 0; j < run_n;) {
      int len = 1;
      while (j + len < run_n && moved[e0 + j + len] == moved[e0 + j]) ++len;
      store(e0 + j, off + j, len);
      j += len;
    }
  });
}

// Whether op's epilogue walks a window (iter_dims) whose values store_window places: a map's or a
// matmul's window store. A scatter fold's epilogue walks its whole output (its first values).
bool stores_window(const OpRecord& op) { return op.store_view_plus1 > 0 && op.kind != kOpReduce; }

// The op's output as its epilogue walks it: one slice of a stacked output (v3: dims 1..rank,
// stored at slice `slice`), a matmul window store's window (iter_dims, stored by store_window),
// else the whole tensor.
struct EpilogueSpace {
  char* base;
  int32_t dtype;
  int rank;
  const int64_t* dims;
};
EpilogueSpace epilogue_space(const Run& run, const OpRecord& op, const Scratch& s) {
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  char* base = run.tensor_base(op.out_tensor);
  if (stores_window(op)) return {base, out.dtype, op.iter_rank, op.iter_dims};
  if (!s.stacked) return {base, out.dtype, out.rank, out.dims};
  base += s.slice * (out.num_elements / out.dims[0]) * dtype_size(out.dtype);
  return {base, out.dtype, out.rank - 1, out.dims + 1};
}

// Whether an epilogue only moves elements: LOAD, optionally then COPY, every instruction and the
// loaded tensor of the output's dtype (no rounding on the way). Such an op (an input returned, a
// transpose, a collective's last step copying its gathered inbox into the result) moves each
// element's bytes instead of widening it to a float register and narrowing it back: the same
// values, faster, and a 16-bit float NaN keeps its payload, as in XLA's copies (the register
// round trip quieted it).
bool moves_elements(const Run& run, const OpRecord& op, int32_t out_dtype) {
  if (op.epilogue_len < 1 || op.epilogue_len > 2) return false;
  const Instruction& load = run.plan.instruction(op.epilogue_at);
  if (opcode_of(load) != kLoad || dtype_of(load) != out_dtype) return false;
  if (op.epilogue_len == 2) {
    const Instruction& copy = run.plan.instruction(op.epilogue_at + 1);
    if (opcode_of(copy) != kCopy || copy.a != 0 || dtype_of(copy) != out_dtype) return false;
  }
  return run.plan.tensor(run.plan.view(load.a).tensor).dtype == out_dtype;
}

// The move of a moves_elements epilogue over output flat indices [lin0, lin0 + count): runs along
// the innermost dim, one memmove each where the view is contiguous there (the whole range at once
// where it is laid out like the output).
void move_elements(const Run& run, const OpRecord& op, const EpilogueSpace& out, int64_t lin0,
                   int count, const Scratch& s) {
  const ViewRecord v = run.view(run.plan.instruction(op.epilogue_at).a, s.iter, s.outer_iter);
  const int64_t size = dtype_size(out.dtype);
  const char* src = run.tensor_base(v.tensor);
  char* dst = out.base + lin0 * size;
  int64_t dense = 1;  // whether flat index i is element offset + i of the view
  bool like_output = true;
  for (int d = out.rank - 1; d >= 0; --d) {
    like_output = like_output && (out.dims[d] == 1 || v.strides[d] == dense);
    dense *= out.dims[d];
  }
  const int32_t k = run.in_place_of.empty() ? -1 : run.in_place_of[v.tensor];
  if (out.rank == 0 || like_output) {
    const int64_t from = v.offset + (out.rank == 0 ? 0 : lin0);
    if (k >= 0) return move_in_place_run(dst, run.in_place[k], size, from, 1, count);
    memmove(dst, src + from * size, count * size);
    return;
  }
  int64_t start_idx[kMaxRank];
  unravel_index(lin0, out.rank, out.dims, start_idx);
  const int64_t inner = v.strides[out.rank - 1];
  for_each_inner_run(out.rank, out.dims, v.strides, start_idx, v.offset, count,
                     [&](int e, int64_t off, int n) {
    if (k >= 0) {
      move_in_place_run(dst + e * size, run.in_place[k], size, off, inner, n);
    } else if (inner == 1) {
      memmove(dst + e * size, src + off * size, n * size);
    } else {
      for (int j = 0; j < n; ++j) memcpy(dst + (e + j) * size, src + (off + j * inner) * size, size);
    }
  });
}

// Epilogue over output flat indices [lin0, lin0 + count), stored into the op's output tensor.
void epilogue_store(const Run& run, const OpRecord& op, int64_t lin0, int count, const float* acc,
                    Scratch& s) {
  const EpilogueSpace out = epilogue_space(run, op, s);
  const bool window = stores_window(op);
  if (acc == nullptr && !window && moves_elements(run, op, out.dtype))
    return move_elements(run, op, out, lin0, count, s);
  for (int done = 0; done < count; done += kSegment) {
    const int n = std::min(kSegment, count - done);
    // The result may be read in place only where it is stored at its own position.
    eval_program(run, op.epilogue_at, op.epilogue_len, out.rank, out.dims, lin0 + done, n,
                 acc ? acc + done : nullptr, s, 0, 0, nullptr, out.dtype == kF32 && !window);
    if (window)
      store_window(run, op, out.rank, out.dims, lin0 + done, n, s.reg[op.epilogue_len - 1],
                   reinterpret_cast<const bits_alias*>(s.reg[op.store_at_plus1 - 1]));
    else
      store_run(out.base, out.dtype, lin0 + done, s.reg[op.epilogue_len - 1], n);
  }
}

// Epilogue over a rows x cols block of the op's (M x N) output: rows row0.., columns col0..
// (acc, when given, row stride cols). A tile narrower than N used to run the program once per
// row, paying every instruction's setup per 64-wide row (perf, a gelu MLP: the epilogue took half
// as long as its matmuls, now under a third); when N is the output's innermost dim the block is
// one window of the iteration space instead, evaluated kSegment elements per pass (the same
// elements, each with the same operations).
void epilogue_block(const Run& run, const OpRecord& op, int64_t row0, int rows, int64_t col0,
                    int cols, const float* acc, Scratch& s) {
  if (cols == op.N)
    return epilogue_store(run, op, row0 * op.N, rows * cols, acc, s);  // contiguous: whole rows
  const EpilogueSpace out = epilogue_space(run, op, s);
  // N spans several dims, or a move (each row's run is one move): row by row
  const bool windowed = stores_window(op);
  if (out.rank == 0 || out.dims[out.rank - 1] != op.N ||
      (acc == nullptr && !windowed && moves_elements(run, op, out.dtype))) {
    for (int i = 0; i < rows; ++i)
      epilogue_store(run, op, (row0 + i) * op.N + col0, cols, acc ? acc + i * cols : nullptr, s);
    return;
  }
  int64_t window[kMaxRank];
  std::copy(out.dims, out.dims + out.rank, window);
  window[out.rank - 1] = cols;
  const int count = rows * cols;
  for (int done = 0; done < count; done += kSegment) {
    const int n = std::min(kSegment, count - done);
    eval_program(run, op.epilogue_at, op.epilogue_len, out.rank, window, row0 * cols + done, n,
                 acc ? acc + done : nullptr, s, col0);
    const float* v = s.reg[op.epilogue_len - 1];
    const bits_alias* moved =
        windowed ? reinterpret_cast<const bits_alias*>(s.reg[op.store_at_plus1 - 1]) : nullptr;
    for (int e = 0; e < n;) {  // stored a row's run at a time
      const int64_t w = row0 * cols + done + e;
      const int64_t row = w / cols, col = w % cols;
      const int run_len = static_cast<int>(std::min<int64_t>(n - e, cols - col));
      if (windowed)
        store_window(run, op, out.rank, out.dims, row * op.N + col0 + col, run_len, v + e, moved + e);
      else
        store_run(out.base, out.dtype, row * op.N + col0 + col, v + e, run_len);
      e += run_len;
    }
  }
}

// Widens the block B[b, k0 + k, n0 + n] (k < kb, n < nb) of any dtype / stride into a float32
// kb x nb tile (row stride nb). The loop order follows the smaller stride, so the source is read
// along its contiguous dim: a transposed weight (`y @ E.T`, k contiguous) is read row by row of E,
// and only the small tile (it stays in L1) is written across.
template <class Load>
void widen_b_block(const ViewRecord& bv, int64_t b, int64_t k0, int kb, int64_t n0, int nb,
                   float* dst, int64_t ld, Load load) {
  const int64_t first = bv.offset + b * bv.strides[0] + k0 * bv.strides[1] + n0 * bv.strides[2];
  const int64_t sk = bv.strides[1], sn = bv.strides[2];
  if (sk == 1 && sn != 1) {
    for (int n = 0; n < nb; ++n) {
      const int64_t row = first + n * sn;
      for (int k = 0; k < kb; ++k) dst[k * ld + n] = load(row + k);
    }
  } else {
    for (int k = 0; k < kb; ++k) {
      const int64_t row = first + k * sk;
      for (int n = 0; n < nb; ++n) dst[k * ld + n] = load(row + n * sn);
    }
  }
}

void widen_b_block(const ViewRecord& bv, int32_t dt, const char* base, int64_t b, int64_t k0,
                   int kb, int64_t n0, int nb, float* dst, int64_t ld) {
  switch (dt) {
    case kF32:
      if (bv.strides[2] == 1) {  // rows of B copied as they are (repacked: see run_matmul)
        const float* p = reinterpret_cast<const float*>(base) + bv.offset + b * bv.strides[0] + n0;
        for (int k = 0; k < kb; ++k)
          std::memcpy(dst + k * ld, p + (k0 + k) * bv.strides[1], sizeof(float) * nb);
        break;
      }
      widen_b_block(bv, b, k0, kb, n0, nb, dst, ld,
                    [p = reinterpret_cast<const float*>(base)](int64_t i) { return p[i]; });
      break;
    case kBF16:
      widen_b_block(bv, b, k0, kb, n0, nb, dst, ld,
                    [p = reinterpret_cast<const uint16_t*>(base)](int64_t i) { return bf16_to_f32(p[i]); });
      break;
    default:
      widen_b_block(bv, b, k0, kb, n0, nb, dst, ld,
                    [base, dt](int64_t i) { return load_element(base, dt, i); });
  }
}

// Rows of A widened to float32 (rows x K, row stride K).
void widen_a_rows(const ViewRecord& av, int32_t dt, const char* base, int64_t b, int64_t m0, int rows,
                  int64_t K, float* dst) {
  if (dt == kF32 && av.strides[1] == 1 && av.strides[2] != 1) {
    // A transposed operand (a weight gradient's x.T): the tile's rows are adjacent along m, so
    // 16 k at a time, the 16 runs of `rows` contiguous elements stay in L1 while each row's 16
    // values are written. Row by row, one load per element K elements apart missed L1 (one core,
    // x.T @ dy: 256 x 512 @ 512 x 256 92 -> 158 GFLOP/s, jax.jit 178; 256 x 64 @ 64 x 256 106 -> 130).
    const float* src = reinterpret_cast<const float*>(base) + av.offset + b * av.strides[0] + m0;
    const int64_t ks = av.strides[2];
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int kb = static_cast<int>(std::min<int64_t>(16, K - k0));
      for (int i = 0; i < rows; ++i)
        for (int kk = 0; kk < kb; ++kk) dst[i * K + k0 + kk] = src[(k0 + kk) * ks + i];
    }
    return;
  }
  for (int i = 0; i < rows; ++i) {
    const int64_t row = av.offset + b * av.strides[0] + (m0 + i) * av.strides[1];
    const int64_t ks = av.strides[2];
    float* out = dst + i * K;
    if (dt == kF32) {
      const float* src = reinterpret_cast<const float*>(base) + row;
      for (int64_t k = 0; k < K; ++k) out[k] = src[k * ks];
    } else if (dt == kBF16) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(base) + row;
      for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_f32(src[k * ks]);
    } else {
      for (int64_t k = 0; k < K; ++k) out[k] = load_element(base, dt, row + k * ks);
    }
  }
}

// Widened B blocks (operands that are not float32 / bf16 with unit n-stride) are at most
// kWidenFloats floats (32 KiB, L1-sized) and kWidenCols columns: a block is widened, used by every
// row of the row block at once and dropped, where a whole K x tn widened tile (8 MiB for a
// 1024 x 2048 logits tile) went through DRAM twice.
constexpr int kWidenFloats = 8192;
constexpr int kWidenCols = 256;

void run_matmul(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const ViewRecord av = run.view(op.a_view, s.iter, s.outer_iter);
  const ViewRecord bv = run.view(op.b_view, s.iter, s.outer_iter);
  const int32_t a_dt = run.plan.tensor(av.tensor).dtype, b_dt = run.plan.tensor(bv.tensor).dtype;
  const char* a_base = run.tensor_base(av.tensor);
  const char* b_base = run.tensor_base(bv.tensor);
  const int64_t K = op.K;
  const int tn = task.n1 - task.n0;
  // float32 / bf16 weights with unit n-stride are read in place (bf16 widened in registers);
  // others are widened block by block (k blocks of a column chunk, in k order: the kernel carries
  // each sum over from one block to the next, so the terms are added in the same order).
  // Transposed float32 / bf16 weights (unit k-stride) are read in place too, by the matmul_kt
  // kernels (transposed in registers).
  const bool float_b = b_dt == kF32 || b_dt == kBF16;
  // B rows a multiple of 2 KiB apart (a 512- or 1024-wide float32 weight) fall in so few L1 sets
  // that a panel read in place is evicted before the tile's next micro-block rows reuse it, even in
  // the short k blocks of kernels::l1_panel_rows: with more than one micro-block row, copy B's
  // columns into the padded L1-sized blocks below (the same terms in the same order). At a 1 KiB
  // stride 32-row k blocks fit, and reading in place beat the copy (one core, AMD EPYC, 32 x 64
  // tasks: 256x256 @ 256x256 199 -> 215 GFLOP/s, 512x128 @ 128x256 192 -> 208); at 2 KiB the two
  // were equal (16-row blocks), at 4 KiB the copy won (192 vs 162).
  const bool aliasing_rows = (bv.strides[1] * dtype_size(b_dt)) % 2048 == 0;
  const bool direct_b = float_b && bv.strides[2] == 1 &&
                        !(aliasing_rows && task.m1 - task.m0 > kernels::kMicroRows);
  const bool direct_bt = float_b && !direct_b && bv.strides[1] == 1;
  const int chunk = std::min(tn, direct_b || direct_bt ? kernels::kCols : kWidenCols);
  const int64_t tile_ld = chunk + 16;
  const int64_t k_block = direct_b || direct_bt ? K : std::max<int64_t>(16, (kWidenFloats / tile_ld) & ~15);
  s.acc.resize(static_cast<size_t>(kernels::kRows) * chunk);
  // float32 rows of A with unit k-stride are read in place, not copied once per row tile; other
  // dtypes / strides are widened into a_row.
  const bool direct_a = a_dt == kF32 && av.strides[2] == 1;
  if (!direct_a) s.a_row.resize(static_cast<size_t>(kernels::kRows) * K);
  // Widened rows are padded by one cache line: rows a power of two apart map to a few L1 sets,
  // and the column-wise writes of a transposed B then evict each other.
  if (!direct_b && !direct_bt) s.b_tile.resize(static_cast<size_t>(std::min(K, k_block)) * tile_ld);
  const int b_size = dtype_size(b_dt);
  // One output column (a matrix-vector product: a decode step's attention scores, `p @ v` for one
  // query): the kernels vectorize across columns, so one column would run scalar, one term at a
  // time. It runs as the transposed product instead: B's column as the one row, A's k-contiguous
  // rows as the columns of a transposed B (matmul_tile_kt), vectorized across A's rows; the same
  // terms are added in the same k order, so the bits do not change.
  const bool column = tn == 1;
  const bool direct_column = column && b_dt == kF32 && bv.strides[1] == 1;
  if (column && !direct_column) s.b_tile.resize(static_cast<size_t>(K));
  for (int b = task.b0; b < task.b1; ++b) {
    // direct_b: B[b, k, n0 + n] is element k * strides[1] + n of b_rows;
    // direct_bt: element n * strides[2] + k
    const char* b_rows = b_base + (bv.offset + b * bv.strides[0] + task.n0 * bv.strides[2]) * b_size;
    const float* b_column = reinterpret_cast<const float*>(b_rows);
    if (column && !direct_column) {
      widen_b_block(bv, b_dt, b_base, b, 0, static_cast<int>(K), task.n0, 1, s.b_tile.data(), 1);
      b_column = s.b_tile.data();
    }
    for (int m = task.m0; m < task.m1; m += kernels::kRows) {
      const int rows = std::min(kernels::kRows, task.m1 - m);
      const float* a_rows = s.a_row.data();
      int64_t lda = K;
      if (direct_a) {
        a_rows = reinterpret_cast<const float*>(a_base) + av.offset + b * av.strides[0] + m * av.strides[1];
        lda = av.strides[1];
      } else {
        widen_a_rows(av, a_dt, a_base, b, m, rows, K, s.a_row.data());
      }
      if (column) {
        float* acc = s.acc.data();  // rows x 1 = 1 x rows
        kernels::matmul_tile_kt(run.opt.fused_matmul, b_column, K, 1, K, a_rows, false, lda, rows, acc,
                                rows);
        round_in_place(acc, rows, op.acc_dtype);
        epilogue_block(run, op, static_cast<int64_t>(b) * op.M + m, rows, task.n0, 1, acc, s);
        continue;
      }
      for (int c0 = 0; c0 < tn; c0 += chunk) {
        const int cols = std::min(chunk, tn - c0);
        float* acc = s.acc.data();
        if (direct_b) {
          kernels::matmul_tile(run.opt.fused_matmul, a_rows, lda, rows, K,
                               b_rows + static_cast<int64_t>(c0) * b_size, b_dt == kBF16,
                               bv.strides[1], cols, acc, cols);
        } else if (direct_bt) {
          kernels::matmul_tile_kt(run.opt.fused_matmul, a_rows, lda, rows, K,
                                  b_rows + static_cast<int64_t>(c0) * bv.strides[2] * b_size,
                                  b_dt == kBF16, bv.strides[2], cols, acc, cols);
        } else if (K == 0) {
          std::fill(acc, acc + static_cast<int64_t>(rows) * cols, 0.0f);
        } else {
          for (int64_t k0 = 0; k0 < K; k0 += k_block) {
            const int kb = static_cast<int>(std::min(k_block, K - k0));
            widen_b_block(bv, b_dt, b_base, b, k0, kb, task.n0 + c0, cols, s.b_tile.data(), tile_ld);
            kernels::matmul_tile(run.opt.fused_matmul, a_rows + k0, lda, rows, kb,
                                 s.b_tile.data(), false, tile_ld, cols, acc, cols, k0 > 0);
          }
        }
        round_in_place(acc, rows * cols, op.acc_dtype);
        epilogue_block(run, op, static_cast<int64_t>(b) * op.M + m, rows, task.n0 + c0, cols, acc, s);
      }
    }
  }
}

// Whether a REDUCE may fold by columns (run_reduce_columns): few elements per output (pooling
// windows and their argmax, the taps of max pooling's gradient, psum's inbox slots).
bool reduces_by_columns(const OpRecord& op, int rows) {
  constexpr int64_t kMaxColumnFold = 64;
  return rows >= 2 && op.K <= kMaxColumnFold && op.kept_rank >= 1 && op.kept_rank < op.iter_rank;
}

// A short fold (psum's K = group size over the inbox's rank axis): one prologue pass per reduced
// index r over a segment of outputs, instead of one pass of K elements per output (which spent
// ~40 ns of per-pass setup per output element). Each output still folds r = 0..K-1 ascending in
// float32, so the bits are the row path's.
void run_reduce_columns(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const int rows = task.m1 - task.m0;
  s.acc.resize(rows);
  const int kept = op.kept_rank, tail = op.iter_rank - op.kept_rank;
  const int32_t kind = op.reduce_kind;
  const bool sum = kind == kReduceSum;
  // Other kinds (arg max / min, integer folds) fold their (value, index) states as the row
  // path does, r ascending.
  const bool generic = !sum && kind != kReduceMax;
  if (generic) s.states.resize(kSegment);
  for (int done = 0; done < rows; done += kSegment) {
    const int n = std::min(kSegment, rows - done);
    float* acc = s.acc.data() + done;
    if (generic) std::fill(s.states.begin(), s.states.begin() + n, reduce_identity(kind));
    int64_t r_idx[kMaxRank] = {};
    for (int64_t r = 0; r < op.K; ++r) {
      eval_program(run, op.prologue_at, op.prologue_len, kept, op.iter_dims, task.m0 + done, n,
                   nullptr, s, 0, tail, r_idx, true);
      const float* v = s.reg[op.prologue_len - 1];
      if (generic) {
        for (int e = 0; e < n; ++e)
          s.states[e] = reduce_combine(kind, s.states[e], ReduceAcc{float_bits(v[e]), static_cast<int32_t>(r)});
      } else if (sum) {
        fold_sum_loop(acc, v, n, r == 0);
      } else {
        fold_max_loop(acc, v, n, r == 0);
      }
      for (int j = tail - 1; j >= 0; --j) {  // next r, row-major over the reduced dims
        if (++r_idx[j] < op.iter_dims[kept + j]) break;
        r_idx[j] = 0;
      }
    }
    if (generic)
      for (int e = 0; e < n; ++e) acc[e] = bits_float(reduce_result(kind, s.states[e]));
    round_in_place(acc, n, op.acc_dtype);
  }
  epilogue_store(run, op, task.m0, rows, s.acc.data(), s);
}

// Folds the values of iteration elements [r0, r0 + n) of a scatter fold, in order: fold(to, v)
// for each value whose element `to` (the store view's element at idx moved by its offset
// register) is in the tensor. idx / at: the store view's index and element at r0, advanced.
template <typename Fold>
void fold_segment(const ViewRecord& v, const OpRecord& op, int64_t num_elements, int n, const float* value,
                  const bits_alias* moved, int64_t* idx, int64_t& at, Fold&& fold) {
  const int rank = op.iter_rank;
  for (int e = 0; e < n; ++e) {
    const int32_t delta = static_cast<int32_t>(moved[e]);
    const int64_t to = at + delta;
    if (delta != kDropStore && to >= 0 && to < num_elements) fold(to, value[e]);
    for (int d = rank - 1; d >= 0; --d) {  // the next index, row-major
      at += v.strides[d];
      if (++idx[d] < op.iter_dims[d]) break;
      at -= idx[d] * v.strides[d];
      idx[d] = 0;
    }
  }
}

// A scatter fold (a REDUCE with a store view; docs/plan_format.md, "Scatter folds"): the epilogue
// gives every output element its first value, then each prologue value over iter_dims is folded
// into the element its store view and store_at register name, one element at a time in iteration
// order, so a later value for the same element reads the earlier one's result (duplicate scatter
// indices), as XLA's serial scatter loop does. One task: check_plan refuses more. float32 sums and
// 32-bit moves (an embedding's gradient, `.at[perm].set`) skip the generic fold's dtype and kind
// dispatch per value (a third of an embedding gradient's time; perf, one core): the same bits.
void run_scatter_fold(const Run& run, const OpRecord& op, Scratch& s) {
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  char* base = run.tensor_base(op.out_tensor);
  // the first values (M = the output's elements, < 2^31: check_plan)
  epilogue_store(run, op, 0, static_cast<int>(op.M), nullptr, s);
  const ViewRecord& v = run.plan.view(op.store_view_plus1 - 1);
  const int32_t kind = op.reduce_kind, dt = out.dtype;
  float* f32 = reinterpret_cast<float*>(base);
  bits_alias* u32 = reinterpret_cast<bits_alias*>(base);
  int64_t idx[kMaxRank] = {};
  int64_t at = v.offset;
  for (int64_t r0 = 0; r0 < op.K; r0 += kSegment) {
    const int n = static_cast<int>(std::min<int64_t>(kSegment, op.K - r0));
    eval_program(run, op.prologue_at, op.prologue_len, op.iter_rank, op.iter_dims, r0, n, nullptr, s);
    const float* value = s.reg[op.prologue_len - 1];
    const bits_alias* moved = reinterpret_cast<const bits_alias*>(s.reg[op.store_at_plus1 - 1]);
    const auto segment = [&](auto&& fold) { fold_segment(v, op, out.num_elements, n, value, moved, idx, at, fold); };
    if (dt == kF32 && kind == kReduceSum) {
      segment([&](int64_t to, float x) { f32[to] += x; });
    } else if ((dt == kInt32 || dt == kUInt32) && kind == kReduceISum) {
      segment([&](int64_t to, float x) { u32[to] += float_bits(x); });
    } else if (dtype_size(dt) == 4 && kind == kReduceLast) {
      segment([&](int64_t to, float x) { u32[to] = float_bits(x); });
    } else {
      segment([&](int64_t to, float x) { fold_into_element(base, dt, to, kind, x); });
    }
  }
}

void run_reduce(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  if (op.store_view_plus1 > 0) return run_scatter_fold(run, op, s);
  const int rows = task.m1 - task.m0;
  if (reduces_by_columns(op, rows)) return run_reduce_columns(run, op, task, s);
  s.acc.resize(rows);
  const int64_t R = op.K;
  for (int i = 0; i < rows; ++i) {
    const int64_t m = task.m0 + i;
    float acc = op.reduce_kind == kReduceSum ? 0.0f : -INFINITY;
    ReduceAcc state = reduce_identity(op.reduce_kind);
    const bool generic = op.reduce_kind != kReduceSum && op.reduce_kind != kReduceMax;
    for (int64_t r0 = 0; r0 < R; r0 += kSegment) {
      const int n = static_cast<int>(std::min<int64_t>(kSegment, R - r0));
      eval_program(run, op.prologue_at, op.prologue_len, op.iter_rank, op.iter_dims, m * R + r0, n,
                   nullptr, s, 0, 0, nullptr, true);
      const float* v = s.reg[op.prologue_len - 1];
      if (generic) {  // v2 kinds: the shared fold of tile_ops.hpp, r ascending
        for (int e = 0; e < n; ++e)
          state = reduce_combine(op.reduce_kind, state,
                                 ReduceAcc{float_bits(v[e]), static_cast<int32_t>(r0 + e)});
      } else if (op.reduce_kind == kReduceSum) {
        for (int e = 0; e < n; ++e) acc = acc + v[e];
      } else {
        for (int e = 0; e < n; ++e) acc = nan_max(acc, v[e]);
      }
    }
    if (generic) acc = bits_float(reduce_result(op.reduce_kind, state));
    s.acc[i] = round_to(acc, op.acc_dtype);
  }
  epilogue_store(run, op, task.m0, rows, s.acc.data(), s);
}

// A map's window store (plan v2): the epilogue over iter_dims, stored by store_window.
void run_window_store(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const int rank = op.iter_rank;
  for (int m = task.m0; m < task.m1; ++m) {
    const int64_t lin0 = static_cast<int64_t>(m) * op.N + task.n0;
    for (int done = 0; done < task.n1 - task.n0; done += kSegment) {
      const int n = std::min(kSegment, task.n1 - task.n0 - done);
      eval_program(run, op.epilogue_at, op.epilogue_len, rank, op.iter_dims, lin0 + done, n, nullptr, s);
      store_window(run, op, rank, op.iter_dims, lin0 + done, n, s.reg[op.epilogue_len - 1],
                   reinterpret_cast<const bits_alias*>(s.reg[op.store_at_plus1 - 1]));
    }
  }
}

void run_map(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  if (op.store_view_plus1 > 0) return run_window_store(run, op, task, s);
  epilogue_block(run, op, task.m0, task.m1 - task.m0, task.n0, task.n1 - task.n0, nullptr, s);
}

// ---- communication (plan v3 PUT ops) ---------------------------------------------------------
// The inboxes and signals live in the group's symmetric regions (persistent_region.hpp), and the
// sends, signals and waits are the GPU protocol's own functions (persistent_comm_device.hpp).

void send_ready_puts(Run& run);

// The give-up side of one protocol wait (gpu::wait_put / wait_peer_entered poll, yielding, and
// ask it every 32 polls) on a word of rank `owner`'s region: gives up when another worker failed,
// the interpreter is exiting, the region broke or the deadline passed; otherwise it first sends
// this rank's own ready tiles (peers may be waiting for them), later sleeps on the owner's
// doorbell for at most 1 ms. The rank we wait for is often a thread that is not running (a group's
// ranks are more threads than cores), and waiters that keep yielding keep it off the cores.
class RegionWait {
 public:
  RegionWait(Run& run, int32_t owner, const uint64_t* word, uint64_t target,
             Clock::time_point deadline)
      : run_(run), owner_(owner), word_(word), target_(target), deadline_(deadline) {}

  auto give_up() {
    return [this] {
      if (run_.failed.load(std::memory_order_relaxed)) return true;
      if (HostCommunicator::cancelled()) return outcome_ = kCancelled, true;
      if (run_.opt.comm->region->broken()) return outcome_ = kBroken, true;
      if (Clock::now() > deadline_) return outcome_ = kTimedOut, true;
      if (++calls_ == 1)
        send_ready_puts(run_);
      else
        run_.opt.comm->region->sleep_unless_at_least(owner_, word_, target_, 1000);
      return false;
    };
  }

  // After the wait gave up: fails the run with why, naming this rank, the worker and `what` it
  // waited for (nothing to add when another worker's failure ended it). A timeout also says where
  // `peer` was in its calls here, relative to the call `call` this rank waited for it to be in.
  void fail_run(int worker, const std::string& what, int32_t peer, uint64_t call) const {
    const std::string rank = "ark_persistent: rank " + std::to_string(run_.comm.rank);
    switch (outcome_) {
      case kCancelled:
        run_.fail(PersistentStatus::kAborted, rank + " cancelled while waiting for " + what +
                                                  ": the Python interpreter is exiting");
        break;
      case kBroken: {
        // The root cause's code: a peer's timeout makes this a timeout too, whichever device's
        // error XLA reports.
        const PersistentRegion& region = *run_.opt.comm->region;
        run_.fail(region.broke_by_timeout() ? PersistentStatus::kDeadlineExceeded : PersistentStatus::kAborted,
                  rank + " gave up waiting for " + what + ": " + region.broken_reason());
        break;
      }
      case kTimedOut:
        run_.fail(PersistentStatus::kDeadlineExceeded,
                  rank + " (worker " + std::to_string(worker) + ") timed out after " +
                      std::to_string(run_.opt.timeout_ms) + " ms waiting for " + what +
                      where_is(peer, call));
        break;
      case kOtherFailure: break;
    }
  }

 private:
  std::string where_is(int32_t peer, uint64_t call) const {
    const PersistentRegion& region = *run_.opt.comm->region;
    const uint64_t begun = region.calls_begun(peer);
    const std::string who = "; peer rank " + std::to_string(peer);
    if (begun < call)
      return who + " has not begun call " + std::to_string(call) +
             " at this call site (it has begun " + std::to_string(begun) +
             " here): a rank under rank-dependent control flow, or its device program not "
             "launched (XLA's CPU client can starve one device's launch when many calls with "
             "collectives are queued without waiting for their results)";
    if (begun == call && region.in_call(peer))
      return who + " is inside call " + std::to_string(call) +
             " (slow, or waiting for another rank)";
    return "";
  }

  enum Outcome { kOtherFailure, kCancelled, kBroken, kTimedOut };
  Run& run_;
  const int32_t owner_;
  const uint64_t* word_;
  const uint64_t target_;
  const Clock::time_point deadline_;
  Outcome outcome_ = kOtherFailure;
  int calls_ = 0;
};

// Whether peer q has opened its region for this run (its previous call at this site ended: its
// inbox is free, and it reads none of this rank's read-in-place sources any more), looked up once
// per peer and run. With `wait`, blocks until it has (false: the wait gave up and the run failed;
// `before` says what task t was about to do); without, only looks.
bool peer_opened(Run& run, int worker, int t, int q, Clock::time_point deadline, bool wait,
                 const char* before) {
  const gpu::PersistentCommDevice& c = run.comm;
  if (run.peer_open[q].load(std::memory_order_acquire)) return true;
  uint64_t* entered = gpu::entered_word(c.peers[q]);
  if (__atomic_load_n(entered, __ATOMIC_ACQUIRE) < c.epoch) {
    if (!wait) return false;
    RegionWait w(run, q, entered, c.epoch, deadline);
    uint64_t seen = 0;
    if (!gpu::wait_peer_entered(c, q, w.give_up(), &seen)) {
      w.fail_run(worker, "peer rank " + std::to_string(q) + " to end its previous call at this "
                         "call site (call " + std::to_string(c.epoch - 1) + ") before " + before +
                         " task " + std::to_string(t) + " (" + run.op_name(run.plan.task(t).op) + ")",
                 q, c.epoch - 1);
      return false;
    }
  }
  run.peer_open[q].store(1, std::memory_order_release);
  return true;
}

// Whether every rank this rank sends to in task t has opened its region for this run (see
// peer_opened). With `wait`, blocks until they have; without, only looks (an eager send skips a
// task whose peers are not open yet).
bool destinations_open(Run& run, int worker, int t, const OpRecord& op, const TaskRecord& task,
                       Clock::time_point deadline, bool wait) {
  const gpu::PersistentCommDevice& c = run.comm;
  const RouteView route = run.plan.route(op);
  for (int q = 0; q < c.n; ++q) {
    bool sends = false;
    for (int b = task.b0; b < task.b1 && !sends; ++b) sends = route.recv_from(q, b) == c.rank;
    if (sends && !peer_opened(run, worker, t, q, deadline, wait, "putting (its inbox is reused)"))
      return false;
  }
  return true;
}

// Copies one (m, n) tile of source row `row` into slot `slot` of an inbox at `dst`.
// `slot` counts over the whole (stacked) inbox: a put in a loop writes slice s's slots at
// s * B + b (docs/plan_format.md, "Loops and communication").
void copy_tile(char* dst, const char* src, const OpRecord& op, const ViewRecord& av,
               const TaskRecord& task, int64_t size, int row, int64_t slot) {
  const int64_t cols = task.n1 - task.n0;
  for (int m = task.m0; m < task.m1; ++m) {
    const int64_t from = av.offset + row * av.strides[0] + m * av.strides[1] + task.n0 * av.strides[2];
    const int64_t to = (slot * op.M + m) * op.N + task.n0;
    if (av.strides[2] == 1) {
      std::memcpy(dst + to * size, src + from * size, cols * size);
    } else {
      for (int64_t e = 0; e < cols; ++e)
        std::memcpy(dst + (to + e) * size, src + (from + e * av.strides[2]) * size, size);
    }
  }
}

// Sends this rank's tiles of task t (its destinations are open: destinations_open): for every
// rank q and slot b in [b0, b1) that the op's routing gives to this rank (default: slot `rank` of
// every rank, from row q), the tile of a_view[row] into slot b of q's inbox, then q's signal for
// (t, b), one release store of (epoch, runs), and one ring of q's doorbell. The peer order starts
// after this rank so that the ranks of a group do not all write to rank 0 first.
// In a loop (plan v3 "Loops and communication") the source is read at iteration `iter`, the tile
// goes into slice `slice` of the stacked inbox (one slice per iteration, so a peer that runs
// ahead never overwrites a slice this rank still reads), and `runs` is the run index + 1: signals
// count delivered iterations like the task counters.
void put_tile(Run& run, int t, const OpRecord& op, const TaskRecord& task, int64_t iter = 0,
              int64_t slice = 0, uint32_t runs = 1) {
  const gpu::PersistentCommDevice& c = run.comm;
  const RouteView route = run.plan.route(op);
  const ViewRecord av = run.view(op.a_view, iter, 0);
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  const int64_t size = dtype_size(out.dtype);
  const char* src = run.tensor_base(av.tensor);
  for (int k = 1; k <= c.n; ++k) {
    const int q = (c.rank + k) % c.n;
    char* dst = reinterpret_cast<char*>(gpu::inbox_area(c, c.peers[q])) + out.byte_offset;
    bool sent = false;
    for (int b = task.b0; b < task.b1; ++b) {
      if (route.recv_from(q, b) != c.rank) continue;
      // Read in place: q reads the tile in this rank's region; the signal says it is final.
      if (!op.read_in_place)
        copy_tile(dst, src, op, av, task, size, route.send_row(q, b), slice * op.B + b);
      gpu::signal_put(c, q, t, b, runs);
      sent = true;
    }
    if (sent) run.opt.comm->region->ring(q);
  }
}

// A slot nobody sends to (a rank outside a ppermute's destinations) reads as zeros, as jax.lax's.
void zero_tile(Run& run, const OpRecord& op, const TaskRecord& task, int64_t slot) {
  const int64_t size = dtype_size(run.plan.tensor(op.out_tensor).dtype);
  char* dst = run.tensor_base(op.out_tensor);
  for (int m = task.m0; m < task.m1; ++m) {
    const int64_t to = (static_cast<int64_t>(slot) * op.M + m) * op.N + task.n0;
    std::memset(dst + to * size, 0, (task.n1 - task.n0) * size);
  }
}

// Waits for rank `src`'s signal for slot `slot` of PUT task t (its tile is in this rank's inbox);
// false on a timeout, a failure of another worker, a broken region or cancellation (interpreter
// exit). In a loop, the tile of run `runs - 1` (iteration) is awaited: the signal counts the runs
// the peer delivered (docs/plan_format.md, "Loops and communication").
bool wait_signal(Run& run, int worker, int t, int slot, int src, Clock::time_point deadline,
                 uint32_t runs = 1) {
  const gpu::PersistentCommDevice& c = run.comm;
  const std::string at_iteration =
      run.loops.num_loops() > 0 ? " at iteration " + std::to_string(runs - 1) : std::string();
  RegionWait w(run, c.rank, gpu::put_signal_word(c, c.local, t, slot),
               gpu::put_signal_value(c.epoch, runs), deadline);
  uint64_t seen = 0;
  if (!gpu::wait_put(c, t, slot, runs, w.give_up(), &seen)) {
    w.fail_run(worker,
               "peer rank " + std::to_string(src) + " to put its tile of task " +
                   std::to_string(t) + at_iteration + " (" + run.op_name(run.plan.task(t).op) +
                   ", a put over a group of " + std::to_string(c.n) + " ranks)",
               src, c.epoch);
    return false;
  }
  // The ranks' k-th calls here pair up by count; after a rank failed or skipped a call they
  // could pair two executions: an error, never another call's data.
  const int64_t theirs = run.opt.comm->region->run_id(src, c.epoch);
  if (theirs != run.opt.comm->run_id) {
    run.fail(PersistentStatus::kAborted,
             "ark_persistent: rank " + std::to_string(c.rank) + " (XLA run " +
                 std::to_string(run.opt.comm->run_id) + ") received task " + std::to_string(t) +
                 "'s tile from peer rank " + std::to_string(src) + "'s call of another run (" +
                 std::to_string(theirs) + "): the ranks' calls at this call site are out of step "
                 "(after an earlier failure?)");
    return false;
  }
  return true;
}

// Sends this rank's tile of every put task whose dependencies are met, whose destinations are
// open and that no worker has sent yet, before the task's turn in its queue. Queues are the same
// on every rank (the plan is), so at its turn a put task of source rank b first waits for the
// tiles of the ranks listed before it: rank 7 sent its own tile only after rank 0..6's had
// arrived, a chain across the group (measured on 2 cores, 8 ranks: the sequence-parallel MLP's
// psum_scatter finished 1-4 ms after the last rank's compute). Called after every task and by
// waiting workers. Only the time of a copy changes: its source is final (its dependencies are
// done) and the peer's inbox rows it writes are written by nobody else (docs/plan_format.md,
// "Communication").
constexpr uint8_t kUnsent = 0, kSending = 1, kSent = 2;

void send_ready_puts(Run& run) {
  for (const int32_t t : run.own_puts) {
    if (run.put_claimed[t].load(std::memory_order_relaxed) != kUnsent) continue;
    bool ready = true;
    for (int e = run.plan.dep_begin(t); e < run.plan.dep_end(t) && ready; ++e)
      ready = __atomic_load_n(run.buf.counters + run.plan.dep(e), __ATOMIC_ACQUIRE) >= 1;
    const TaskRecord& task = run.plan.task(t);
    const OpRecord& op = run.plan.op(task.op);
    uint8_t unsent = kUnsent;
    if (!ready || !destinations_open(run, -1, t, op, task, {}, false) ||
        !run.put_claimed[t].compare_exchange_strong(unsent, kSending, std::memory_order_acq_rel))
      continue;
    put_tile(run, t, op, task);
    run.put_claimed[t].store(kSent, std::memory_order_release);
  }
}

// This rank's sends of put task t, at the task's turn: made here unless an eager send made them;
// if another worker's eager send is still copying, wait for it, so that counters[t] (which lets
// a later task overwrite the source's bytes) is set only once the source is no longer read.
// False when the run failed or the deadline passed meanwhile.
bool send_own_tiles(Run& run, int worker, int t, const OpRecord& op, const TaskRecord& task,
                    Clock::time_point deadline, int64_t iter, int64_t slice, uint32_t runs) {
  if (!destinations_open(run, worker, t, op, task, deadline, true)) return false;
  if (!run.put_claimed) {  // no eager sends (loop plans, chaos mode): the copy is made here
    put_tile(run, t, op, task, iter, slice, runs);
    return true;
  }
  uint8_t unsent = kUnsent;
  if (run.put_claimed[t].compare_exchange_strong(unsent, kSending, std::memory_order_acq_rel)) {
    put_tile(run, t, op, task);
    run.put_claimed[t].store(kSent, std::memory_order_release);
    return true;
  }
  while (run.put_claimed[t].load(std::memory_order_acquire) != kSent) {  // a copy: microseconds
    if (run.failed.load(std::memory_order_relaxed)) return false;
    if (Clock::now() > deadline) {
      run.fail(PersistentStatus::kDeadlineExceeded,
               "ark_persistent: rank " + std::to_string(run.comm.rank) + " (worker " +
                   std::to_string(worker) + ") timed out after " + std::to_string(run.opt.timeout_ms) +
                   " ms waiting for another worker's copies of put task " + std::to_string(t) + " (" +
                   run.op_name(task.op) + ")");
      return false;
    }
    std::this_thread::yield();
  }
  return true;
}

// A PUT task: this rank's tiles to the ranks its routing names (default: its tile, when its rank
// is in [b0, b1), to every rank), unless an eager send made them, then the slots b0..b1-1 of this
// rank's inbox awaited (a slot with no source zero-filled). Dependents only ever wait for
// counters[t].
// In a loop: `iter` is the iteration, `slice` the inbox slice it fills, `runs` its run index + 1
// (1 outside loops).
bool run_put(Run& run, int worker, int t, const OpRecord& op, const TaskRecord& task,
             Clock::time_point deadline, int64_t iter, int64_t slice, uint32_t runs) {
  const RouteView route = run.plan.route(op);
  if (!send_own_tiles(run, worker, t, op, task, deadline, iter, slice, runs)) return false;
  for (int b = task.b0; b < task.b1; ++b) {
    const int from = route.recv_from(run.comm.rank, b);
    if (from < 0) {
      zero_tile(run, op, task, slice * op.B + b);
    } else if (!wait_signal(run, worker, t, b, from, deadline, runs)) {
      return false;
    }
  }
  return true;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits until counters[d] >= target (finished iterations of d); false when the wait timed out or
// another worker failed.
bool wait_for(Run& run, int worker, int task, int64_t iter, int dep, int64_t target,
              Clock::time_point deadline) {
  int32_t* counter = run.buf.counters + dep;
  const auto ready = [counter, target] { return __atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target; };
  if (ready()) return true;
  // Spin a little, then yield (with more runnable threads than cores, as on a 2-core host running
  // XLA's threads too, a pure spinner keeps the worker it waits for off the core: measured 20x
  // slower than yielding), and after kSpinMicros sleep on a futex until some counter is set (the
  // setter wakes us at once, where polling sleeps overslept by 50-100 us and long yield phases
  // burned the cores other callers' workers need).
  const auto spin_until = Clock::now() + std::chrono::microseconds(kSpinMicros);
  bool sleeping = false;
  for (uint32_t spin = 1;; ++spin) {
    if (ready()) return true;
    if (run.failed.load(std::memory_order_relaxed)) return false;
    if (spin < 64) {
      cpu_relax();
      continue;
    }
    if (spin == 64) send_ready_puts(run);
    if (!sleeping) {
      std::this_thread::yield();
      if (spin % 64) continue;
    }
    const auto now = Clock::now();
    if (now > deadline) {
      const TaskRecord& t = run.plan.task(task);
      const TaskRecord& d = run.plan.task(dep);
      std::ostringstream msg;
      msg << "ark_persistent: worker " << worker << " timed out after " << run.opt.timeout_ms
          << " ms waiting for task " << dep << " (" << run.op_name(d.op) << ") before running task "
          << task << " (" << run.op_name(t.op) << ")";
      if (run.loops.num_loops() > 0)
        msg << " iteration " << iter << " (counters[" << dep << "] = "
            << __atomic_load_n(counter, __ATOMIC_ACQUIRE) << ", needs " << target << ")";
      run.fail(PersistentStatus::kDeadlineExceeded, msg.str());
      return false;
    }
    if (now < spin_until) continue;
    sleeping = true;
    run.sleepers.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t seen = run.epoch.load(std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!ready() && !run.failed.load()) run.sleep_on_epoch(seen, kSleepMicros);
    run.sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
}

// Serialized chaos modes: blocks until the adversary lets worker w run its next task (then, when
// the task is done, chaos_release). False when the run failed or the wait timed out.
bool chaos_acquire(Run& run, int w, int task, Clock::time_point deadline) {
  const LoopView& lv = run.loops;
  Chaos& c = *run.chaos;
  const PlanView& p = run.plan;
  std::unique_lock<std::mutex> lock(c.mu);
  for (;;) {
    if (run.failed.load()) return false;
    if (!c.busy && c.granted < 0) {
      if (c.mode == Chaos::kTargeted) c.retarget(p);
      int best = -1;
      int32_t best_key = -1;
      bool checking = false;  // a worker at a while loop's check point (no turn needed)
      // A check whose predicate is already computed is awaited before the next grant: whether
      // the checker resolved it yet is timing, and letting that decide which workers are
      // candidates would make the serialized order differ between the ranks of a comm plan (a
      // put holding the turn on one rank while a peer's order reaches it later: a deadlock).
      // Decided before any key is drawn: a round given up for the wait must not consume the
      // adversary's random numbers (their sequence is part of the order).
      bool resolvable = false;
      for (int v = 0; v < p.header().num_workers; ++v) {
        if (c.cursors[v].done() || !c.cursors[v].pending_check) continue;
        const int32_t pred_task = lv.loop(c.cursors[v].top_loop).pred_task;
        resolvable |= __atomic_load_n(run.buf.counters + pred_task, __ATOMIC_ACQUIRE) >=
                      c.cursors[v].iters[0] + 1;
      }
      for (int v = 0; v < p.header().num_workers && !resolvable; ++v) {
        if (c.cursors[v].done()) continue;
        if (c.cursors[v].pending_check) {
          checking = true;
          continue;
        }
        const int32_t t = c.cursors[v].task(p);
        bool ready = true;
        for (int e = p.dep_begin(t); e < p.dep_end(t) && ready; ++e)
          ready = __atomic_load_n(run.buf.counters + p.dep(e), __ATOMIC_ACQUIRE) >=
                  lv.dep_target(p.task(t).op, p.task(p.dep(e)).op, c.cursors[v].iters);
        if (!ready) continue;
        const int32_t key = c.mode == Chaos::kReversed
                                ? t
                                : (c.in_closure[t] << 30) |
                                      (c.highest_first ? t : static_cast<int32_t>(c.next() >> 35));
        if (key > best_key) best = v, best_key = key;
      }
      if ((best < 0 && checking) || resolvable) {  // that worker's check resolves its cursor and notifies
        if (c.cv.wait_until(lock, deadline) == std::cv_status::timeout && Clock::now() > deadline) {
          lock.unlock();
          run.fail(PersistentStatus::kDeadlineExceeded,
                   "ark_persistent: worker " + std::to_string(w) + " timed out after " +
                       std::to_string(run.opt.timeout_ms) + " ms waiting for a while loop's check");
          return false;
        }
        continue;
      }
      if (best < 0) {
        lock.unlock();
        run.fail(PersistentStatus::kDeadlineExceeded,
                 "ark_persistent: chaos mode: no worker can run its next task (worker " +
                     std::to_string(w) + " waits to run task " + std::to_string(task) +
                     "): the plan deadlocks");
        return false;
      }
      c.granted = best;
      c.cv.notify_all();
    }
    if (c.granted == w) {
      c.granted = -1;
      c.busy = true;
      return true;
    }
    if (c.cv.wait_until(lock, deadline) == std::cv_status::timeout && Clock::now() > deadline) {
      lock.unlock();
      run.fail(PersistentStatus::kDeadlineExceeded,
               "ark_persistent: worker " + std::to_string(w) + " timed out after " +
                   std::to_string(run.opt.timeout_ms) + " ms waiting for its chaos-mode turn to run task " +
                   std::to_string(task) + " (" + run.op_name(p.task(task).op) + ")");
      return false;
    }
  }
}

void chaos_release(Run& run, int w, int task) {
  Chaos& c = *run.chaos;
  std::lock_guard<std::mutex> lock(c.mu);
  const bool last = c.cursors[w].last_run();  // a loop task's final run
  c.cursors[w].advance(run.plan, run.loops);
  if (c.mode == Chaos::kTargeted && last) c.done[task] = 1;
  c.busy = false;
  c.cv.notify_all();
}

// A while loop's check point (plan_format.hpp QueueCursor): waits for the predicate task's run of
// this iteration, reads its slot (written once per call, so every worker reads the same value)
// and resolves the cursor; a false predicate first ends the worker's segment tasks' counters at
// their trip count (release), so everything after the loop sees it finished. False when the run
// failed (a timeout, or a true predicate at the guard's last iteration).
bool while_check(Run& run, int w, QueueCursor& cursor, Clock::time_point deadline) {
  const PlanView& p = run.plan;
  const LoopView& lv = run.loops;
  const LoopRecord& loop = lv.loop(cursor.top_loop);
  const int64_t i = cursor.iters[0];
  const int32_t pred_task = loop.pred_task;
  const int32_t waiting = cursor.q < cursor.end_q ? p.queue_task(cursor.q) : pred_task;
  if (!wait_for(run, w, waiting, i, pred_task, i + 1, deadline)) return false;
  const int32_t out = p.op(loop.pred_op_plus1 - 1).out_tensor;
  const bool taken = run.tensor_base(out)[i] != 0;  // bool: one byte per iteration's slot
  if (taken && cursor.guard_exceeded()) {
    run.fail(PersistentStatus::kResourceExhausted,
             "ark_persistent: while_loop (" + run.op_name(loop.first_op) + ") did not end within " +
                 std::to_string(loop.trip_count - 1) +
                 " iterations (the plan's guard: loops[k].trip_count - 1; raise "
                 "max_while_iterations or edit the plan's trip_count)");
    return false;
  }
  if (!taken) {
    for (int q = cursor.seg_begin[0]; q < cursor.seg_end[0]; ++q) {
      const int32_t t = p.queue_task(q);
      __atomic_store_n(run.buf.counters + t, static_cast<int32_t>(loop.trip_count), __ATOMIC_RELEASE);
    }
    run.wake_sleepers();
  }
  if (run.chaos && run.chaos->mode != Chaos::kStalls) {  // the adversary's copy of the cursor too
    Chaos& c = *run.chaos;
    std::lock_guard<std::mutex> lock(c.mu);
    if (!taken && c.mode == Chaos::kTargeted)
      for (int q = cursor.seg_begin[0]; q < cursor.seg_end[0]; ++q) c.done[p.queue_task(q)] = 1;
    c.cursors[w].resolve_check(p, lv, taken);
    c.cv.notify_all();
  }
  cursor.resolve_check(p, lv, taken);
  return true;
}

// This thread's scratch, kept for its later calls (a task sets every field it reads before
// running): allocated and zeroed per call, a worker's 64 KiB of registers and its tile buffers
// were malloc / free / memset traffic on every call of a small plan. Heap-allocated once, not a
// thread_local object: 64 KiB of static TLS in a dlopen'ed module can fail to load.
Scratch& thread_scratch() {
  thread_local std::unique_ptr<Scratch> scratch;
  if (!scratch) scratch = std::make_unique<Scratch>();
  return *scratch;
}

void worker_tasks(Run& run, int w) {
  const Header& h = run.plan.header();
  Scratch* scratch = &thread_scratch();
  Chaos* chaos = run.chaos.get();
  const bool serialized = chaos && chaos->mode != Chaos::kStalls;
  uint64_t rng = mix64(run.opt.chaos_seed ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(w + 1)));
  if (chaos && !serialized)
    std::this_thread::sleep_for(std::chrono::microseconds(chaos->start_delay_us[w]));
  QueueCursor cursor;
  for (cursor.start(run.plan, run.loops, w); !cursor.done(); cursor.advance(run.plan, run.loops)) {
    while (cursor.pending_check) {  // a while loop: does this iteration run its body?
      const auto deadline = Clock::now() + std::chrono::milliseconds(run.opt.timeout_ms);
      if (!while_check(run, w, cursor, deadline)) return;
    }
    if (cursor.done()) break;
    const int t = cursor.task(run.plan);
    const int64_t iter = cursor.iter();
    const int64_t wait_begin = run.now_ns();
    if (chaos && !serialized) {
      if (const int64_t us = chaos->stall_us(rng)) std::this_thread::sleep_for(std::chrono::microseconds(us));
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(run.opt.timeout_ms);
    if (serialized && !chaos_acquire(run, w, t, deadline)) return;
    const TaskRecord& task = run.plan.task(t);
    for (int e = run.plan.dep_begin(t); e < run.plan.dep_end(t); ++e) {
      const int d = run.plan.dep(e);
      const int64_t target = run.loops.dep_target(task.op, run.plan.task(d).op, cursor.iters);
      if (!wait_for(run, w, t, iter, d, target, deadline)) return;
    }
    if (!run.shared_writer.empty() && run.shared_writer[task.op]) {
      // It writes a source peers read in place: their reads of the previous call must be over.
      for (const int32_t q : run.shared_readers)
        if (!peer_opened(run, w, t, q, deadline, true, "overwriting the source it reads in place in"))
          return;
      if (chaos) poison_source(run, task.op);
    }
    const int64_t start = run.now_ns();
    const OpRecord& op = run.plan.op(task.op);
    scratch->iter = iter;
    scratch->outer_iter = cursor.outer_iter();
    scratch->stacked = run.loops.op_stacked(task.op);
    // A put's inbox has one slice per run of its loops (the run index; = iter in a top-level loop)
    scratch->slice = !scratch->stacked ? 0
                     : op.kind == kOpPut ? run.loops.run_index(task.op, cursor.iters)
                                         : run.loops.stacked_slice(task.op, iter);
    switch (op.kind) {
      case kOpMatmul: run_matmul(run, op, task, *scratch); break;
      case kOpReduce: run_reduce(run, op, task, *scratch); break;
      case kOpPut:
        if (!run_put(run, w, t, op, task, deadline, iter, scratch->slice,
                     static_cast<uint32_t>(run.loops.run_index(task.op, cursor.iters) + 1))) {
          if (serialized) chaos_release(run, w, t);
          return;
        }
        break;
      default: run_map(run, op, task, *scratch); break;
    }
    // Counters count finished iterations: never reset, so no barrier between iterations.
    __atomic_store_n(run.buf.counters + t,
                     static_cast<int32_t>(run.loops.run_index(task.op, cursor.iters) + 1),
                     __ATOMIC_RELEASE);
    run.wake_sleepers();
    send_ready_puts(run);
    if (run.buf.profile) {
      int64_t* p = run.buf.profile + static_cast<int64_t>(t) * h.profile_words_per_task;
      p[0] = wait_begin;
      p[1] = start;
      p[2] = run.now_ns();
      p[3] = w;
    }
    if (serialized) chaos_release(run, w, t);
    if (run.failed.load(std::memory_order_relaxed)) return;
  }
}

// A worker: its queue, with any exception (an allocation failure) turned into a failed run.
void worker_main(Run& run, int w) {
  try {
    worker_tasks(run, w);
  } catch (const std::exception& e) {
    run.fail(PersistentStatus::kInvalidPlan, std::string("ark_persistent: worker ") +
                                                 std::to_string(w) + " failed: " + e.what());
  }
}

// One run of the plan on its workers.
// initial: chaos mode only, per result the content an in-place (aliased) result starts with (its
// operand's), empty for the others.
PersistentResult run_once(const int32_t* words, const PersistentBuffers& buffers,
                          const PersistentOptions& options, int chaos_run,
                          const std::vector<std::vector<char>>* initial) {
  Run run(PlanView{words}, buffers, options);
  find_fused_gelu(run);
  const Header& h = run.plan.header();
  std::memset(buffers.counters, 0, sizeof(int32_t) * h.num_counters);
  if (buffers.profile)
    std::memset(buffers.profile, 0, sizeof(int64_t) * h.num_tasks * h.profile_words_per_task);
  if (options.chaos_seed) {
    run.chaos = std::make_unique<Chaos>(run.plan, options.chaos_seed, chaos_run);
    std::memset(buffers.workspace, 0xFF, buffers.workspace_bytes);  // NaN bytes
    for (size_t i = 0; i < buffers.results.size(); ++i) {
      if (initial && !(*initial)[i].empty())  // in place: the elements no op writes keep their value
        std::memcpy(buffers.results[i], (*initial)[i].data(), buffers.result_bytes[i]);
      else
        std::memset(buffers.results[i], 0xFF, buffers.result_bytes[i]);
    }
  }
  if (h.group_size > 0) {
    if (options.comm == nullptr || options.comm->size != h.group_size || !options.comm->region)
      return {PersistentStatus::kInvalidPlan,
              "ark_persistent: the plan has put tasks over " + std::to_string(h.group_size) +
                  " ranks but the call names no such group"};
    std::string err;
    run.comm = options.comm->region->begin(options.comm->rank, options.comm->run_id, &err);
    if (!err.empty()) return {PersistentStatus::kAborted, "ark_persistent: " + err};
    run.peer_open = std::make_unique<std::atomic<uint8_t>[]>(h.group_size);
    find_read_in_place(run);
    if (options.chaos_seed && !run.shared_writer.empty())
      run.source_poisoned = std::make_unique<std::atomic<uint8_t>[]>(h.num_ops);
    // Eager sends only where each task runs once and the order is not an adversary's.
    if (!options.chaos_seed && run.loops.num_loops() == 0) {
      run.put_claimed = std::make_unique<std::atomic<uint8_t>[]>(h.num_tasks);
      const int me = options.comm->rank;
      for (int t = 0; t < h.num_tasks; ++t) {  // the put tasks whose routing has this rank send
        const TaskRecord& task = run.plan.task(t);
        const OpRecord& op = run.plan.op(task.op);
        if (op.kind != kOpPut) continue;
        const RouteView route = run.plan.route(op);
        bool sends = false;
        for (int q = 0; q < h.group_size && !sends; ++q)
          for (int b = task.b0; b < task.b1 && !sends; ++b) sends = route.recv_from(q, b) == me;
        if (sends) run.own_puts.push_back(t);
      }
    }
  }
  const std::function<void(int)> job = [&run](int w) { worker_main(run, w); };
  PersistentResult result;
  if (std::string err = run_on_workers(h.num_workers, job); !err.empty())
    result = {PersistentStatus::kResourceExhausted, err};
  else if (run.failed.load())
    result = run.error;
  if (run.comm.n > 0) {
    // Chaos mode: this run's inbox becomes NaN bytes before peers may fill it for the next run,
    // so a read of a slot before its signal is caught by the next run's different output.
    if (options.chaos_seed && result.status == PersistentStatus::kOk) {
      // Not a read-in-place source: peers may still be reading it.
      char* area = reinterpret_cast<char*>(gpu::inbox_area(run.comm, run.comm.local));
      for (int i = 0; i < h.num_ops; ++i) {
        const OpRecord& op = run.plan.op(i);
        if (op.kind != kOpPut) continue;
        const TensorRecord& inbox = run.plan.tensor(op.out_tensor);
        std::memset(area + inbox.byte_offset, 0xFF, inbox.num_elements * dtype_size(inbox.dtype));
      }
    }
    options.comm->region->end(run.comm, result.status == PersistentStatus::kOk,
                              "rank " + std::to_string(run.comm.rank) + ": " + result.message,
                              result.status == PersistentStatus::kDeadlineExceeded);
  }
  return result;
}

}  // namespace

PersistentResult run_plan(const int32_t* words, const PersistentBuffers& buffers,
                          const PersistentOptions& options) {
  if (!options.chaos_seed) return run_once(words, buffers, options, 0, nullptr);
  // Results updated in place (plan v2 aliases) are the operand's buffer: every run starts from its
  // content, which the first run overwrites, so keep a copy.
  const PlanView plan{words};
  std::vector<std::vector<char>> initial(buffers.results.size());
  for (int t = 0; t < plan.header().num_tensors; ++t) {
    const TensorRecord& r = plan.tensor(t);
    if (r.storage == kStorageResult && r.alias_plus1 != 0) {
      const char* data = static_cast<const char*>(buffers.results[r.storage_index]);
      initial[r.storage_index].assign(data, data + buffers.result_bytes[r.storage_index]);
    }
  }
  std::vector<std::vector<char>> first(buffers.results.size());
  for (int r = 0; r < kChaosRuns; ++r) {
    PersistentResult result = run_once(words, buffers, options, r, &initial);
    if (result.status != PersistentStatus::kOk) return result;
    for (size_t i = 0; i < buffers.results.size(); ++i) {
      const char* out = static_cast<const char*>(buffers.results[i]);
      if (r == 0) {
        first[i].assign(out, out + buffers.result_bytes[i]);
        continue;
      }
      const auto diff = std::mismatch(first[i].begin(), first[i].end(), out).first - first[i].begin();
      if (diff != static_cast<std::ptrdiff_t>(first[i].size())) {
        PersistentResult race{PersistentStatus::kRace,
                              "ark_persistent: chaos mode: output " + std::to_string(i) +
                                  " differs between two adversarial task orders (first at byte " +
                                  std::to_string(diff) + ", runs 0 and " + std::to_string(r) +
                                  " of seed " + std::to_string(options.chaos_seed) +
                                  "): the plan has a race (a missing dependency?)"};
        // This rank runs no more runs: its peers, waiting for the next one, fail now.
        if (options.comm != nullptr && options.comm->region)
          options.comm->region->abandon("rank " + std::to_string(options.comm->rank) + ": " +
                                        race.message);
        return race;
      }
    }
  }
  return {};
}

}  // namespace jax_ark::cpu
