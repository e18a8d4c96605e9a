// CPU executor of persistent-kernel plans. See persistent_executor.hpp and docs/plan_format.md.
//
// Math order follows the plan format exactly (k / r ascending, float32, every product and sum
// rounded: CMakeLists.txt compiles this file with -ffp-contract=off), so results do not depend on
// timing or on which worker ran a tile. The matmul kernels (persistent_kernels.hpp) vectorize
// across output columns only; program loops have their opcode / dtype dispatch hoisted out.
#include "persistent_executor.hpp"

#include <algorithm>
#include <atomic>
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

#include "jax_ark/tile_ops.hpp"
#include "persistent_kernels.hpp"


namespace jax_ark::cpu {
namespace {

using namespace jax_ark::plan;
using Clock = std::chrono::steady_clock;

constexpr int kSegment = 256;  // elements a program evaluates per pass (registers are float[64][256])
constexpr int64_t kSpinMicros = 200;    // a dependency wait spins / yields this long, then sleeps
constexpr int64_t kSleepMicros = 1000;  // longest single sleep (deadline / failure checks between)

// ---- a pool per calling thread ---------------------------------------------------------------------
// XLA runs each device's program on its own thread and one call at a time per thread, so a pool
// owned by the calling thread can never be starved by another device's call (the deadlock trap in
// shared/DESIGN.md); threads are reused across calls instead of being created per call.
class WorkerPool {
 public:
  explicit WorkerPool(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i + 1); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()); }

  // Runs job(w) for w in [0, workers): w = 0 on the caller, the rest on pool threads.
  void run(int workers, const std::function<void(int)>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      active_ = workers;
      remaining_ = workers - 1;
      ++generation_;
    }
    start_cv_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= active_) continue;
        job = job_;
      }
      (*job)(index);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--remaining_ == 0) done_cv_.notify_all();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  bool stop_ = false;
};

WorkerPool& pool_for_this_thread(int helpers) {
  thread_local std::unique_ptr<WorkerPool> pool;
  if (!pool || pool->size() < helpers) {
    pool.reset();
    pool = std::make_unique<WorkerPool>(helpers);
  }
  return *pool;
}

// ---- the run ----------------------------------------------------------------------------------------
struct Run {
  Run(PlanView p, const PersistentBuffers& b, const PersistentOptions& o)
      : plan(p), buf(b), opt(o), t0(Clock::now()) {}
  PlanView plan;
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

  char* tensor_base(int t) const {
    const TensorRecord& r = plan.tensor(t);
    switch (r.storage) {
      case kStorageArg: return static_cast<char*>(buf.args[r.storage_index]);
      case kStorageResult: return static_cast<char*>(buf.results[r.storage_index]);
      default: return reinterpret_cast<char*>(buf.workspace) + r.byte_offset;
    }
  }

  int64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  }
};

struct Scratch {
  float regs[kMaxProgramLen][kSegment];
  std::vector<float> acc, a_row, b_tile, pro;
};

// ---- program evaluation -----------------------------------------------------------------------------
// Every loop below has its opcode / dtype switch hoisted out, so each is a straight loop over the
// segment that the compiler can vectorize (or at least run without per-element dispatch). The
// per-element math is exactly tile_ops.hpp's (apply_unary / apply_binary with a constant opcode
// fold to the same expression; libm calls stay scalar libm calls).

// bf16 round trip (= bf16_to_f32(f32_to_bf16(v)), bit for bit) written as selects so it vectorizes.
inline uint32_t bf16_bits_rne(uint32_t u) {
  const uint32_t nan = (u | 0x00400000u) & 0xFFFF0000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
}

