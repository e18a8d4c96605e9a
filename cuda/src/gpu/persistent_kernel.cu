// The CUDA executor of a persistent-kernel plan (docs/plan_format.md, docs/cuda_executor.md).
//
// ONE launch runs the whole plan: grid = num_workers blocks (all co-resident: cooperative launch,
// occupancy checked), block w walks worker queue w. Per task:
//   1. prefetch the NEXT task's streamed weights into L2 (overlaps this task's dependency wait),
//   2. wait for every dependency d: counters[d] >= 1, the waits spread over all 256 threads
//      (one L2 round trip for a layer with 128 producer tiles, not 128), each bounded in time,
//   3. run the tile (GEMV / GEMM / row reduction / map) and its epilogue program,
//   4. __syncthreads(), then thread 0: fence + st.release.gpu counters[t] = 1.
// A timed-out wait writes a PersistentErrorRecord into host-mapped memory and aborts the run.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "jax_ark/gpu/communicator_device.hpp"
#include "jax_ark/gpu/cooperative_launch.cuh"
#include "jax_ark/gpu/persistent_comm_device.hpp"
#include "jax_ark/gpu/persistent_launch.hpp"
#include "jax_ark/gpu/persistent_sync_device.cuh"
#include "jax_ark/gpu/tile_ops_device.cuh"
#include "jax_ark/plan_format.hpp"
#include "jax_ark/tile_ops.hpp"

namespace jax_ark::gpu {
namespace {

namespace pf = jax_ark::plan;
using tile::DType;
using tile::kBlockThreads;

// Bad-plan reasons reported in PersistentErrorRecord::detail.
enum BadPlanReason : int32_t {
  kBadHeader = 1,          // magic / version / header_words
  kBadCounts = 2,          // num_workers / num_tasks / num_args / num_outputs disagree with the call
  kBadTask = 3,            // task id, op id or tile bounds out of range
  kBadDependency = 4,      // dependency id out of range
  kBadProgram = 5,         // opcode, register operand or program length invalid
  kBadView = 6,            // view / tensor index, rank or storage invalid
  kBadWorkspace = 7,       // workspace_bytes larger than the workspace result
  kBadOpKind = 8,
  kBadLoop = 9,            // v3 loop section: out of the plan, bad trip count or op ranges
  kCommUnsupported = 10,   // plan v3 PUT ops (group_size != 0) in a call without a group
  kWhileGuard = 11,        // a while loop's predicate was still true at its guard's last iteration
  kCpuOnlyOp = 12,         // a put read in place (its readers would read peers' tensors): CPU only
};

struct KernelParams {
  const int32_t* plan;
  int64_t plan_words;
  void* args[kPersistentMaxArgs];
  void* results[kPersistentMaxResults];
  int32_t num_args, num_results;
  uint8_t* workspace;
  int64_t workspace_bytes;
  int32_t* counters;
  int64_t* profile;
  int32_t num_workers, num_tasks;
  uint64_t chaos_seed;
  PersistentRunState run;
  PersistentCommDevice comm;  // n == 0: the call has no communication group
  RankControl* comm_control;  // comm.epoch == 0: the epoch's device word (PersistentLaunchArgs)
  int32_t skip;               // harness only: this rank's blocks return at once (forced timeouts)
};
static_assert(sizeof(KernelParams) < 4000, "kernel parameters must fit the 4 KiB parameter space");

// A LOAD instruction with its view and tensor resolved once per task (not once per element).
struct ResolvedLoad {
  const void* base;
  int32_t dtype, rank;
  int64_t offset;
  int64_t strides[pf::kMaxRank];
  int64_t num_elements;  // LOAD_AT clamps its moved element index into [0, num_elements)
};

constexpr int kMaxCode = 2 * pf::kMaxProgramLen;  // prologue followed by epilogue

// Per-task state staged in shared memory by the whole block.
struct TaskSmem {
  pf::Instruction code[kMaxCode];
  ResolvedLoad loads[kMaxCode];
  int64_t out_dims[pf::kMaxRank];
  int64_t iter_dims[pf::kMaxRank];
  int32_t out_rank, out_dtype;
  int64_t iter;        // v3: the innermost loop iteration being run (0 outside loops)
  int64_t outer_iter;  // v3: the iteration of the loop around that one (0 unless nested)
  int64_t out_offset;  // v3: element offset of the output slice (a stacked op: slice * its size)
  // v2 window store (MAP with store_view_plus1): out_rank / out_dims are the window (iter_dims);
  // each value goes to `store`'s element + int32 register store_reg, clamped into the tensor.
  // A scatter fold (REDUCE with store_view_plus1): out_rank / out_dims stay the output's (the
  // epilogue gives its first values), store_reg is a PROLOGUE register (run_scatter_fold).
  ResolvedLoad store;
  int32_t store_reg;  // -1: an ordinary op
  int32_t bad;     // nonzero: a BadPlanReason found by thread 0 before the staging loop
  int32_t bad_instruction;  // nonzero: kBadProgram found by any thread in the staging loop
  int32_t flag;    // per-task verdict broadcast by thread 0 (bad task or aborted run)
  // The header verdict has its own word: thread 0 writes `flag` for the first task right after the
  // header barrier, while a slower thread may not have read the header verdict yet.
  int32_t header_bad;
  // Which (op, iteration, outer iteration) the staged fields above describe (staged_op = -1:
  // none). Staging depends on nothing else, so consecutive tasks of one op in one iteration (a
  // worker's several tiles of a big op) reuse it: no plan reads, checks or barriers (issue 9 item 5).
  int32_t staged_op;
  int64_t staged_iter, staged_outer_iter;
  // 1 when every dim of out_dims / iter_dims is below 2^31: unravel() may then divide in 32 bits
  // (a 64-bit division is a ~70-instruction subroutine; it ran per dim of every element).
  int32_t out_dims_narrow, iter_dims_narrow;
  int32_t first_bad_q;  // the one-time queue check: lowest bad queue position (INT32_MAX: none)
  // Bit q: peer rank q is known to have entered this call (PUT tasks wait for it once per block).
  unsigned long long peers_entered;
  // The call's view of its group: p.comm with the epoch filled in from p.comm_control when the
  // launch carries none (set by thread 0 before the header barrier; the protocol reads it here).
  PersistentCommDevice comm;
  int32_t rank;  // LOAD_RANK: this call's rank in the plan's group (0 without one)
};

// ---- plan access helpers ---------------------------------------------------------------------

__device__ __forceinline__ void* tensor_base(const KernelParams& p, const pf::TensorRecord& t) {
  switch (t.storage) {
    case pf::kStorageArg:
      return t.storage_index >= 0 && t.storage_index < p.num_args ? p.args[t.storage_index] : nullptr;
    case pf::kStorageResult:
      return t.storage_index >= 0 && t.storage_index < p.num_results ? p.results[t.storage_index]
                                                                     : nullptr;
    case pf::kStorageWorkspace: {
      const int64_t bytes = t.num_elements * pf::dtype_size(t.dtype);
      if (t.byte_offset < 0 || t.byte_offset + bytes > p.workspace_bytes) return nullptr;
      // Plans with puts keep their inboxes, and only them, in [0, inbox_bytes) of the workspace
      // (the planner places them first): those bytes live in the group's symmetric region, where
      // peers can write them (persistent_comm_device.hpp).
      if (t.byte_offset < p.comm.inbox_bytes)
        return t.byte_offset + bytes <= p.comm.inbox_bytes
                   ? inbox_area(p.comm, p.comm.local) + t.byte_offset
                   : nullptr;
      return p.workspace + t.byte_offset;
    }
    default: return nullptr;
  }
}

__device__ __forceinline__ const void* element_ptr(const void* base, int32_t dtype, int64_t e) {
  return static_cast<const char*>(base) + e * pf::dtype_size(dtype);
}

// 64-bit division is a ~70-instruction subroutine per dim; out of line, since unravel_narrow below
// calls it only for outputs of 2^31 or more elements, to keep it out of the inlined epilogues.
__device__ __noinline__ void unravel(int64_t flat, const int64_t* dims, int rank, int64_t* idx) {
  for (int d = rank - 1; d >= 0; --d) {
    idx[d] = flat % dims[d];
    flat /= dims[d];
  }
}

// The same in 32-bit unsigned arithmetic when that is exact: every dim below 2^31 (`narrow`,
// decided once per staging) and 0 <= flat < 2^31. Host-checked plans index outputs and iteration
// spaces of at most 2^31 - 1 elements per op dim (B, M, N, K < 2^31), so the narrow path is the one
// that runs unless a tensor has 2^31 or more elements.
__device__ __forceinline__ void unravel_narrow(int64_t flat, const int64_t* dims, int rank,
                                               bool narrow, int64_t* idx) {
  if (!narrow || flat < 0 || flat > INT32_MAX) return unravel(flat, dims, rank, idx);
  uint32_t f = static_cast<uint32_t>(flat);
  for (int d = rank - 1; d >= 0; --d) {
    const uint32_t n = static_cast<uint32_t>(dims[d]);
    const uint32_t q = f / n;
    idx[d] = f - q * n;
    f = q;
  }
}

__device__ __forceinline__ bool dims_narrow(const int64_t* dims, int rank) {
  bool ok = true;
  for (int d = 0; d < rank; ++d) ok = ok && dims[d] >= 1 && dims[d] <= INT32_MAX;
  return ok;
}

// Element e of a LOAD's tensor as a register: integer elements as their bits (narrow ones sign- or
// zero-extended to 32), float ones as float32 (plan_format.hpp).
__device__ __forceinline__ float load_register(const ResolvedLoad& l, int64_t e) {
  if (l.dtype == pf::kInt32 || l.dtype == pf::kUInt32)
    return __uint_as_float(__ldcg(static_cast<const unsigned int*>(l.base) + e));
  if (pf::is_int_dtype(l.dtype)) return pf::load_element(l.base, l.dtype, e);
  return tile::load_f32(l.base, static_cast<DType>(l.dtype), e);
}

// Evaluates code[begin, begin + len) for one element (docs/plan_format.md, "Programs"): instruction
// i writes register i, and its result is rounded to the instruction's dtype. Indices were checked
// while staging, so register reads stay inside r[].
__device__ float eval_program(const TaskSmem& s, int begin, int len, const int64_t* idx, float acc,
                              int keep = -1, float* kept = nullptr) {
  float r[pf::kMaxProgramLen];
  float v = acc;
  for (int i = 0; i < len; ++i) {
    const pf::Instruction ins = s.code[begin + i];
    const int32_t opc = ins.op_and_dtype & 0xFFFF;
    const int32_t dt = (ins.op_and_dtype >> 16) & 0xFF;
    if (opc == pf::kLoadAcc) {
      v = acc;
    } else if (opc == pf::kLoad) {
      const ResolvedLoad& l = s.loads[begin + i];
      int64_t e = l.offset;
      for (int d = 0; d < l.rank; ++d) e += idx[d] * l.strides[d];
      v = load_register(l, e);
    } else if (opc == pf::kLoadAt) {
      const ResolvedLoad& l = s.loads[begin + i];
      int64_t e = l.offset + __float_as_int(r[ins.b]);
      for (int d = 0; d < l.rank; ++d) e += idx[d] * l.strides[d];
      e = e < 0 ? 0 : (e >= l.num_elements ? l.num_elements - 1 : e);
      v = load_register(l, e);
    } else if (opc == pf::kConst) {
      v = __int_as_float(ins.a);
    } else if (opc == pf::kLoadIter) {
      v = __int_as_float(static_cast<int32_t>(s.iter));
    } else if (opc == pf::kLoadRank) {
      v = __int_as_float(s.rank);
    } else if (opc == pf::kSelect) {
      v = r[ins.a] != 0.f ? r[ins.c] : r[ins.b];
    } else if (pf::is_unary(opc)) {
      v = pf::apply_unary(opc, r[ins.a], ins.b);
    } else if (pf::is_int_binary(opc)) {
      v = __uint_as_float(pf::apply_int_binary(opc, __float_as_uint(r[ins.a]), __float_as_uint(r[ins.b])));
    } else if (pf::is_int_unary(opc)) {
      v = __uint_as_float(pf::apply_int_unary(opc, __float_as_uint(r[ins.a]), ins.b));
    } else {
      v = pf::apply_binary(opc, r[ins.a], r[ins.b]);
    }
    v = pf::round_to(v, dt);
    r[i] = v;
  }
  if (keep >= 0 && keep < len) *kept = r[keep];  // window stores: the offset register
  return v;
}

// Stores the epilogue's result with the plan's rounding (tile_ops.hpp, shared with the CPU executor).
__device__ __forceinline__ void store_out(void* base, int32_t dtype, int64_t flat, float v) {
  pf::store_element(base, dtype, flat, v);
}

__device__ void copy_name(const pf::PlanView& plan, int32_t op, char* dst) {
  int n = 0;
  if (op >= 0 && op < plan.header().num_ops) {
    const pf::OpRecord& o = plan.op(op);
    const char* src = plan.name_chars() + o.name_at;
    if (o.name_at >= 0 && o.name_len > 0 && o.name_at + o.name_len <= plan.header().names_bytes) {
      n = o.name_len < kPersistentNameChars - 1 ? o.name_len : kPersistentNameChars - 1;
      for (int i = 0; i < n; ++i) dst[i] = src[i];
    }
  }
  dst[n] = '\0';
}

// Called by ONE thread. Writes the record if this is the run's first failure.
__device__ void report(const KernelParams& p, const pf::PlanView& plan, int32_t status,
                       int32_t worker, int32_t task, int32_t dep_task, int32_t seen,
                       int32_t detail, uint64_t waited_ns) {
  if (!persistent_raise_abort(p.run)) return;
  PersistentErrorRecord rec{};
  rec.status = status;
  rec.worker = worker;
  rec.task = task;
  // Any report with task >= 0 comes after the header and section checks, so the task record is
  // readable; a bad-plan verdict about a task's program or views then names its op too.
  const bool task_ok = task >= 0 && task < p.num_tasks;
  rec.op = task_ok ? plan.task(task).op : -1;
  rec.dep_task = dep_task;
  rec.dep_op = dep_task >= 0 && dep_task < p.num_tasks ? plan.task(dep_task).op : -1;
  rec.counter_seen = seen;
  rec.detail = detail;
  rec.waited_ns = waited_ns;
  rec.call_seq = p.run.seq;
  rec.rank = p.comm.n > 0 ? p.comm.rank : -1;
  rec.peer = rec.slot = rec.run = -1;
  if (status != kPersistentBadPlan || detail != kBadHeader) {
    copy_name(plan, rec.op, rec.op_name);
    copy_name(plan, rec.dep_op, rec.dep_op_name);
  }
  persistent_publish_record(p.run, rec);
}

// Called by ONE thread of a PUT task that gave up waiting for peer rank `peer`: for its tile of
// inbox slot `slot` of run `run`, or (slot -1) for the peer to enter this call at all.
__device__ void report_peer_timeout(const KernelParams& p, const pf::PlanView& plan, int32_t worker,
                                    int32_t task, int32_t peer, int32_t slot, int32_t run,
                                    uint64_t seen, uint64_t waited_ns) {
  if (!persistent_raise_abort(p.run)) return;
  PersistentErrorRecord rec{};
  rec.status = kPersistentPeerTimeout;
  rec.worker = worker;
  rec.task = task;
  rec.op = plan.task(task).op;  // task was checked by the queue pass
  rec.dep_task = -1;
  rec.dep_op = -1;
  rec.counter_seen = static_cast<int32_t>(seen & 0xFFFFFFFFu);  // runs delivered (the low half)
  rec.waited_ns = waited_ns;
  rec.call_seq = p.run.seq;
  rec.rank = p.comm.rank;
  rec.peer = peer;
  rec.slot = slot;
  rec.run = run;
  copy_name(plan, rec.op, rec.op_name);
  rec.dep_op_name[0] = '\0';
  persistent_publish_record(p.run, rec);
}

// Every section lies inside the word array at an even offset (int64 fields need 8-byte alignment).
__device__ bool sections_fit(const pf::Header& h) {
  const int64_t total = h.total_words;
  auto fits = [total](int64_t at, int64_t count, int64_t words_each) {
    return count == 0 || (at >= 32 && at % 2 == 0 && count > 0 && at + count * words_each <= total);
  };
  return h.num_workers >= 1 && h.num_tasks >= 0 && h.num_ops >= 0 && h.num_tensors >= 0 &&
         h.num_views >= 0 && h.num_dep_edges >= 0 && h.code_words >= 0 && h.names_bytes >= 0 &&
         fits(h.tensors_at, h.num_tensors, 24) && fits(h.views_at, h.num_views, 16) &&
         fits(h.ops_at, h.num_ops, 40) && fits(h.tasks_at, h.num_tasks, 8) &&
         fits(h.dep_offsets_at, h.num_tasks + 1, 1) && fits(h.deps_at, h.num_dep_edges, 1) &&
         fits(h.queue_offsets_at, h.num_workers + 1, 1) && fits(h.queues_at, h.num_tasks, 1) &&
         fits(h.code_at, h.code_words, 1) && fits(h.names_at, (h.names_bytes + 3) / 4, 1);
}

// v3 loop section (plan_format.hpp LoopView), checked by every block before it walks its queue:
// inside the plan (with the outer-stride array when flagged), loops ordered by first op, each nested
// one inside its top-level parent, loops of one parent disjoint, trip counts in 1..2^24 (runs over a
// nest too), op loop ids the innermost loop holding the op, stacked ops' outputs (trip_count, ...).
// The host's check_plan checks the same (and view extents over every iteration) when the plan is
// checked on the host.
__device__ bool loops_fit(const pf::PlanView& plan) {
  const pf::Header& h = plan.header();
  const pf::LoopView lv{plan.words};
  if (h.version < 3) return true;  // loops_at is a reserved word before v3: LoopView ignores it
  if (h.loops_at == 0) return true;
  const int64_t at = h.loops_at;
  if (at < 32 || at % 2 || at + 2 > h.total_words) return false;
  const int64_t L = plan.words[at];
  const int32_t flags = plan.words[at + 1];
  if (flags != 0 && flags != pf::kLoopsOuterStrides) return false;
  const int64_t stride_arrays = flags ? 2 : 1;
  if (L < 1 || L > h.num_ops ||
      at + 2 + 8 * L + 2 * int64_t{h.num_ops} + stride_arrays * 2 * int64_t{h.num_views} > h.total_words)
    return false;
  for (int l = 0; l < L; ++l) {
    const pf::LoopRecord& r = lv.loop(l);
    if (r.trip_count < 1 || r.trip_count > (int64_t{1} << 24) || r.first_op < 0 ||
        r.first_op >= r.end_op || r.end_op > h.num_ops || r.parent_plus1 < 0 || r.parent_plus1 > l ||
        (l > 0 && lv.loop(l - 1).first_op > r.first_op))
      return false;
    const int32_t parent = r.parent_plus1 - 1;
    if (parent >= 0) {
      const pf::LoopRecord& pr = lv.loop(parent);
      if (pr.parent_plus1 != 0 || r.first_op < pr.first_op || r.end_op > pr.end_op ||
          r.trip_count * pr.trip_count > (int64_t{1} << 24))
        return false;
    }
    for (int k = l - 1; k >= 0; --k)  // the previous loop with the same parent ends before this one
      if (lv.loop(k).parent_plus1 == r.parent_plus1) {
        if (lv.loop(k).end_op > r.first_op) return false;
        break;
      }
  }
  for (int i = 0; i < h.num_ops; ++i) {
    int32_t want = -1;  // the innermost loop holding op i: parents come first, so the last one
    for (int l = 0; l < L; ++l)
      if (lv.loop(l).first_op <= i && i < lv.loop(l).end_op) want = l;
    const pf::OpLoopRecord& r = lv.op_records()[i];
    if (r.loop != want || r.stacked < 0 || r.stacked > pf::kStackedReversed) return false;
    if (want >= 0 && lv.while_pred_op(want) == i) {  // a while loop's predicate: read as bools
      const pf::LoopRecord& wl = lv.loop(want);
      const int32_t out = plan.op(i).out_tensor;
      if (r.stacked != pf::kStackedForward || wl.parent_plus1 != 0 || out < 0 || out >= h.num_tensors ||
          plan.tensor(out).dtype != pf::kBool || plan.tensor(out).rank != 1 || wl.pred_task < 0 ||
          wl.pred_task >= h.num_tasks || plan.task(wl.pred_task).op != i)
        return false;
    }
    if (r.stacked) {
      const int32_t out = plan.op(i).out_tensor;
      if (want < 0 || out < 0 || out >= h.num_tensors || plan.tensor(out).rank < 1 ||
          plan.tensor(out).dims[0] != lv.loop(want).trip_count)
        return false;
    }
  }
  return true;
}

// Why queued task `task` cannot run (a BadPlanReason), 0 if it can: the task id, its op id and tile
// bounds in range, a known op kind. Checked once per call for every queued task (the kernel's
// queue pass), not per run: records are read-only for the whole call.
__device__ int32_t task_problem(const KernelParams& p, const pf::PlanView& plan, int32_t task) {
  if (task < 0 || task >= p.num_tasks) return kBadTask;
  const pf::TaskRecord& t = plan.task(task);
  if (t.op < 0 || t.op >= plan.header().num_ops) return kBadTask;
  const pf::OpRecord& o = plan.op(t.op);
  if (t.b0 < 0 || t.b1 > o.B || t.m0 < 0 || t.m1 > o.M || t.n0 < 0 || t.n1 > o.N || t.b0 > t.b1 ||
      t.m0 > t.m1 || t.n0 > t.n1)
    return kBadTask;
  if (o.kind == pf::kOpPut) return p.comm.n == 0 ? kCommUnsupported : o.read_in_place ? kCpuOnlyOp : 0;
  if (o.kind != pf::kOpMatmul && o.kind != pf::kOpReduce && o.kind != pf::kOpMap) return kBadOpKind;
  return 0;
}

// ---- while loops ----------------------------------------------------------------------------

// A while loop's check point (plan_format.hpp QueueCursor), block-uniform: thread 0 waits for the
// predicate task's run of this iteration (acquire), reads its slot (written once per call, so every
// block reads the same value); a false predicate ends this block's segment tasks' counters at their
// trip count (release: everything after the loop sees it finished). Every thread then resolves its
// copy of the cursor the same way. False when the run failed (timeout, abort, the guard).
__device__ bool while_check(const KernelParams& p, const pf::PlanView& plan, const pf::LoopView& lv,
                            pf::QueueCursor& cursor, int worker, TaskSmem& s) {
  const pf::LoopRecord& loop = lv.loop(cursor.top_loop);
  const int64_t i = cursor.iters[0];
  if (threadIdx.x == 0) {
    const int32_t waiting = cursor.q < cursor.end_q ? plan.queue_task(cursor.q) : loop.pred_task;
    const proto::AtomicRef<uint32_t, proto::Scope::kGpu> c(
        reinterpret_cast<const uint32_t*>(p.counters + loop.pred_task));
    uint64_t t0 = 0, waited = 0;
    bool aborted = false;
    uint32_t seen = 0;
    const bool ready = proto::wait_at_least(
        c, static_cast<uint32_t>(i + 1),
        [&] {
          if (t0 == 0) t0 = proto::now_ns();
          if (persistent_aborted(p.run)) return aborted = true;
          waited = proto::now_ns() - t0;
          return waited > p.run.timeout_ns;
        },
        32u, &seen);
    int32_t verdict = 0;  // 0 failed, 1 run the body, 2 the loop ended
    if (!ready) {
      if (!aborted)
        report(p, plan, kPersistentTimeout, worker, waiting, loop.pred_task, static_cast<int32_t>(seen), 0,
               waited);
    } else {
      const pf::TensorRecord& out = plan.tensor(plan.op(loop.pred_op_plus1 - 1).out_tensor);
      // After the acquire above (a plain load would do; volatile keeps it from being hoisted).
      const bool taken = static_cast<const volatile uint8_t*>(tensor_base(p, out))[i] != 0;
      if (taken && cursor.guard_exceeded()) {
        report(p, plan, kPersistentBadPlan, worker, waiting, loop.pred_task, 0, kWhileGuard, 0);
      } else if (taken) {
        verdict = 1;
      } else {
        for (int32_t q = cursor.seg_begin[0]; q < cursor.seg_end[0]; ++q)
          persistent_release_task(p.counters, plan.queue_task(q), static_cast<uint32_t>(loop.trip_count));
        verdict = 2;
      }
    }
    s.flag = verdict;
  }
  __syncthreads();
  const int32_t verdict = s.flag;
  __syncthreads();  // s.flag is rewritten by the next check point
  if (verdict == 0) return false;
  cursor.resolve_check(plan, lv, verdict == 1);
  return true;
}

// ---- dependency wait --------------------------------------------------------------------------

// All threads: thread j waits for dependencies j, j + 256, ... of the task (persistent_wait_deps,
// shared with the host tests). Returns false (block-uniformly) if the run was aborted, by this
// block's timeout or bad dependency, or by another block.
__device__ bool wait_dependencies(const KernelParams& p, const pf::PlanView& plan, int task,
                                  int worker, const int64_t* iters, bool aborted_before = false) {
  const DepWaitResult r = persistent_wait_deps(plan, p.num_tasks, p.counters, task,
                                               static_cast<int32_t>(threadIdx.x), kBlockThreads, p.run,
                                               iters);
  if (r.status == DepWait::kBadPlan)
    report(p, plan, kPersistentBadPlan, worker, task, r.dep_task, 0, kBadDependency, 0);
  else if (r.status == DepWait::kTimedOut)
    report(p, plan, kPersistentTimeout, worker, task, r.dep_task, static_cast<int32_t>(r.seen), 0,
           r.waited_ns);
  // Orders the acquire loads of every waiting thread before any thread's tile reads (CTA scope).
  return !__syncthreads_or(r.status != DepWait::kReady || aborted_before);
}

// ---- L2 prefetch of a MATMUL task's streamed weight operand ------------------------------------

constexpr int64_t kPrefetchBytesPerTask = 64 * 1024;

__device__ void prefetch_task_weights(const KernelParams& p, const pf::PlanView& plan, int task,
                                      int64_t iter, int64_t outer_iter) {
  const pf::TaskRecord& t = plan.task(task);
  if (t.op < 0 || t.op >= plan.header().num_ops) return;
  const pf::OpRecord& op = plan.op(t.op);
  if (op.kind != pf::kOpMatmul || op.b_view < 0 || op.b_view >= plan.header().num_views) return;
  const pf::ViewRecord& bv = plan.view(op.b_view);
  if (bv.tensor < 0 || bv.tensor >= plan.header().num_tensors) return;
  const pf::TensorRecord& tb = plan.tensor(bv.tensor);
  if (tb.storage != pf::kStorageArg || bv.strides[2] != 1 || t.n1 <= t.n0) return;
  const void* base = tensor_base(p, tb);
  if (base == nullptr) return;
  const int sz = pf::dtype_size(tb.dtype);
  const int64_t offset = bv.offset + pf::LoopView{plan.words}.view_shift(op.b_view, iter, outer_iter);
  const void* first = element_ptr(base, tb.dtype, offset + t.b0 * bv.strides[0] + t.n0);
  tile::prefetch_l2_region(first, op.K, static_cast<int64_t>(t.n1 - t.n0) * sz,
                           bv.strides[1] * sz, kPrefetchBytesPerTask);
}

// ---- staging: programs, resolved loads, output shape -----------------------------------------

__device__ void stage_task(const KernelParams& p, const pf::PlanView& plan, int32_t op_index,
                           const pf::OpRecord& op, int64_t iter, int64_t outer_iter, TaskSmem& s) {
  const pf::Header& h = plan.header();
  const pf::LoopView lv{plan.words};
  const int plen = op.prologue_len, elen = op.epilogue_len;
  if (threadIdx.x == 0) {
    s.bad = 0;
    s.bad_instruction = 0;
    s.iter = iter;
    s.outer_iter = outer_iter;
    s.out_offset = 0;
    const bool lens_ok = plen >= 0 && elen >= 0 && plen <= pf::kMaxProgramLen &&
                         elen <= pf::kMaxProgramLen && op.prologue_at >= 0 && op.epilogue_at >= 0 &&
                         (static_cast<int64_t>(op.prologue_at) + plen) * 4 <= h.code_words &&
                         (static_cast<int64_t>(op.epilogue_at) + elen) * 4 <= h.code_words;
    const bool out_ok = op.out_tensor >= 0 && op.out_tensor < h.num_tensors;
    if (!lens_ok) s.bad = kBadProgram;
    else if (!out_ok) s.bad = kBadView;
    if (out_ok) {
      const pf::TensorRecord& out = plan.tensor(op.out_tensor);
      s.out_rank = out.rank;
      s.out_dtype = out.dtype;
      for (int d = 0; d < pf::kMaxRank; ++d) s.out_dims[d] = out.dims[d];
      if (out.rank < 0 || out.rank > pf::kMaxRank || out.storage == pf::kStorageArg) s.bad = kBadView;
      if (lv.op_stacked(op_index) && out.rank >= 1 && out.dims[0] >= 1) {
        // v3 stacked output: the epilogue walks one slice (dims 1..rank), stored at slice `iter`
        // (trip_count - 1 - iter for scan(reverse=True)).
        s.out_rank = out.rank - 1;
        for (int d = 0; d < pf::kMaxRank; ++d) s.out_dims[d] = d + 1 < pf::kMaxRank ? out.dims[d + 1] : 1;
        s.out_offset = lv.stacked_slice(op_index, iter) * (out.num_elements / out.dims[0]);
      }
      s.store_reg = -1;
      if (op.store_view_plus1 != 0) {  // window store: the epilogue walks iter_dims
        const int sv = op.store_view_plus1 - 1, reg = op.store_at_plus1 - 1;
        const bool fold = op.kind == pf::kOpReduce;  // a scatter fold: store_at is a prologue register
        const bool kind_ok = fold ? op.kept_rank == 0 && !pf::is_arg_reduce(op.reduce_kind)
                                  : op.kind == pf::kOpMap && out.alias_plus1 != 0;
        const int reg_at = fold ? op.prologue_at : op.epilogue_at;
        const bool ok = kind_ok && op.iter_rank >= 0 && op.iter_rank <= pf::kMaxRank && sv >= 0 &&
                        sv < h.num_views && plan.view(sv).tensor == op.out_tensor &&
                        plan.view(sv).rank == op.iter_rank && reg >= 0 && reg < (fold ? plen : elen) &&
                        lens_ok && pf::is_int_dtype((plan.instruction(reg_at + reg).op_and_dtype >> 16) & 0xFF);
        if (!ok) {
          s.bad = kBadView;
        } else {
          const pf::ViewRecord& v = plan.view(sv);
          if (!fold) {
            s.out_rank = op.iter_rank;
            for (int d = 0; d < pf::kMaxRank; ++d) s.out_dims[d] = op.iter_dims[d];
          }
          s.store.base = tensor_base(p, out);
          s.store.dtype = out.dtype;
          s.store.rank = v.rank;
          s.store.offset = v.offset;
          s.store.num_elements = out.num_elements;
          for (int d = 0; d < pf::kMaxRank; ++d) s.store.strides[d] = v.strides[d];
          s.store_reg = reg;
          if (s.store.base == nullptr) s.bad = kBadView;
        }
      }
    }
    for (int d = 0; d < pf::kMaxRank; ++d) s.iter_dims[d] = op.iter_dims[d];
    const int iter_rank = op.iter_rank < 0 ? 0 : (op.iter_rank > pf::kMaxRank ? pf::kMaxRank : op.iter_rank);
    s.iter_dims_narrow = dims_narrow(s.iter_dims, iter_rank);
    s.out_dims_narrow = s.out_rank >= 0 && s.out_rank <= pf::kMaxRank && dims_narrow(s.out_dims, s.out_rank);
    if (op.kind == pf::kOpReduce &&
        (op.iter_rank < op.kept_rank || op.iter_rank > pf::kMaxRank || op.kept_rank < 0 ||
         op.reduce_kind < 0 || op.reduce_kind >= pf::kNumReduceKinds))
      s.bad = kBadView;
  }
  __syncthreads();
  if (s.bad) return;
  // Iteration rank each program indexes with: the REDUCE prologue walks iter_dims, every epilogue
  // walks the output tensor's dims.
  for (int i = threadIdx.x; i < plen + elen; i += kBlockThreads) {
    const bool is_pro = i < plen;
    const int local = is_pro ? i : i - plen;
    const pf::Instruction ins = plan.instruction((is_pro ? op.prologue_at : op.epilogue_at) + local);
    s.code[i] = ins;
    const int32_t opc = ins.op_and_dtype & 0xFFFF, dt = (ins.op_and_dtype >> 16) & 0xFF;
    const int iter_rank = is_pro ? op.iter_rank : s.out_rank;
    bool ok = pf::dtype_size(dt) > 0;
    if (opc == pf::kLoadAcc) {
      ok = ok && op.kind != pf::kOpMap && !is_pro;
    } else if (opc == pf::kLoad || opc == pf::kLoadAt) {
      const bool view_ok = ins.a >= 0 && ins.a < h.num_views;
      ok = ok && view_ok;
      if (opc == pf::kLoadAt) {  // the offset register: an earlier integer instruction
        const int first = is_pro ? op.prologue_at : op.epilogue_at;
        ok = ok && ins.b >= 0 && ins.b < local &&
             pf::is_int_dtype((plan.instruction(first + ins.b).op_and_dtype >> 16) & 0xFF);
      }
      if (view_ok) {
        const pf::ViewRecord& v = plan.view(ins.a);
        const bool t_ok = v.tensor >= 0 && v.tensor < h.num_tensors && v.rank == iter_rank;
        ok = ok && t_ok;
        if (t_ok) {
          const pf::TensorRecord& t = plan.tensor(v.tensor);
          ResolvedLoad& l = s.loads[i];
          l.base = tensor_base(p, t);
          l.dtype = t.dtype;
          l.rank = v.rank;
          l.offset = v.offset + lv.view_shift(ins.a, s.iter, s.outer_iter);  // v3: xs slices move
          l.num_elements = t.num_elements;
          for (int d = 0; d < pf::kMaxRank; ++d) l.strides[d] = v.strides[d];
          ok = ok && l.base != nullptr;
        }
      }
    } else if (opc == pf::kConst || opc == pf::kLoadIter) {
    } else if (opc == pf::kLoadRank) {
      ok = ok && h.group_size != 0;  // a rank only exists in a group
    } else if (opc == pf::kSelect) {
      ok = ok && ins.a >= 0 && ins.a < local && ins.b >= 0 && ins.b < local && ins.c >= 0 &&
           ins.c < local;
    } else if (pf::is_unary(opc)) {
      ok = ok && ins.a >= 0 && ins.a < local;
    } else if (pf::is_binary(opc) || pf::is_int_binary(opc)) {
      ok = ok && ins.a >= 0 && ins.a < local && ins.b >= 0 && ins.b < local;
    } else if (pf::is_int_unary(opc)) {
      ok = ok && ins.a >= 0 && ins.a < local;
    } else {
      ok = false;
    }
    // Not s.bad: a slower thread may still be reading s.bad above (early return), and seeing it
    // change would make that thread skip the barrier below while the others wait at it.
    if (!ok) s.bad_instruction = kBadProgram;  // benign race: any nonzero value is the same verdict
  }
  __syncthreads();
}

// REDUCE of the v2 kinds (integer, min, argmax / argmin): tile::row_fold over (bits, index) pairs
// with tile_ops.hpp's reduce_combine, which is associative and commutative for these kinds (ties
// go to the lower index), so any fold order, the few-rows split across warps included, gives the
// CPU executor's result.
template <typename Load, typename Epi>
__device__ void row_reduce_generic(int64_t r0, int64_t r1, int64_t ncols, int32_t kind, Load& load,
                                   Epi& epi) {
  auto element = [&](int64_t r, int64_t c) {
    return pf::ReduceAcc{__float_as_uint(load(r, c)), static_cast<int32_t>(c)};
  };
  auto combine = [kind](pf::ReduceAcc a, pf::ReduceAcc b) { return pf::reduce_combine(kind, a, b); };
  auto finish = [&](int64_t r, pf::ReduceAcc acc) { epi(r, __uint_as_float(pf::reduce_result(kind, acc))); };
  tile::row_fold(r0, r1, ncols, pf::reduce_identity(kind), element, combine, finish);
}

// ---- the three op kinds ------------------------------------------------------------------------

// Each run_* calls `wait()` (the dependency wait) exactly once, block-uniformly, before reading any
// tensor another task writes, and returns false if it failed.
template <typename Wait>
__device__ bool run_matmul(const KernelParams& p, const pf::PlanView& plan, const pf::OpRecord& op,
                           const pf::TaskRecord& t, TaskSmem& s, float* smem, Wait& wait) {
  const pf::ViewRecord& av = plan.view(op.a_view);
  const pf::ViewRecord& bv = plan.view(op.b_view);
  const pf::TensorRecord& ta = plan.tensor(av.tensor);
  const pf::TensorRecord& tb = plan.tensor(bv.tensor);
  const pf::LoopView lv{plan.words};
  const int64_t a_offset = av.offset + lv.view_shift(op.a_view, s.iter, s.outer_iter);  // v3 xs
  const int64_t b_offset = bv.offset + lv.view_shift(op.b_view, s.iter, s.outer_iter);
  const void* a_base = tensor_base(p, ta);
  const void* b_base = tensor_base(p, tb);
  void* out = tensor_base(p, plan.tensor(op.out_tensor));
  const int plen = op.prologue_len, elen = op.epilogue_len;
  const int32_t acc_dtype = op.acc_dtype, out_dtype = s.out_dtype, out_rank = s.out_rank;
  const int64_t M = op.M, N = op.N;
  // Waits only the first time it is called (every thread calls it equally often: block-uniform).
  bool waited = false;
  auto wait_once = [&]() {
    if (waited) return true;
    waited = true;
    return wait();
  };
  if (t.b0 >= t.b1) return wait_once();
  for (int64_t b = t.b0; b < t.b1; ++b) {
    auto epilogue = [&](int64_t m, int64_t n, float acc) {
      const int64_t flat = (b * M + m) * N + n;
      int64_t idx[pf::kMaxRank];
      unravel_narrow(flat, s.out_dims, out_rank, s.out_dims_narrow, idx);
      const float v = eval_program(s, plen, elen, idx, pf::round_to(acc, acc_dtype));
      store_out(out, out_dtype, s.out_offset + flat, v);
    };
    const int64_t rows = t.m1 - t.m0;
    const bool w_float = tb.dtype == pf::kF32 || tb.dtype == pf::kBF16 || tb.dtype == pf::kF16;
    if (rows >= 1 && rows <= 16 && bv.strides[2] == 1 && w_float) {
      // Memory-bound path: few rows, weights contiguous along N (x @ W with W row-major).
      tile::GemvParams g;
      g.x = element_ptr(a_base, ta.dtype, a_offset + b * av.strides[0] + t.m0 * av.strides[1]);
      g.x_dtype = static_cast<DType>(ta.dtype);
      g.x_batch_stride = av.strides[1];
      g.x_k_stride = av.strides[2];
      g.w = element_ptr(b_base, tb.dtype, b_offset + b * bv.strides[0]);
      g.w_row_stride = bv.strides[1];
      // Operands (storage 0) are never written by a plan: the read-only streaming path is safe.
      g.w_stream = tb.storage == pf::kStorageArg;
      g.batch = static_cast<int>(rows);
      g.K = op.K;
      g.n_begin = t.n0;
      g.n_end = t.n1;
      const int64_t m0 = t.m0;
      auto epi = [&](int64_t row, int64_t n, float acc) { epilogue(m0 + row, n, acc); };
      if (!tile::gemv_kn(g, static_cast<DType>(tb.dtype), smem, epi, wait_once)) return false;
    } else {
      if (!wait_once()) return false;
      tile::GemmParams g;
      g.a = element_ptr(a_base, ta.dtype, a_offset + b * av.strides[0]);
      g.a_dtype = static_cast<DType>(ta.dtype);
      g.a_sm = av.strides[1];
      g.a_sk = av.strides[2];
      g.b = element_ptr(b_base, tb.dtype, b_offset + b * bv.strides[0]);
      g.b_dtype = static_cast<DType>(tb.dtype);
      g.b_sk = bv.strides[1];
      g.b_sn = bv.strides[2];
      g.m0 = t.m0, g.m1 = t.m1, g.n0 = t.n0, g.n1 = t.n1, g.K = op.K;
      tile::gemm_tile(g, smem, epilogue);
    }
  }
  return true;
}

template <typename Wait>
__device__ bool run_reduce(const KernelParams& p, const pf::PlanView& plan, const pf::OpRecord& op,
                           const pf::TaskRecord& t, TaskSmem& s, Wait& wait) {
  if (!wait()) return false;
  void* out = tensor_base(p, plan.tensor(op.out_tensor));
  const int plen = op.prologue_len, elen = op.epilogue_len;
  const int kept = op.kept_rank, iter_rank = op.iter_rank;
  const int32_t acc_dtype = op.acc_dtype, out_dtype = s.out_dtype, out_rank = s.out_rank;
  auto load = [&](int64_t m, int64_t r) {
    int64_t idx[pf::kMaxRank];
    unravel_narrow(m, s.iter_dims, kept, s.iter_dims_narrow, idx);
    unravel_narrow(r, s.iter_dims + kept, iter_rank - kept, s.iter_dims_narrow, idx + kept);
    return eval_program(s, 0, plen, idx, 0.f);
  };
  auto epi = [&](int64_t m, float acc) {
    int64_t idx[pf::kMaxRank];
    unravel_narrow(m, s.out_dims, out_rank, s.out_dims_narrow, idx);
    store_out(out, out_dtype, s.out_offset + m,
              eval_program(s, plen, elen, idx, pf::round_to(acc, acc_dtype)));
  };
  if (op.reduce_kind == pf::kReduceSum || op.reduce_kind == pf::kReduceMax) {
    const tile::ReduceKind kind =
        op.reduce_kind == pf::kReduceMax ? tile::ReduceKind::kMax : tile::ReduceKind::kSum;
    tile::row_reduce_tile(t.m0, t.m1, op.K, kind, load, epi);
  } else {
    row_reduce_generic(t.m0, t.m1, op.K, op.reduce_kind, load, epi);
  }
  return true;
}

// A scatter fold (docs/plan_format.md, "Scatter folds"; one task): the epilogue gives every output
// element its first value, then the prologue's values over iter_dims are folded in iteration
// order, a block's worth at a time: thread j evaluates value r0 + j and the element it goes to,
// then folds, in order, the chunk's values whose element is j modulo the block size. The values of
// one element are thus folded by one thread in iteration order (the CPU executor's result, bit for
// bit), and no two threads touch one element. Every element read was first written by this block.
// Not inlined, as run_put: a rare path whose state would otherwise weigh on the worker loop's
// register allocation.
template <typename Wait>
__device__ __noinline__ bool run_scatter_fold(const KernelParams& p, const pf::PlanView& plan, const pf::OpRecord& op,
                                 TaskSmem& s, float* smem, Wait& wait) {
  if (!wait()) return false;
  void* out = tensor_base(p, plan.tensor(op.out_tensor));
  const int plen = op.prologue_len, elen = op.epilogue_len;
  const int32_t out_dtype = s.out_dtype, kind = op.reduce_kind;
  const int64_t num_elements = s.store.num_elements;
  for (int64_t e = threadIdx.x; e < num_elements; e += kBlockThreads) {
    int64_t idx[pf::kMaxRank];
    unravel_narrow(e, s.out_dims, s.out_rank, s.out_dims_narrow, idx);
    store_out(out, out_dtype, e, eval_program(s, plen, elen, idx, 0.f));
  }
  __syncthreads();  // the first values are stored before any thread folds into them
  int64_t* target = reinterpret_cast<int64_t*>(smem);
  float* value = reinterpret_cast<float*>(target + kBlockThreads);
  for (int64_t r0 = 0; r0 < op.K; r0 += kBlockThreads) {
    const int64_t r = r0 + threadIdx.x;
    int64_t to = -1;
    float v = 0.f;
    if (r < op.K) {
      int64_t idx[pf::kMaxRank];
      unravel_narrow(r, s.iter_dims, op.iter_rank, s.iter_dims_narrow, idx);
      float moved = 0.f;
      v = eval_program(s, 0, plen, idx, 0.f, s.store_reg, &moved);
      const int32_t delta = __float_as_int(moved);
      if (delta != pf::kDropStore) {  // a scatter point out of bounds folds nothing
        to = s.store.offset + delta;
        for (int d = 0; d < s.store.rank; ++d) to += idx[d] * s.store.strides[d];
        if (to < 0 || to >= num_elements) to = -1;
      }
    }
    target[threadIdx.x] = to;
    value[threadIdx.x] = v;
    __syncthreads();
    const int chunk = op.K - r0 < kBlockThreads ? static_cast<int>(op.K - r0) : kBlockThreads;
    for (int j = 0; j < chunk; ++j) {
      const int64_t t = target[j];
      if (t >= 0 && t % kBlockThreads == threadIdx.x) pf::fold_into_element(out, out_dtype, t, kind, value[j]);
    }
    __syncthreads();  // every thread read the chunk before the next one overwrites it
  }
  return true;
}

template <typename Wait>
__device__ bool run_map(const KernelParams& p, const pf::PlanView& plan, const pf::OpRecord& op,
                        const pf::TaskRecord& t, TaskSmem& s, Wait& wait) {
  if (!wait()) return false;
  void* out = tensor_base(p, plan.tensor(op.out_tensor));
  const int plen = op.prologue_len, elen = op.epilogue_len;
  const int32_t out_dtype = s.out_dtype, out_rank = s.out_rank;
  const int64_t M = op.M, N = op.N;
  const int64_t tm = t.m1 - t.m0, tn = t.n1 - t.n0;
  auto f = [&](int64_t i) {
    const int64_t n = t.n0 + i % tn, m = t.m0 + (i / tn) % tm, b = t.b0 + i / (tn * tm);
    const int64_t flat = (b * M + m) * N + n;
    int64_t idx[pf::kMaxRank];
    unravel_narrow(flat, s.out_dims, out_rank, s.out_dims_narrow, idx);
    if (s.store_reg < 0) {
      store_out(out, out_dtype, s.out_offset + flat, eval_program(s, plen, elen, idx, 0.f));
      return;
    }
    float moved = 0.f;
    const float v = eval_program(s, plen, elen, idx, 0.f, s.store_reg, &moved);
    if (__float_as_int(moved) == pf::kDropStore) return;  // a scatter point out of bounds
    int64_t e = s.store.offset + __float_as_int(moved);
    for (int d = 0; d < s.store.rank; ++d) e += idx[d] * s.store.strides[d];
    e = e < 0 ? 0 : (e >= s.store.num_elements ? s.store.num_elements - 1 : e);
    store_out(out, out_dtype, e, v);
  };
  const int64_t count = static_cast<int64_t>(t.b1 - t.b0) * tm * tn;
  if (count > 0) tile::elementwise_tile(0, count, f);
  return true;
}

// ---- communication: PUT tasks (plan v3, docs/plan_format.md "Communication") ----------------

// Copies element `e` of `src` to element `d` of `dst` (`sz`-byte elements). One load and one store of
// the element's width: never a byte-wise memcpy (nvcc 13.0 miscompiled those for 16-bit tails,
// issue 9). The source may have been written during this call, hence the L2 (.cg) load.
__device__ __forceinline__ void copy_element(void* dst, int64_t d, const void* src, int64_t e, int sz) {
  switch (sz) {
    case 8: static_cast<unsigned long long*>(dst)[d] = __ldcg(static_cast<const unsigned long long*>(src) + e); break;
    case 4: static_cast<unsigned int*>(dst)[d] = __ldcg(static_cast<const unsigned int*>(src) + e); break;
    case 2: static_cast<unsigned short*>(dst)[d] = __ldcg(static_cast<const unsigned short*>(src) + e); break;
    default: static_cast<unsigned char*>(dst)[d] = __ldcg(static_cast<const unsigned char*>(src) + e); break;
  }
}

__device__ __forceinline__ void zero_element(void* dst, int64_t d, int sz) {
  switch (sz) {
    case 8: static_cast<unsigned long long*>(dst)[d] = 0ull; break;
    case 4: static_cast<unsigned int*>(dst)[d] = 0u; break;
    case 2: static_cast<unsigned short*>(dst)[d] = 0; break;
    default: static_cast<unsigned char*>(dst)[d] = 0; break;
  }
}

// The whole block copies the task's (m, n) tile of `src` (element `src_at` + m * s1 + n * s2, n
// relative to n0) into rows of `dst` (element `dst_at` + m * N + n). Rows that are contiguous and
// 16-byte aligned on both sides move as 16-byte vectors (a peer's inbox over NVLink takes whole
// 16-byte stores best); anything else element by element.
__device__ void copy_put_tile(void* dst, int64_t dst_at, const void* src, int64_t src_at, int64_t s1,
                              int64_t s2, int64_t N, const pf::TaskRecord& t, int sz) {
  const int64_t tm = t.m1 - t.m0, tn = t.n1 - t.n0;
  const auto* sb = static_cast<const char*>(src);
  auto* db = static_cast<char*>(dst);
  const int64_t row_bytes = tn * sz;
  const bool vectors = s2 == 1 && row_bytes % 16 == 0 && (s1 * sz) % 16 == 0 && (N * sz) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(sb + (src_at + t.m0 * s1) * sz) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(db + (dst_at + t.m0 * N) * sz) % 16 == 0;
  if (vectors) {
    const int64_t per_row = row_bytes / 16;
    for (int64_t i = threadIdx.x; i < tm * per_row; i += kBlockThreads) {
      const int64_t m = t.m0 + i / per_row, v = i % per_row;
      const uint4* from = reinterpret_cast<const uint4*>(sb + (src_at + m * s1) * sz) + v;
      reinterpret_cast<uint4*>(db + (dst_at + m * N) * sz)[v] = __ldcg(from);
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < tm * tn; i += kBlockThreads) {
    const int64_t m = t.m0 + i / tn, n = i % tn;
    copy_element(dst, dst_at + m * N + n, src, src_at + m * s1 + n * s2, sz);
  }
}

// A PUT task on the GPU, the block together (block-uniform result; false: the run failed or was
// aborted, the error recorded). After its dependencies (the source tile is final):
//  1. every peer this task sends to has entered this call (one flag poll per block and peer per
//     call: s.peers_entered), so no tile of this call can land in an inbox still read by the peer's
//     previous call;
//  2. the tiles this rank sends (routing: slot b of rank q is sent by recv_from(q, b), from row
//     send_row(q, b) of a_view; default: this rank's row to every rank) go straight into the
//     peers' inboxes with plain stores; then a block barrier and ONE sys-scope release per
//     (peer, slot) carries them (signal_put);
//  3. every slot of the task in this rank's inbox is awaited (acquire; a slot with no sender is
//     zero-filled here, as jax.lax gives zeros), so the caller's release of counters[task] tells
//     local consumers that their tiles are in.
// No wait in 1-2 is for a peer's progress past its own copy phase, which is what keeps the
// "no cycle of waits" argument of docs/plan_format.md whole.
// Not inlined: inside the worker loop its state tripled the loop's spill loads (sm_90 ptxas:
// 408 B before PUT tasks, 1,224 B with run_put inlined, 420 B as a call); a call per put task is
// small next to its copies and system-scope signals.
template <typename Wait>
__device__ __noinline__ bool run_put(const KernelParams& p, const pf::PlanView& plan, const pf::LoopView& lv,
                        int32_t task, const pf::OpRecord& op, const pf::TaskRecord& t, TaskSmem& s,
                        Wait& wait, int worker, int64_t iter, uint32_t runs) {
  if (!wait()) return false;
  const PersistentCommDevice& c = s.comm;
  const int32_t rank = c.rank, n = c.n;
  const pf::RouteView route = plan.route(op);
  const pf::ViewRecord& av = plan.view(op.a_view);
  const pf::TensorRecord& src_t = plan.tensor(av.tensor);
  const pf::TensorRecord& inbox = plan.tensor(op.out_tensor);
  const void* src = tensor_base(p, src_t);
  const int sz = pf::dtype_size(inbox.dtype);
  const int64_t src_at = av.offset + lv.view_shift(op.a_view, s.iter, s.outer_iter) + t.n0 * av.strides[2];
  // one inbox slice per run of the put's loops (check_plan: stacked forward), slice k at run k
  const int64_t slice = lv.op_stacked(t.op) ? static_cast<int64_t>(runs) - 1 : 0;
  // Element offset of slot b's tile origin (m = 0, n = n0) in any rank's inbox.
  auto slot_at = [&](int32_t b) { return ((slice * op.B + b) * op.M) * op.N + t.n0; };

  // 1. peers entered: thread q handles peer q (n <= kPersistentMaxGroup <= kBlockThreads).
  bool failed = false;
  const int32_t q = static_cast<int32_t>(threadIdx.x);
  if (q < n && q != rank && ((s.peers_entered >> q) & 1ull) == 0ull) {
    bool sends = false;
    for (int32_t b = t.b0; b < t.b1 && !sends; ++b) sends = route.recv_from(q, b) == rank;
    if (sends) {
      uint64_t t0 = 0, waited = 0, seen = 0;
      bool aborted = false;
      const bool ok = wait_peer_entered(c, q, [&] {
        if (t0 == 0) t0 = proto::now_ns();
        if (persistent_aborted(p.run)) return aborted = true;
        waited = proto::now_ns() - t0;
        return waited > p.run.timeout_ns;
      }, &seen);
      if (ok) {
        atomicOr(&s.peers_entered, 1ull << q);
      } else {
        failed = true;
        if (!aborted) report_peer_timeout(p, plan, worker, task, q, -1, static_cast<int32_t>(runs), seen, waited);
      }
    }
  }
  if (__syncthreads_or(failed)) return false;

  // 2. this rank's tiles, peers in the order after this rank (the ranks do not all start at 0).
  for (int32_t k = 1; k <= n; ++k) {
    const int32_t dst_rank = (rank + k) % n;
    for (int32_t b = t.b0; b < t.b1; ++b) {
      if (route.recv_from(dst_rank, b) != rank) continue;
      void* dst = inbox_area(c, c.peers[dst_rank]) + inbox.byte_offset;
      copy_put_tile(dst, slot_at(b), src, src_at + route.send_row(dst_rank, b) * av.strides[0],
                    av.strides[1], av.strides[2], op.N, t, sz);
    }
  }
  __syncthreads();  // every thread's stores, before thread 0's releases (cumulative over them)
  if (threadIdx.x == 0)
    for (int32_t k = 1; k <= n; ++k) {
      const int32_t dst_rank = (rank + k) % n;
      for (int32_t b = t.b0; b < t.b1; ++b)
        if (route.recv_from(dst_rank, b) == rank) signal_put(c, dst_rank, task, b, runs);
    }

  // 3. this rank's slots: thread j awaits slots b0 + j, b0 + j + 256, ...
  for (int32_t b = t.b0 + static_cast<int32_t>(threadIdx.x); b < t.b1 && !failed; b += kBlockThreads) {
    const int32_t from = route.recv_from(rank, b);
    if (from < 0) continue;
    uint64_t t0 = 0, waited = 0, seen = 0;
    bool aborted = false;
    const bool ok = wait_put(c, task, b, runs, [&] {
      if (t0 == 0) t0 = proto::now_ns();
      if (persistent_aborted(p.run)) return aborted = true;
      waited = proto::now_ns() - t0;
      return waited > p.run.timeout_ns;
    }, &seen);
    if (!ok) {
      failed = true;
      if (!aborted) report_peer_timeout(p, plan, worker, task, from, b, static_cast<int32_t>(runs), seen, waited);
    }
  }
  if (__syncthreads_or(failed)) return false;
  void* own = inbox_area(c, c.local) + inbox.byte_offset;
  const int64_t tm = t.m1 - t.m0, tn = t.n1 - t.n0;
  for (int32_t b = t.b0; b < t.b1; ++b) {
    if (route.recv_from(rank, b) >= 0) continue;
    for (int64_t i = threadIdx.x; i < tm * tn; i += kBlockThreads)
      zero_element(own, slot_at(b) + (t.m0 + i / tn) * op.N + i % tn, sz);
  }
  return true;
}

// Test mode (chaos_seed != 0): a pseudo-random 0..200 us pause before each task, deterministic in
// (seed, task), to expose missing dependencies.
__device__ void chaos_pause(uint64_t seed, int task) {
  uint64_t x = seed ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(task + 1));
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  const uint64_t pause_ns = x % 200000ull;
  const uint64_t t0 = global_timer_ns();
  while (global_timer_ns() - t0 < pause_ns) __nanosleep(2000);
}

// One worker (block) of one rank: the whole executor. Inlined into the two kernels below.
__device__ __forceinline__ void run_worker(const KernelParams& p, const int worker) {
  extern __shared__ float4 dynamic_smem[];
  float* smem = reinterpret_cast<float*>(dynamic_smem);
  __shared__ TaskSmem s;
  const pf::PlanView plan{p.plan};
  const pf::Header& h = plan.header();
  if (p.skip) return;

  // Every block checks the header itself (cheap, and no block trusts another's verdict).
  if (threadIdx.x == 0) {
    s.comm = p.comm;
    if (p.comm.n > 0 && p.comm.epoch == 0) s.comm.epoch = current_epoch(p.comm_control);
    int32_t bad = 0;
    if (p.plan_words < 32 || h.magic != pf::kMagic || h.version < 1 || h.version > pf::kVersion ||
        h.header_words != 32 || h.total_words != p.plan_words) {
      bad = kBadHeader;
    } else if (!sections_fit(h)) {
      bad = kBadHeader;
    } else if (h.group_size != 0 && p.comm.n == 0) {
      bad = kCommUnsupported;
    } else if (h.num_workers != p.num_workers || h.num_tasks != p.num_tasks ||
               h.num_args != p.num_args || h.num_outputs != p.num_results ||
               h.num_counters != int64_t{h.num_tasks} * (1 + int64_t{h.group_size}) ||
               h.group_size != p.comm.n || (h.group_size != 0 && p.comm.num_tasks != h.num_tasks)) {
      bad = kBadCounts;
    } else if (h.workspace_bytes > p.workspace_bytes) {
      bad = kBadWorkspace;
    } else if (!loops_fit(plan)) {
      bad = kBadLoop;
    }
    if (bad) report(p, plan, kPersistentBadPlan, worker, -1, -1, 0, bad, 0);
    s.header_bad = bad;
    // Peers may write into this rank's region from now on (persistent_comm_device.hpp).
    if (bad == 0 && worker == 0 && p.comm.n > 0) announce_entered(s.comm);
  }
  __syncthreads();
  if (s.header_bad) return;

  const int32_t q_begin = plan.queue_begin(worker), q_end = plan.queue_end(worker);
  if (q_begin < 0 || q_begin > q_end || q_end > p.num_tasks) {
    if (threadIdx.x == 0) report(p, plan, kPersistentBadPlan, worker, -1, -1, 0, kBadTask, 0);
    return;
  }
  // Checked ONCE per call, before the queue is walked (the cursor itself reads the queued tasks'
  // records), instead of once per task run: every queued task id, its op id, tile bounds and op
  // kind. A loop's tasks run once per iteration but are checked once.
  if (threadIdx.x == 0) {
    s.first_bad_q = INT32_MAX;
    s.staged_op = -1;  // nothing staged yet
    s.peers_entered = p.comm.n > 0 ? 1ull << p.comm.rank : 0ull;
    s.rank = p.comm.n > 0 ? p.comm.rank : 0;
  }
  __syncthreads();
  bool queue_bad = false;
  for (int32_t q = q_begin + static_cast<int32_t>(threadIdx.x); q < q_end; q += kBlockThreads)
    if (task_problem(p, plan, plan.queue_task(q)) != 0) {
      atomicMin(&s.first_bad_q, q);
      queue_bad = true;
    }
  if (__syncthreads_or(queue_bad)) {
    if (threadIdx.x == 0) {
      const int32_t task = plan.queue_task(s.first_bad_q);
      report(p, plan, kPersistentBadPlan, worker, task, -1, 0, task_problem(p, plan, task), 0);
    }
    return;
  }

  // A worker runs its tasks of a loop (a segment of its queue) once per iteration (QueueCursor).
  const pf::LoopView lv{p.plan};
  pf::QueueCursor cursor;
  for (cursor.start(plan, lv, worker); !cursor.done(); cursor.advance(plan, lv)) {
    while (cursor.pending_check)  // a while loop: does this iteration run its body?
      if (!while_check(p, plan, lv, cursor, worker, s)) return;
    if (cursor.done()) break;
    const int32_t q = cursor.q;
    const int64_t iter = cursor.iter(), outer_iter = cursor.outer_iter();
    const int32_t task = plan.queue_task(q);
    // Another block's failure ends this one at its next dependency wait. The load is issued here
    // and its value used at the wait's barrier, so its latency hides behind staging (no barrier
    // of its own, as the per-task check had).
    const bool aborted_before = threadIdx.x == 0 && persistent_aborted(p.run);

    if (p.chaos_seed != 0) {  // a kernel parameter: block-uniform
      if (threadIdx.x == 0) chaos_pause(p.chaos_seed, task);
      __syncthreads();
    }

    // Everything up to the wait reads only the plan and FFI operands, so it overlaps the producers.
    const pf::TaskRecord& t = plan.task(task);
    const pf::OpRecord& op = plan.op(t.op);
    // Every thread reads the staged key before stage_task's first barrier, and thread 0 rewrites
    // it only after stage_task's last one (below), so all threads take the same branch.
    if (t.op != s.staged_op || iter != s.staged_iter || outer_iter != s.staged_outer_iter) {
      stage_task(p, plan, t.op, op, iter, outer_iter, s);
      const int32_t staged_bad = s.bad ? s.bad : s.bad_instruction;
      bool views_ok = staged_bad == 0;
      if (views_ok) {
        views_ok = tensor_base(p, plan.tensor(op.out_tensor)) != nullptr;
        if (op.kind == pf::kOpMatmul) {
          views_ok = views_ok && op.a_view >= 0 && op.a_view < h.num_views && op.b_view >= 0 &&
                     op.b_view < h.num_views;
          if (views_ok) {
            const pf::ViewRecord& av = plan.view(op.a_view);
            const pf::ViewRecord& bv = plan.view(op.b_view);
            views_ok = av.rank == 3 && bv.rank == 3 && av.tensor >= 0 && av.tensor < h.num_tensors &&
                       bv.tensor >= 0 && bv.tensor < h.num_tensors &&
                       tensor_base(p, plan.tensor(av.tensor)) != nullptr &&
                       tensor_base(p, plan.tensor(bv.tensor)) != nullptr;
          }
        } else if (op.kind == pf::kOpPut) {
          // The inbox must be in the symmetric region (peers write it) and the source a rank-3
          // view of the inbox's dtype; extents and routes are check_plan's (host) business.
          const pf::TensorRecord& inbox = plan.tensor(op.out_tensor);
          views_ok = views_ok && inbox.storage == pf::kStorageWorkspace &&
                     inbox.byte_offset + inbox.num_elements * pf::dtype_size(inbox.dtype) <= p.comm.inbox_bytes &&
                     op.a_view >= 0 && op.a_view < h.num_views;
          if (views_ok) {
            const pf::ViewRecord& av = plan.view(op.a_view);
            views_ok = av.rank == 3 && av.tensor >= 0 && av.tensor < h.num_tensors &&
                       plan.tensor(av.tensor).dtype == inbox.dtype &&
                       tensor_base(p, plan.tensor(av.tensor)) != nullptr;
          }
        }
      }
      if (!views_ok) {
        if (threadIdx.x == 0)
          report(p, plan, kPersistentBadPlan, worker, task, -1, 0, staged_bad ? staged_bad : kBadView, 0);
        return;
      }
      if (threadIdx.x == 0) {
        s.staged_op = t.op;
        s.staged_iter = iter;
        s.staged_outer_iter = outer_iter;
      }
    }
    const uint64_t wait_begin = global_timer_ns();
    if (q == q_begin && iter == 0) prefetch_task_weights(p, plan, task, iter, outer_iter);
    if (q + 1 < q_end) {
      const int32_t next = plan.queue_task(q + 1);
      if (next >= 0 && next < p.num_tasks) prefetch_task_weights(p, plan, next, iter, outer_iter);
    }
    uint64_t start = 0;
    auto wait = [&]() {
      const bool ok = wait_dependencies(p, plan, task, worker, cursor.iters, aborted_before);
      start = global_timer_ns();
      return ok;
    };
    const uint32_t runs = static_cast<uint32_t>(lv.run_index(t.op, cursor.iters) + 1);
    bool ok;
    if (op.kind == pf::kOpMatmul) ok = run_matmul(p, plan, op, t, s, smem, wait);
    else if (op.kind == pf::kOpReduce && s.store_reg >= 0) ok = run_scatter_fold(p, plan, op, s, smem, wait);
    else if (op.kind == pf::kOpReduce) ok = run_reduce(p, plan, op, t, s, wait);
    else if (op.kind == pf::kOpPut) ok = run_put(p, plan, lv, task, op, t, s, wait, worker, iter, runs);
    else ok = run_map(p, plan, op, t, s, wait);
    if (!ok) return;  // aborted (block-uniform): the record was written by whoever failed first

    // Publish: every thread's stores of the tile happen-before thread 0's release (bar.sync at CTA
    // scope, then a gpu-scope fence + release store), so a consumer's acquire sees the whole tile.
    // The end time is taken BEFORE the release, so a consumer's start >= its producers' ends.
    __syncthreads();
    if (threadIdx.x == 0) {
      if (p.profile != nullptr) {
        int64_t* rec = p.profile + static_cast<int64_t>(task) * pf::kProfileWordsPerTask;
        rec[0] = static_cast<int64_t>(wait_begin);
        rec[1] = static_cast<int64_t>(start);
        rec[2] = static_cast<int64_t>(global_timer_ns());
        rec[3] = worker;
      }
      // st.release.gpu = fence.acq_rel.gpu + store: cumulative over the block's stores ordered
      // before it by the barrier above.
      // Counters count finished runs (a nested loop's: outer * inner trips + inner + 1).
      persistent_release_task(p.counters, task, runs);
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads, 1)
    persistent_kernel(const __grid_constant__ KernelParams p) {
  run_worker(p, static_cast<int>(blockIdx.x));
  if (p.comm.n > 0 && p.comm.epoch == 0) {
    // The epoch came from the rank's control word: the last block done advances it for the next
    // call. This block has not counted itself yet, so the word still holds the epoch it read.
    __syncthreads();
    if (threadIdx.x == 0) retire_block(p.comm_control, gridDim.x, current_epoch(p.comm_control));
  }
}

// Every rank of a group on ONE GPU in one cooperative launch (the test harness,
// persistent_group_run): block b is worker b % W of rank b / W, each rank with its own parameters
// (in device memory: N ranks' pointers exceed the 4 KiB parameter space). All ranks' blocks are
// then resident together, which N launches on N streams would not promise.
__global__ void __launch_bounds__(kBlockThreads, 1)
    persistent_group_kernel(const KernelParams* ranks, int32_t workers_per_rank) {
  run_worker(ranks[blockIdx.x / workers_per_rank], static_cast<int>(blockIdx.x % workers_per_rank));
}

// ---- host side --------------------------------------------------------------------------------

#define ARK_CUDA_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                    \
    const cudaError_t ark_err_ = (expr);                                                  \
    if (ark_err_ != cudaSuccess)                                                          \
      return std::string("ark_persistent: ") + #expr + " failed: " + cudaGetErrorString(ark_err_); \
  } while (0)

// Per-device runtime state, created on first use and kept for the process lifetime (the kernel of
// an in-flight call may still write the error record, so it is never freed).
struct DeviceState {
  uint32_t* abort_word = nullptr;             // device memory
  PersistentErrorRecord* host_record = nullptr;  // pinned, mapped
  PersistentErrorRecord* device_record = nullptr;
  uint32_t next_seq = 1;
  int co_resident_blocks = 0;                 // SMs x blocks per SM
};

std::mutex g_mutex;

// Co-resident blocks of the kernel on `device`, which must be the current device. Sets the dynamic
// shared memory attribute first: the occupancy (and every launch) depends on it. Also reserves
// the kernel's per-thread stack now: left to the first launch, the driver grows the reservation
// (hundreds of MB: stack x resident threads) inside XLA's launch of the FFI call. This runs at
// trace time when the planner asks for the worker count, else at the first enqueue.
std::string resident_blocks_on_current(int device, int* blocks) {
  ARK_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      persistent_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, tile::kSmemBytes));
  ARK_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      persistent_group_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, tile::kSmemBytes));
  cudaFuncAttributes attr{};
  ARK_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, persistent_kernel));
  size_t stack = 0;
  ARK_CUDA_RETURN_IF_ERROR(cudaDeviceGetLimit(&stack, cudaLimitStackSize));
  if (stack < attr.localSizeBytes)
    ARK_CUDA_RETURN_IF_ERROR(cudaDeviceSetLimit(cudaLimitStackSize, attr.localSizeBytes));
  int per_sm = 0, sms = 0;
  ARK_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, persistent_kernel, kBlockThreads, tile::kSmemBytes));
  ARK_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  *blocks = per_sm * sms;
  return {};
}
std::vector<DeviceState*> g_devices;  // indexed by CUDA device ordinal