void round_in_place(float* r, int count, int32_t dt) {
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
void unary_loop(float* r, const float* x, int count, int32_t imm) {
  for (int e = 0; e < count; ++e) r[e] = apply_unary(kCode, x[e], imm);
}
template <int32_t kCode>
void binary_loop(float* r, const float* x, const float* y, int count) {
  for (int e = 0; e < count; ++e) r[e] = apply_binary(kCode, x[e], y[e]);
}

void eval_unary(int32_t code, float* r, const float* x, int count, int32_t imm) {
  switch (code) {
#define ARK_UNARY(C) \
  case C: unary_loop<C>(r, x, count, imm); break;
    ARK_UNARY(kNeg) ARK_UNARY(kExp) ARK_UNARY(kLog) ARK_UNARY(kTanh) ARK_UNARY(kLogistic)
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

void eval_binary(int32_t code, float* r, const float* x, const float* y, int count) {
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
void int_binary_loop(bits_alias* r, const bits_alias* x, const bits_alias* y, int count) {
  for (int e = 0; e < count; ++e) r[e] = apply_int_binary(kCode, x[e], y[e]);
}

void eval_int_binary(int32_t code, float* r, const float* x, const float* y, int count) {
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
    default:
      for (int j = 0; j < n; ++j) r[j] = load_element(base, dt, off + j * stride);
  }
}

// LOAD_AT (plan v2): the view's element index plus the int32 offset in register `moved`, clamped
// into the tensor (the planner clamps indices as XLA does; the clamp here only keeps a hand-edited
// plan inside its buffer).
void load_at(const Run& run, const Instruction& ins, int rank, const int64_t* dims,
             const int64_t* start_idx, int count, const float* moved, float* r) {
  const ViewRecord& v = run.plan.view(ins.a);
  const TensorRecord& t = run.plan.tensor(v.tensor);
  const char* base = run.tensor_base(v.tensor);
  const bits_alias* delta = reinterpret_cast<const bits_alias*>(moved);
  int64_t idx[kMaxRank];
  for (int d = 0; d < rank; ++d) idx[d] = start_idx[d];
  for (int e = 0; e < count; ++e) {
    int64_t off = v.offset + static_cast<int32_t>(delta[e]);
    for (int d = 0; d < rank; ++d) off += idx[d] * v.strides[d];
    off = std::min<int64_t>(std::max<int64_t>(off, 0), t.num_elements - 1);
    r[e] = load_element(base, t.dtype, off);
    for (int d = rank - 1; d >= 0; --d) {  // next iteration index, row-major
      if (++idx[d] < dims[d]) break;
      idx[d] = 0;
    }
  }
}

// Evaluates `len` instructions at code index `at` for iteration flat indices [lin0, lin0 + count)
// of the space `dims[0..rank)`; acc (count floats) feeds LOAD_ACC. Result: s.regs[len - 1].
void eval_program(const Run& run, int at, int len, int rank, const int64_t* dims, int64_t lin0,
                  int count, const float* acc, Scratch& s) {
  int64_t start_idx[kMaxRank];
  {
    int64_t rem = lin0;
    for (int d = rank - 1; d >= 0; --d) {
      start_idx[d] = rem % dims[d];
      rem /= dims[d];
    }
  }
  for (int i = 0; i < len; ++i) {
    const Instruction& ins = run.plan.instruction(at + i);
    const int32_t code = opcode_of(ins), dt = dtype_of(ins);
    float* r = s.regs[i];
    if (code == kLoadAcc) {
      memcpy(r, acc, sizeof(float) * count);
    } else if (code == kLoad) {
      const ViewRecord& v = run.plan.view(ins.a);
      const int32_t src_dt = run.plan.tensor(v.tensor).dtype;
      const char* base = run.tensor_base(v.tensor);
      if (rank == 0) {  // a scalar space: every element reads the view's one element
        load_run(r, base, src_dt, v.offset, 0, count);
      } else {
        // Walk the iteration space in runs along its innermost dim (one strided load each).
        int64_t idx[kMaxRank];
        int64_t off = v.offset;
        for (int d = 0; d < rank; ++d) {
          idx[d] = start_idx[d];
          off += idx[d] * v.strides[d];
        }
        const int last = rank - 1;
        const int64_t inner_stride = v.strides[last];
        for (int e = 0; e < count;) {
          const int n = static_cast<int>(std::min<int64_t>(count - e, dims[last] - idx[last]));
          load_run(r + e, base, src_dt, off, inner_stride, n);
          e += n;
          off += n * inner_stride;
          idx[last] += n;
          for (int d = last; d > 0 && idx[d] >= dims[d]; --d) {  // carry into the outer dims
            off -= idx[d] * v.strides[d];
            idx[d] = 0;
            ++idx[d - 1];
            off += v.strides[d - 1];
          }
        }
      }
    } else if (code == kLoadAt) {
      load_at(run, ins, rank, dims, start_idx, count, s.regs[ins.b], r);
    } else if (code == kConst) {
      const float c = bits_float(static_cast<uint32_t>(ins.a));
      for (int e = 0; e < count; ++e) r[e] = c;
    } else if (code == kSelect) {
      const float *p = s.regs[ins.a], *f = s.regs[ins.b], *t = s.regs[ins.c];
      for (int e = 0; e < count; ++e) r[e] = p[e] != 0.0f ? t[e] : f[e];
    } else if (is_unary(code)) {
      eval_unary(code, r, s.regs[ins.a], count, ins.b);
    } else if (is_int_binary(code)) {
      eval_int_binary(code, r, s.regs[ins.a], s.regs[ins.b], count);
    } else if (is_int_unary(code)) {
      eval_int_unary(code, r, s.regs[ins.a], count, ins.b);
    } else {
      eval_binary(code, r, s.regs[ins.a], s.regs[ins.b], count);
    }
    round_in_place(r, count, dt);
  }
}

// Epilogue over output flat indices [lin0, lin0 + count), stored into the op's output tensor.
void epilogue_store(const Run& run, const OpRecord& op, int64_t lin0, int count, const float* acc,
                    Scratch& s) {
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  char* base = run.tensor_base(op.out_tensor);
  for (int done = 0; done < count; done += kSegment) {
    const int n = std::min(kSegment, count - done);
    eval_program(run, op.epilogue_at, op.epilogue_len, out.rank, out.dims, lin0 + done, n,
                 acc ? acc + done : nullptr, s);
    const float* v = s.regs[op.epilogue_len - 1];
    const int64_t first = lin0 + done;
    switch (out.dtype) {
      case kF32: memcpy(reinterpret_cast<float*>(base) + first, v, sizeof(float) * n); break;
      case kBF16: {
        // f32_to_bf16 as selects (the value is stored rounded: the high half of bf16_bits_rne).
        uint16_t* dst = reinterpret_cast<uint16_t*>(base) + first;
        for (int e = 0; e < n; ++e) dst[e] = static_cast<uint16_t>(bf16_bits_rne(float_bits(v[e])) >> 16);
        break;
      }
      default:
        for (int e = 0; e < n; ++e) store_element(base, out.dtype, first + e, v[e]);
    }
  }
}

// Widens B[b, k, n0 + n] (k < K, n < tn) of any dtype / stride into a float32 K x tn tile.
template <class Load>
void widen_b_tile(const ViewRecord& bv, int64_t b, int64_t K, int n0, int tn, float* dst, Load load) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t row = bv.offset + b * bv.strides[0] + k * bv.strides[1] + n0 * bv.strides[2];
    for (int n = 0; n < tn; ++n) dst[k * tn + n] = load(row + n * bv.strides[2]);
  }
}

// Rows of A widened to float32 (rows x K, row stride K).
void widen_a_rows(const ViewRecord& av, int32_t dt, const char* base, int64_t b, int64_t m0, int rows,
                  int64_t K, float* dst) {
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

void run_matmul(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const ViewRecord& av = run.plan.view(op.a_view);
  const ViewRecord& bv = run.plan.view(op.b_view);
  const int32_t a_dt = run.plan.tensor(av.tensor).dtype, b_dt = run.plan.tensor(bv.tensor).dtype;
  const char* a_base = run.tensor_base(av.tensor);
  const char* b_base = run.tensor_base(bv.tensor);
  const int64_t K = op.K;
  const int tn = task.n1 - task.n0;
  // float32 / bf16 weights with unit n-stride are read in place (bf16 widened in registers);
  // others are widened into a float32 tile once per task and batch entry.
  const bool direct_b = (b_dt == kF32 || b_dt == kBF16) && bv.strides[2] == 1;
  const int chunk = std::min(tn, kernels::kCols);  // columns per kernel call
  s.acc.resize(static_cast<size_t>(kernels::kRows) * chunk);
  s.a_row.resize(static_cast<size_t>(kernels::kRows) * K);
  if (!direct_b) s.b_tile.resize(static_cast<size_t>(K) * tn);
  for (int b = task.b0; b < task.b1; ++b) {
    const char* b_rows;  // B[b, k, n0 + n] is element k * b_ld + n of b_rows (b_size bytes each)
    int64_t b_ld = tn;
    int b_size = sizeof(float);
    bool b_bf16 = false;
    if (direct_b) {
      const int64_t first = bv.offset + b * bv.strides[0] + task.n0;
      b_bf16 = b_dt == kBF16;
      b_size = dtype_size(b_dt);
      b_rows = b_base + first * b_size;
      b_ld = bv.strides[1];
    } else {
      float* dst = s.b_tile.data();
      switch (b_dt) {
        case kF32:
          widen_b_tile(bv, b, K, task.n0, tn, dst,
                       [p = reinterpret_cast<const float*>(b_base)](int64_t i) { return p[i]; });
          break;
        case kBF16:
          widen_b_tile(bv, b, K, task.n0, tn, dst, [p = reinterpret_cast<const uint16_t*>(b_base)](
                                                       int64_t i) { return bf16_to_f32(p[i]); });
          break;
        default:
          widen_b_tile(bv, b, K, task.n0, tn, dst,
                       [b_base, b_dt](int64_t i) { return load_element(b_base, b_dt, i); });
      }
      b_rows = reinterpret_cast<const char*>(dst);
    }
    for (int m = task.m0; m < task.m1; m += kernels::kRows) {
      const int rows = std::min(kernels::kRows, task.m1 - m);
      widen_a_rows(av, a_dt, a_base, b, m, rows, K, s.a_row.data());
      for (int c0 = 0; c0 < tn; c0 += chunk) {
        const int cols = std::min(chunk, tn - c0);
        float* acc = s.acc.data();
        kernels::matmul_tile(s.a_row.data(), K, rows, K, b_rows + static_cast<int64_t>(c0) * b_size,
                             b_bf16, b_ld, cols, acc, cols);
        for (int i = 0; i < rows; ++i) {
          float* row = acc + static_cast<int64_t>(i) * cols;
          round_in_place(row, cols, op.acc_dtype);
          epilogue_store(run, op, (static_cast<int64_t>(b) * op.M + m + i) * op.N + task.n0 + c0,
                         cols, row, s);
        }
      }
    }
  }
}

void run_reduce(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const int rows = task.m1 - task.m0;
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
                   nullptr, s);
      const float* v = s.regs[op.prologue_len - 1];
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

// A window store (plan v2): the epilogue over iter_dims, each value stored at the store view's
// element plus the int32 offset register, clamped into the tensor.
void run_window_store(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  const ViewRecord& v = run.plan.view(op.store_view_plus1 - 1);
  const TensorRecord& out = run.plan.tensor(op.out_tensor);
  char* base = run.tensor_base(op.out_tensor);
  const int rank = op.iter_rank;
  for (int m = task.m0; m < task.m1; ++m) {
    const int64_t lin0 = static_cast<int64_t>(m) * op.N + task.n0;
    for (int done = 0; done < task.n1 - task.n0; done += kSegment) {
      const int n = std::min(kSegment, task.n1 - task.n0 - done);
      eval_program(run, op.epilogue_at, op.epilogue_len, rank, op.iter_dims, lin0 + done, n, nullptr, s);
      const float* value = s.regs[op.epilogue_len - 1];
      const bits_alias* moved = reinterpret_cast<const bits_alias*>(s.regs[op.store_at_plus1 - 1]);
      int64_t idx[kMaxRank];
      int64_t rem = lin0 + done;
      for (int d = rank - 1; d >= 0; --d) {
        idx[d] = rem % op.iter_dims[d];
        rem /= op.iter_dims[d];
      }
      for (int e = 0; e < n; ++e) {
        int64_t at = v.offset + static_cast<int32_t>(moved[e]);
        for (int d = 0; d < rank; ++d) at += idx[d] * v.strides[d];
        at = std::min<int64_t>(std::max<int64_t>(at, 0), out.num_elements - 1);
        store_element(base, out.dtype, at, value[e]);
        for (int d = rank - 1; d >= 0; --d) {
          if (++idx[d] < op.iter_dims[d]) break;
          idx[d] = 0;
        }
      }
    }
  }
}

void run_map(const Run& run, const OpRecord& op, const TaskRecord& task, Scratch& s) {
  if (op.store_view_plus1 > 0) return run_window_store(run, op, task, s);
  for (int m = task.m0; m < task.m1; ++m)
    epilogue_store(run, op, static_cast<int64_t>(m) * op.N + task.n0, task.n1 - task.n0, nullptr, s);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits until counters[d] >= 1; false when the wait timed out or another worker failed.
bool wait_for(Run& run, int worker, int task, int dep, Clock::time_point deadline) {
  int32_t* counter = run.buf.counters + dep;
  const auto ready = [counter] { return __atomic_load_n(counter, __ATOMIC_ACQUIRE) >= 1; };
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

void worker_main(Run& run, int w) {
  const Header& h = run.plan.header();
  auto scratch = std::make_unique<Scratch>();
  uint64_t rng = run.opt.chaos_seed ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(w + 1));
  for (int q = run.plan.queue_begin(w); q < run.plan.queue_end(w); ++q) {
    const int t = run.plan.queue_task(q);
    const int64_t wait_begin = run.now_ns();
    if (run.opt.chaos_seed) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      std::this_thread::sleep_for(std::chrono::microseconds(rng % 200));
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(run.opt.timeout_ms);
    for (int e = run.plan.dep_begin(t); e < run.plan.dep_end(t); ++e)
      if (!wait_for(run, w, t, run.plan.dep(e), deadline)) return;
    const int64_t start = run.now_ns();
    const TaskRecord& task = run.plan.task(t);
    const OpRecord& op = run.plan.op(task.op);
    switch (op.kind) {
      case kOpMatmul: run_matmul(run, op, task, *scratch); break;
      case kOpReduce: run_reduce(run, op, task, *scratch); break;
      default: run_map(run, op, task, *scratch); break;
    }
    __atomic_store_n(run.buf.counters + t, 1, __ATOMIC_RELEASE);
    run.wake_sleepers();
    if (run.buf.profile) {
      int64_t* p = run.buf.profile + static_cast<int64_t>(t) * h.profile_words_per_task;
      p[0] = wait_begin;
      p[1] = start;
      p[2] = run.now_ns();
      p[3] = w;
    }
    if (run.failed.load(std::memory_order_relaxed)) return;
  }
}

// ---- plan checks ------------------------------------------------------------------------------------
struct Checker {
  const int32_t* words;
  size_t n;
  std::ostringstream err;
  bool ok = true;
  bool fail(const std::string& m) {
    if (ok) err << m;
    ok = false;
    return false;
  }
  bool section(int32_t at, int64_t count, int64_t width, const char* what) {
    if (at < 32 || count < 0 || at + count * width > static_cast<int64_t>(n))
      return fail(std::string("section ") + what + " out of bounds");
    return true;
  }
};

bool check_program(Checker& c, const PlanView& p, int at, int len, int rank, bool acc_ok,
                   const char* what, int op) {
  const Header& h = p.header();
  if (len < 1 || len > kMaxProgramLen || at < 0 || (at + len) * 4 > h.code_words)
    return c.fail("op " + std::to_string(op) + ": bad " + what + " program bounds");
  for (int i = 0; i < len; ++i) {
    const Instruction& ins = p.instruction(at + i);
    const int code = opcode_of(ins);
    const std::string where = "op " + std::to_string(op) + " " + what + " instruction " + std::to_string(i);
    if (dtype_size(dtype_of(ins)) == 0) return c.fail(where + ": bad dtype");
    if (code == kLoadAcc) {
      if (!acc_ok) return c.fail(where + ": LOAD_ACC without accumulator");
    } else if (code == kLoad || code == kLoadAt) {
      if (ins.a < 0 || ins.a >= h.num_views) return c.fail(where + ": bad view");
      if (p.view(ins.a).rank != rank) return c.fail(where + ": view rank != iteration rank");
      if (code == kLoadAt && (ins.b < 0 || ins.b >= i || !is_int_dtype(dtype_of(p.instruction(at + ins.b)))))
        return c.fail(where + ": LOAD_AT offset must be an earlier integer register");
    } else if (code == kConst) {
    } else if (code == kSelect) {
      if (ins.a < 0 || ins.a >= i || ins.b < 0 || ins.b >= i || ins.c < 0 || ins.c >= i)
        return c.fail(where + ": operand register out of range");
    } else if (is_unary(code)) {
      if (ins.a < 0 || ins.a >= i) return c.fail(where + ": operand register out of range");
    } else if (is_binary(code) || is_int_binary(code)) {
      if (ins.a < 0 || ins.a >= i || ins.b < 0 || ins.b >= i)
        return c.fail(where + ": operand register out of range");
    } else if (is_int_unary(code)) {
      if (ins.a < 0 || ins.a >= i) return c.fail(where + ": operand register out of range");
    } else {
      return c.fail(where + ": unknown opcode " + std::to_string(code));
    }
  }
  return true;
}

// Largest element index a view reaches over an iteration space; -1 if a stride is negative.
int64_t view_extent(const ViewRecord& v, const int64_t* dims, int rank) {
  int64_t hi = v.offset;
  for (int d = 0; d < rank; ++d) {
    if (v.strides[d] < 0 || dims[d] < 1) return -1;
    hi += (dims[d] - 1) * v.strides[d];
  }
  return v.offset < 0 ? -1 : hi;
}

bool check_view_in(Checker& c, const PlanView& p, int view, const int64_t* dims, int rank, int op) {
  const ViewRecord& v = p.view(view);
  if (v.tensor < 0 || v.tensor >= p.header().num_tensors)
    return c.fail("view " + std::to_string(view) + ": bad tensor");
  const int64_t hi = view_extent(v, dims, rank);
  if (hi < 0 || hi >= p.tensor(v.tensor).num_elements)
    return c.fail("op " + std::to_string(op) + ": view " + std::to_string(view) +
                  " reads outside tensor " + std::to_string(v.tensor));
  return true;
}

}  // namespace

std::string check_plan(const int32_t* words, size_t num_words, const PersistentBuffers& buf) {
  Checker c{words, num_words, {}, true};
  if (num_words < 32) return "plan shorter than its header";
  const PlanView p{words};
  const Header& h = p.header();
  if (h.magic != kMagic) return "bad plan magic (not an ark plan)";
  if (h.version < 1 || h.version > kVersion)
    return "plan version " + std::to_string(h.version) + " not supported (this executor knows 1.." +
           std::to_string(kVersion) + ")";
  if (h.total_words != static_cast<int64_t>(num_words)) return "plan length != header.total_words";
  if (h.num_workers < 1 || h.num_workers > 1024) return "bad num_workers";
  if (h.num_counters != h.num_tasks) return "num_counters != num_tasks";
  c.section(h.tensors_at, h.num_tensors, 24, "tensors") && c.section(h.views_at, h.num_views, 16, "views") &&
      c.section(h.ops_at, h.num_ops, 40, "ops") && c.section(h.tasks_at, h.num_tasks, 8, "tasks") &&
      c.section(h.dep_offsets_at, h.num_tasks + 1, 1, "dep offsets") &&
      c.section(h.deps_at, h.num_dep_edges, 1, "deps") &&
      c.section(h.queue_offsets_at, h.num_workers + 1, 1, "queue offsets") &&
      c.section(h.queues_at, h.num_tasks, 1, "queues") && c.section(h.code_at, h.code_words, 1, "code") &&
      c.section(h.names_at, (h.names_bytes + 3) / 4, 1, "names");
  if (!c.ok) return c.err.str();
  if (static_cast<size_t>(h.num_args) != buf.args.size()) return "operand count != plan num_args";
  if (static_cast<size_t>(h.num_outputs) != buf.results.size()) return "result count != plan num_outputs";
  if (static_cast<size_t>(h.workspace_bytes) > buf.workspace_bytes) return "workspace result too small";
  for (int t = 0; t < h.num_tensors; ++t) {
    const TensorRecord& r = p.tensor(t);
    const std::string where = "tensor " + std::to_string(t);
    if (dtype_size(r.dtype) == 0 || r.rank < 0 || r.rank > kMaxRank || r.num_elements < 0)
      return where + ": bad dtype / rank / size";
    const size_t bytes = static_cast<size_t>(r.num_elements) * dtype_size(r.dtype);
    if (r.storage == kStorageArg) {
      if (r.storage_index < 0 || r.storage_index >= h.num_args || buf.arg_bytes[r.storage_index] < bytes)
        return where + ": operand index or size mismatch";
    } else if (r.storage == kStorageResult) {
      if (r.storage_index < 0 || r.storage_index >= h.num_outputs ||
          buf.result_bytes[r.storage_index] < bytes)
        return where + ": result index or size mismatch";
      if (r.alias_plus1 != 0) {  // updated in place: XLA must have passed the operand's buffer
        const int a = r.alias_plus1 - 1;
        if (a < 0 || a >= h.num_args || buf.args[a] != buf.results[r.storage_index])
          return where + ": aliased result is not its operand's buffer";
      }
    } else if (r.storage == kStorageWorkspace) {
      if (r.byte_offset < 0 || static_cast<size_t>(r.byte_offset) + bytes > buf.workspace_bytes)
        return where + ": outside the workspace";
    } else {
      return where + ": bad storage kind";
    }
  }
  for (int i = 0; i < h.num_ops; ++i) {
    const OpRecord& op = p.op(i);
    const std::string where = "op " + std::to_string(i);
    if (op.out_tensor < 0 || op.out_tensor >= h.num_tensors) return where + ": bad output tensor";
    const TensorRecord& out = p.tensor(op.out_tensor);
    if (out.storage == kStorageArg) return where + ": writes an operand";
    const bool window = op.store_view_plus1 != 0;
    int64_t window_size = 1;
    if (window) {
      if (op.kind != kOpMap || op.iter_rank < 0 || op.iter_rank > kMaxRank || out.alias_plus1 == 0)
        return where + ": window store must be a map op writing an aliased result";
      for (int d = 0; d < op.iter_rank; ++d) window_size *= op.iter_dims[d];
      const int sv = op.store_view_plus1 - 1;
      if (sv < 0 || sv >= h.num_views || p.view(sv).tensor != op.out_tensor || p.view(sv).rank != op.iter_rank)
        return where + ": bad store view";
      if (!check_view_in(c, p, sv, op.iter_dims, op.iter_rank, i)) return c.err.str();
      if (op.store_at_plus1 < 1 || op.store_at_plus1 > op.epilogue_len || op.epilogue_len > kMaxProgramLen ||
          op.epilogue_at < 0 || (op.epilogue_at + op.epilogue_len) * 4 > h.code_words ||
          !is_int_dtype(dtype_of(p.instruction(op.epilogue_at + op.store_at_plus1 - 1))))
        return where + ": store_at is not an integer register of the epilogue";
    }
    if (op.B < 1 || op.M < 1 || op.N < 1 || op.B * op.M * op.N != (window ? window_size : out.num_elements))
      return where + ": B*M*N != output size";
    if (op.name_at < 0 || op.name_len < 0 || op.name_at + op.name_len > h.names_bytes)
      return where + ": bad name";
    if (op.kind == kOpMatmul) {
      if (op.a_view < 0 || op.a_view >= h.num_views || op.b_view < 0 || op.b_view >= h.num_views)
        return where + ": bad operand view";
      const int64_t ad[3] = {op.B, op.M, op.K}, bd[3] = {op.B, op.K, op.N};
      if (op.K < 1 || p.view(op.a_view).rank != 3 || p.view(op.b_view).rank != 3)
        return where + ": matmul views must have rank 3 and K >= 1";
      if (!check_view_in(c, p, op.a_view, ad, 3, i) || !check_view_in(c, p, op.b_view, bd, 3, i))
        return c.err.str();
    } else if (op.kind == kOpReduce) {
      if (op.iter_rank < op.kept_rank || op.iter_rank > kMaxRank || op.kept_rank < 0 || op.K < 1)
        return where + ": bad reduce iteration space";
      if (op.reduce_kind < 0 || op.reduce_kind >= kNumReduceKinds) return where + ": bad reduce kind";
      int64_t kept = 1, red = 1;
      for (int d = 0; d < op.iter_rank; ++d) (d < op.kept_rank ? kept : red) *= op.iter_dims[d];
      if (kept != op.M || red != op.K) return where + ": iteration space != M x K";
      if (!check_program(c, p, op.prologue_at, op.prologue_len, op.iter_rank, false, "prologue", i))
        return c.err.str();
      for (int k = 0; k < op.prologue_len; ++k) {
        const Instruction& ins = p.instruction(op.prologue_at + k);
        if ((opcode_of(ins) == kLoad || opcode_of(ins) == kLoadAt) &&
            !check_view_in(c, p, ins.a, op.iter_dims, op.iter_rank, i))
          return c.err.str();
      }
    } else if (op.kind != kOpMap) {
      return where + ": unknown op kind";
    }
    const int epi_rank = window ? op.iter_rank : out.rank;
    const int64_t* epi_dims = window ? op.iter_dims : out.dims;
    if (!check_program(c, p, op.epilogue_at, op.epilogue_len, epi_rank, op.kind != kOpMap, "epilogue", i))
      return c.err.str();
    for (int k = 0; k < op.epilogue_len; ++k) {
      const Instruction& ins = p.instruction(op.epilogue_at + k);
      if ((opcode_of(ins) == kLoad || opcode_of(ins) == kLoadAt) &&
          !check_view_in(c, p, ins.a, epi_dims, epi_rank, i))
        return c.err.str();
    }
  }
  for (int t = 0; t < h.num_tasks; ++t) {
    const TaskRecord& task = p.task(t);
    const std::string where = "task " + std::to_string(t);
    if (task.op < 0 || task.op >= h.num_ops) return where + ": bad op";
    const OpRecord& op = p.op(task.op);
    if (task.b0 < 0 || task.b1 > op.B || task.b0 >= task.b1 || task.m0 < 0 || task.m1 > op.M ||
        task.m0 >= task.m1 || task.n0 < 0 || task.n1 > op.N || task.n0 >= task.n1)
      return where + ": tile outside its op";
    if (p.dep_begin(t) < 0 || p.dep_end(t) < p.dep_begin(t) || p.dep_end(t) > h.num_dep_edges)
      return where + ": bad dependency offsets";
    for (int e = p.dep_begin(t); e < p.dep_end(t); ++e)
      if (p.dep(e) < 0 || p.dep(e) >= h.num_tasks || p.dep(e) == t) return where + ": bad dependency";
  }
  std::vector<char> seen(h.num_tasks, 0);
  if (p.queue_begin(0) != 0 || p.queue_end(h.num_workers - 1) != h.num_tasks) return "queue offsets do not cover all tasks";
  for (int w = 0; w < h.num_workers; ++w) {
    if (p.queue_end(w) < p.queue_begin(w)) return "bad queue offsets";
    for (int q = p.queue_begin(w); q < p.queue_end(w); ++q) {
      const int t = p.queue_task(q);
      if (t < 0 || t >= h.num_tasks || seen[t]++) return "task " + std::to_string(t) + " queued twice or out of range";
    }
  }
  return "";
}

PersistentResult run_plan(const int32_t* words, const PersistentBuffers& buffers,
                          const PersistentOptions& options) {
  Run run(PlanView{words}, buffers, options);
  const Header& h = run.plan.header();
  std::memset(buffers.counters, 0, sizeof(int32_t) * h.num_tasks);
  if (buffers.profile)
    std::memset(buffers.profile, 0, sizeof(int64_t) * h.num_tasks * h.profile_words_per_task);
  std::function<void(int)> job = [&run](int w) { worker_main(run, w); };
  if (h.num_workers == 1) {
    job(0);
  } else {
    pool_for_this_thread(h.num_workers - 1).run(h.num_workers, job);
  }
  if (run.failed.load()) return run.error;
  return {};
}

}  // namespace jax_ark::cpu