std::string device_state(DeviceState** out) {
  int device = 0;
  ARK_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_mutex);
  if (static_cast<int>(g_devices.size()) <= device) g_devices.resize(device + 1, nullptr);
  if (g_devices[device] == nullptr) {
    auto* st = new DeviceState();
    ARK_CUDA_RETURN_IF_ERROR(cudaMalloc(&st->abort_word, sizeof(uint32_t)));
    // cudaMalloc memory is not zeroed, and a plain cudaMemset runs on the legacy default stream,
    // which does not order against XLA's (non-blocking) streams: a first kernel could read a stale
    // abort word >= its seq and every block would exit at once, leaving garbage outputs and no error
    // record. Zero it on a private stream and wait for just that memset.
    {
      cudaStream_t init = nullptr;
      ARK_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&init, cudaStreamNonBlocking));
      cudaError_t e = cudaMemsetAsync(st->abort_word, 0, sizeof(uint32_t), init);
      if (e == cudaSuccess) e = cudaStreamSynchronize(init);
      const cudaError_t destroyed = cudaStreamDestroy(init);
      ARK_CUDA_RETURN_IF_ERROR(e);
      ARK_CUDA_RETURN_IF_ERROR(destroyed);
    }
    ARK_CUDA_RETURN_IF_ERROR(
        cudaHostAlloc(&st->host_record, sizeof(PersistentErrorRecord), cudaHostAllocMapped));
    std::memset(st->host_record, 0, sizeof(PersistentErrorRecord));
    ARK_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(
        reinterpret_cast<void**>(&st->device_record), st->host_record, 0));
    if (std::string err = resident_blocks_on_current(device, &st->co_resident_blocks); !err.empty())
      return err;
    g_devices[device] = st;
  }
  *out = g_devices[device];
  return {};
}

const char* bad_plan_reason(int32_t r) {
  switch (r) {
    case kBadHeader: return "bad header (magic, version or length)";
    case kBadCounts: return "header counts disagree with the call's operands/results/attributes";
    case kBadTask: return "task, op id or tile bounds out of range";
    case kBadDependency: return "dependency id out of range";
    case kBadProgram: return "invalid program (opcode, register operand or length)";
    case kBadView: return "invalid view or tensor (index, rank or storage)";
    case kBadLoop: return "invalid loop section (plan v3)";
    case kBadWorkspace: return "workspace result smaller than workspace_bytes";
    case kBadOpKind: return "unknown op kind";
    case kWhileGuard:
      return "a while_loop did not end within its guard (the loop's trip_count - 1 iterations; "
             "raise max_while_iterations or the plan's trip_count)";
    case kCommUnsupported:
      return "the plan has communication (put) tasks, which the CUDA executor does not run yet "
             "(the CPU executor does)";
    case kCpuOnlyOp:
      return "a put op is read in place, which only the CPU executor runs (plan for the GPU: "
             "ark.plan(..., platform='gpu'))";
    default: return "unknown reason";
  }
}

}  // namespace

namespace {
// Checks one rank's call and fills its kernel parameters. The caller holds no lock.
std::string prepare_call(const PersistentLaunchArgs& a, DeviceState* st, uint32_t seq,
                         KernelParams* out) {
  if (a.num_args < 0 || a.num_args > kPersistentMaxArgs)
    return "ark_persistent: " + std::to_string(a.num_args) + " operands; the CUDA executor takes at most " +
           std::to_string(kPersistentMaxArgs);
  if (a.num_results < 0 || a.num_results > kPersistentMaxResults)
    return "ark_persistent: " + std::to_string(a.num_results) + " outputs; the CUDA executor takes at most " +
           std::to_string(kPersistentMaxResults);
  if (a.num_workers < 1) return "ark_persistent: num_workers must be >= 1";
  if (a.num_tasks < 0) return "ark_persistent: num_tasks must be >= 0";
  if (a.timeout_ms <= 0) return "ark_persistent: timeout_ms must be > 0";
  if (a.plan == nullptr || a.plan_words < 32) return "ark_persistent: the plan operand is too short";
  if (reinterpret_cast<uintptr_t>(a.plan) % 8 != 0)
    return "ark_persistent: the plan operand is not 8-byte aligned";
  if (a.comm.n < 0 || a.comm.n > kPersistentMaxGroup)
    return "ark_persistent: a communication group of " + std::to_string(a.comm.n) +
           " ranks; the CUDA executor takes 1.." + std::to_string(kPersistentMaxGroup);
  if (a.comm.n > 0 && (a.comm.rank < 0 || a.comm.rank >= a.comm.n ||
                       (a.comm.epoch == 0 && a.comm_control == nullptr) ||
                       a.comm.peers == nullptr || a.comm.local == nullptr))
    return "ark_persistent: invalid communication arguments (rank, epoch or regions)";

  KernelParams& kp = *out;
  kp = KernelParams{};
  kp.plan = a.plan;
  kp.plan_words = a.plan_words;
  for (int i = 0; i < a.num_args; ++i) kp.args[i] = a.args[i];
  for (int i = 0; i < a.num_results; ++i) kp.results[i] = a.results[i];
  kp.num_args = a.num_args;
  kp.num_results = a.num_results;
  kp.workspace = static_cast<uint8_t*>(a.workspace);
  kp.workspace_bytes = a.workspace_bytes;
  kp.counters = a.counters;
  kp.profile = a.profile;
  kp.num_workers = a.num_workers;
  kp.num_tasks = a.num_tasks;
  kp.chaos_seed = static_cast<uint64_t>(a.chaos_seed);
  kp.run.abort_word = st->abort_word;
  kp.run.error = st->device_record;
  kp.run.timeout_ns = static_cast<uint64_t>(a.timeout_ms) * 1000000ull;
  kp.run.seq = seq;
  kp.comm = a.comm;
  kp.comm_control = a.comm_control;
  kp.skip = 0;
  return {};
}

// Zeroes a call's counters (and profile) on `stream`, right before its launch.
std::string zero_counters(cudaStream_t stream, const PersistentLaunchArgs& a) {
  if (a.num_tasks > 0)
    ARK_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(a.counters, 0, sizeof(int32_t) * static_cast<size_t>(a.num_tasks), stream));
  if (a.profile != nullptr && a.num_tasks > 0)
    ARK_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
        a.profile, 0, sizeof(int64_t) * pf::kProfileWordsPerTask * static_cast<size_t>(a.num_tasks),
        stream));
  return {};
}

uint32_t next_seq(DeviceState* st) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return st->next_seq++;
}

std::string too_many_workers(int workers, int resident) {
  return "ark_persistent: the plan needs " + std::to_string(workers) +
         " resident blocks but this GPU keeps only " + std::to_string(resident) +
         " blocks of the persistent kernel resident at once (plan for at most one worker per SM)";
}
}  // namespace

std::string persistent_enqueue(cudaStream_t stream, const PersistentLaunchArgs& a) {
  DeviceState* st = nullptr;
  if (std::string err = device_state(&st); !err.empty()) return err;
  if (a.num_workers > st->co_resident_blocks) return too_many_workers(a.num_workers, st->co_resident_blocks);
  KernelParams kp;
  if (std::string err = prepare_call(a, st, next_seq(st), &kp); !err.empty()) return err;
  if (std::string err = zero_counters(stream, a); !err.empty()) return err;
  ARK_CUDA_RETURN_IF_ERROR(launch_cooperative(persistent_kernel,
                                              static_cast<unsigned>(a.num_workers), kBlockThreads,
                                              tile::kSmemBytes, stream, kp));
  return {};
}

std::string persistent_group_enqueue(cudaStream_t stream,
                                     const std::vector<std::vector<PersistentLaunchArgs>>& calls,
                                     int32_t skip_rank, cudaEvent_t start, cudaEvent_t stop) {
  if (calls.empty() || calls[0].empty()) return "ark_persistent group: no calls or no ranks";
  DeviceState* st = nullptr;
  if (std::string err = device_state(&st); !err.empty()) return err;
  const size_t n = calls[0].size();
  const int workers = calls[0][0].num_workers;
  const int64_t blocks = int64_t{workers} * static_cast<int64_t>(n);
  if (blocks > st->co_resident_blocks) return too_many_workers(static_cast<int>(blocks), st->co_resident_blocks);
  std::vector<KernelParams> params(calls.size() * n);
  for (size_t c = 0; c < calls.size(); ++c) {
    if (calls[c].size() != n) return "ark_persistent group: calls disagree on the rank count";
    const uint32_t seq = next_seq(st);  // one run of every rank: one failure aborts them all
    for (size_t r = 0; r < n; ++r) {
      if (calls[c][r].num_workers != workers) return "ark_persistent group: ranks disagree on num_workers";
      KernelParams& kp = params[c * n + r];
      if (std::string err = prepare_call(calls[c][r], st, seq, &kp); !err.empty()) return err;
      kp.skip = static_cast<int32_t>(r) == skip_rank ? 1 : 0;
    }
  }
  // Every call's parameters in device memory at once (N ranks' pointers exceed the 4 KiB
  // parameter space), so the calls below go back to back with no host step between them.
  KernelParams* device_params = nullptr;
  const size_t bytes = sizeof(KernelParams) * params.size();
  ARK_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&device_params), bytes, stream));
  cudaError_t e = cudaMemcpyAsync(device_params, params.data(), bytes, cudaMemcpyHostToDevice, stream);
  // The host copy must outlive the async copy: wait for it (a harness, not XLA's path).
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess && start != nullptr) e = cudaEventRecord(start, stream);
  for (size_t c = 0; c < calls.size() && e == cudaSuccess; ++c) {
    for (size_t r = 0; r < n; ++r)
      if (std::string err = zero_counters(stream, calls[c][r]); !err.empty()) {
        cudaFreeAsync(device_params, stream);
        return err;
      }
    e = launch_cooperative(persistent_group_kernel, static_cast<unsigned>(blocks), kBlockThreads,
                           tile::kSmemBytes, stream,
                           static_cast<const KernelParams*>(device_params + c * n),
                           static_cast<int32_t>(workers));
  }
  if (e == cudaSuccess && stop != nullptr) e = cudaEventRecord(stop, stream);
  // Freed once the stream passed the launches (stream-ordered).
  const cudaError_t freed = cudaFreeAsync(device_params, stream);
  ARK_CUDA_RETURN_IF_ERROR(e);
  ARK_CUDA_RETURN_IF_ERROR(freed);
  return {};
}

std::string persistent_max_workers(int device, int* blocks) {
  int previous = 0;
  ARK_CUDA_RETURN_IF_ERROR(cudaGetDevice(&previous));
  if (device != previous) ARK_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  // The device's runtime state (abort word, error record: cudaMalloc, a private stream and its
  // synchronization) is created here, when the planner asks at trace time, not at the first
  // enqueue: that may run under XLA's stream capture of a command buffer (the graph target),
  // where those calls are not allowed.
  DeviceState* st = nullptr;
  std::string err = device_state(&st);
  if (err.empty()) *blocks = st->co_resident_blocks;
  if (device != previous) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (err.empty() && restore != cudaSuccess)
      err = std::string("ark_persistent: cudaSetDevice(previous) failed: ") +
            cudaGetErrorString(restore);
  }
  return err;
}

bool persistent_take_failure(std::string* message, bool* is_timeout) {
  DeviceState* st = nullptr;
  if (std::string err = device_state(&st); !err.empty()) {
    *message = err;
    *is_timeout = false;
    return true;
  }
  volatile PersistentErrorRecord* rec = st->host_record;
  if (rec->status == kPersistentOk) return false;
  std::atomic_thread_fence(std::memory_order_acquire);  // status was published last
  PersistentErrorRecord r;
  std::memcpy(&r, const_cast<const PersistentErrorRecord*>(st->host_record), sizeof(r));
  r.op_name[kPersistentNameChars - 1] = '\0';
  r.dep_op_name[kPersistentNameChars - 1] = '\0';
  rec->status = kPersistentOk;
  char buf[768];
  if (r.status == kPersistentPeerTimeout) {
    char what[160];
    if (r.slot < 0)
      std::snprintf(what, sizeof(what), "to enter this call of the plan (a rank that never runs it: "
                    "rank-dependent control flow, or a peer that failed)");
    else
      std::snprintf(what, sizeof(what), "to put its tile into inbox slot %d (run %d; runs seen %d)",
                    r.slot, r.run, r.counter_seen);
    std::snprintf(buf, sizeof(buf),
                  "ark_persistent (CUDA, call #%u): rank %d, worker %d, timed out after %.1f ms in "
                  "task %d (op %d '%s', a put) waiting for peer rank %d %s; the outputs of that "
                  "call are invalid",
                  r.call_seq, r.rank, r.worker, r.waited_ns / 1e6, r.task, r.op, r.op_name, r.peer,
                  what);
    *is_timeout = true;
  } else if (r.status == kPersistentTimeout) {
    char who[48] = "";  // in a group, which rank's worker (a local wait: no peer involved)
    if (r.rank >= 0) std::snprintf(who, sizeof(who), "rank %d, ", r.rank);
    std::snprintf(buf, sizeof(buf),
                  "ark_persistent (CUDA, call #%u): %sworker %d timed out after %.1f ms waiting for "
                  "task %d (op %d '%s', counters[%d] = %d) before running task %d (op %d '%s'); "
                  "the outputs of that call are invalid",
                  r.call_seq, who, r.worker, r.waited_ns / 1e6, r.dep_task, r.dep_op, r.dep_op_name,
                  r.dep_task, r.counter_seen, r.task, r.op, r.op_name);
    *is_timeout = true;
  } else {
    std::snprintf(buf, sizeof(buf),
                  "ark_persistent (CUDA, call #%u): worker %d rejected the plan at task %d (op %d "
                  "'%s', dependency %d): %s; the outputs of that call are invalid",
                  r.call_seq, r.worker, r.task, r.op, r.op_name, r.dep_task,
                  bad_plan_reason(r.detail));
    *is_timeout = false;
  }
  *message = buf;
  return true;
}

}  // namespace jax_ark::gpu
