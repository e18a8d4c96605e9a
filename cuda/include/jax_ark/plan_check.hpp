// The runtime's own check of a binary plan (docs/plan_format.md, "What the runtime checks").
//
// A plan reaches the FFI call as plain int32 words that anyone can build, so before anything runs
// the host checks, once per call and in O(plan size), that NO plan can make an executor read or
// write outside its buffers, run unbounded work, or wait forever: every count, offset and index is
// range checked, every product that sizes memory is computed with overflow checks, the tasks of an
// op cover its output exactly once, every tensor a view reads is an operand or written by some op,
// and the graph "dependencies + queue order" is acyclic. What it does not prove is that the
// dependencies are *sufficient* (a missing one is a race within the plan's own buffers, not a
// memory error): Python's Plan.validate() checks that on every plan it accepts.
//
// Host only (std::string / std::vector); the executors include it, never the device code. Opcode,
// dtype and op-kind knowledge is in the small tables at the top, so new ones slot in there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "jax_ark/plan_format.hpp"
#include "jax_ark/tile_ops.hpp"

namespace jax_ark::plan {

// Bounds every executor shares (the Python validator mirrors them: jax_ark/_persistent/_format.py).
constexpr int32_t kMaxWorkers = 1024;
constexpr int32_t kMaxIntegerPowExponent = 1 << 16;  // |b| of INTEGER_POW: |b| - 1 multiplications
constexpr int64_t kMaxWork = int64_t{1} << 45;       // element-operations of a whole plan
constexpr int64_t kMaxMatmulPanel = int64_t{1} << 28;  // K x (n1 - n0) of one matmul task
constexpr int64_t kMaxTilingCells = int64_t{1} << 24;  // grid cells the exact-cover check builds
constexpr int64_t kWorkspaceAlign = 256;
constexpr int64_t kMaxTripCount = int64_t{1} << 24;   // iterations of one loop (v3)

// What an instruction's operand fields mean, by opcode (-1 registers: not an opcode).
struct OpcodeInfo {
  int registers;     // how many of a, b, c are earlier registers
  bool reads_acc;    // LOAD_ACC
  bool reads_view;   // LOAD / LOAD_AT: a is a view id
  bool moved;        // LOAD_AT: b is an earlier integer register, the element offset
  bool exponent;     // INTEGER_POW / IPOW: b is a loop count (bounded, it costs |b| per element)
};

inline OpcodeInfo opcode_info(int32_t code) {
  if (code == kLoadAcc) return {0, true, false, false, false};
  if (code == kLoad) return {0, false, true, false, false};
  if (code == kLoadAt) return {0, false, true, true, false};
  if (code == kConst || code == kLoadIter || code == kLoadRank) return {0, false, false, false, false};
  if (is_unary(code)) return {1, false, false, false, code == kIntegerPow};
  if (is_binary(code) || is_int_binary(code)) return {2, false, false, false, false};
  if (is_int_unary(code)) return {1, false, false, false, code == kIPow};
  if (code == kSelect) return {3, false, false, false, false};
  return {-1, false, false, false, false};
}

inline bool known_reduce_kind(int32_t kind) { return kind >= 0 && kind < kNumReduceKinds; }

inline bool known_op_kind(int32_t kind) {
  return kind == kOpMatmul || kind == kOpReduce || kind == kOpMap || kind == kOpPut;
}

// The FFI buffers a plan runs against: sizes in bytes and dtypes as plan dtype codes (-1 = a dtype
// the plan format has no code for).
struct PlanBuffers {
  std::vector<int64_t> arg_bytes, result_bytes;
  std::vector<int32_t> arg_dtypes, result_dtypes;
  // Per result: the operand whose buffer it is (XLA input_output_aliases), -1 for its own buffer,
  // -2 when several operands share it.
  std::vector<int32_t> result_alias;
  int64_t workspace_bytes = 0;
  int64_t num_counters = 0;
  bool workspace_is_u8 = true;

  bool operator==(const PlanBuffers& o) const {
    return arg_bytes == o.arg_bytes && result_bytes == o.result_bytes && arg_dtypes == o.arg_dtypes &&
           result_dtypes == o.result_dtypes && result_alias == o.result_alias &&
           workspace_bytes == o.workspace_bytes && num_counters == o.num_counters &&
           workspace_is_u8 == o.workspace_is_u8;
  }
};

namespace check_detail {

inline bool mul_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
inline bool add_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

// a * b, saturating at INT64_MAX (work estimates: "too much" is all that matters past the cap).
inline int64_t sat_mul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}
inline int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}

struct Checker {
  const int32_t* words;
  int64_t n;
  std::string err;
  bool fail(const std::string& m) {
    if (err.empty()) err = m;
    return false;
  }
  // [at, at + count * width) inside the plan, at >= 32; even `at` where records hold int64s.
  bool section(int64_t at, int64_t count, int64_t width, bool even, const char* what) {
    int64_t len = 0, end = 0;
    if (at < 32 || count < 0 || (even && at % 2) || !mul_ok(count, width, &len) ||
        !add_ok(at, len, &end) || end > n)
      return fail(std::string("section ") + what + " is outside the plan (offset " +
                  std::to_string(at) + ", " + std::to_string(count) + " records)");
    return true;
  }
};

inline std::string op_where(int op) { return "op " + std::to_string(op); }

// Largest element a view reaches over dims[0..rank) (all >= 1); false on a negative offset or
// stride or an int64 overflow.
inline bool view_extent(const ViewRecord& v, const int64_t* dims, int rank, int64_t* hi) {
  int64_t acc = v.offset;
  if (acc < 0) return false;
  for (int d = 0; d < rank; ++d) {
    int64_t step = 0;
    if (v.strides[d] < 0 || dims[d] < 1 || !mul_ok(dims[d] - 1, v.strides[d], &step) ||
        !add_ok(acc, step, &acc))
      return false;
  }
  *hi = acc;
  return true;
}

// The v3 route section (plan_format.hpp, RouteView): only in a plan with a group, inside the plan;
// each routed op's table is checked with the op.
inline bool check_route_section(const PlanView& p, Checker& c) {
  const Header& h = p.header();
  if (h.version < 3 || h.group_size == 0)
    return h.routes_at == 0 || c.fail("header.routes_at must be 0 without a communication group");
  if (h.routes_at == 0) return true;
  if (!c.section(h.routes_at, 2, 1, true, "routes")) return false;
  const int64_t route_words = p.words[h.routes_at];
  if (route_words < 0 || p.words[h.routes_at + 1] != 0)
    return c.fail("route section: bad length " + std::to_string(route_words));
  return c.section(h.routes_at, 2 + route_words, 1, true, "routes");
}

// The v3 loop section (plan_format.hpp, LoopView): inside the plan; loops ordered by first op,
// each inside its parent's range (parents earlier, at most kMaxLoopDepth levels), loops with one
// parent (or top-level ones) disjoint; bounded trip counts and runs (the product over the nest,
// since a counter counts runs); each op's loop id the innermost loop whose range holds it; stacked
// ops in a loop writing a (trip_count, ...) tensor (a window store may be in a loop: an in-place
// carry). The other sections
// were checked before (ops, tensors, views are in range).
inline bool check_loop_section(const PlanView& p, Checker& c) {
  const Header& h = p.header();
  const LoopView lv{p.words};
  if (h.version < 3) return h.loops_at == 0 || c.fail("header.loops_at must be 0 before version 3");
  if (h.loops_at == 0) return true;
  if (!c.section(h.loops_at, 2, 1, true, "loops")) return false;
  const int64_t num_loops = p.words[h.loops_at];
  const int32_t flags = p.words[h.loops_at + 1];
  if (num_loops < 1 || num_loops > h.num_ops)
    return c.fail("loop section: " + std::to_string(num_loops) + " loops, not 1..num_ops");
  if (flags != 0 && flags != kLoopsOuterStrides)
    return c.fail("loop section: flags " + std::to_string(flags) + " not 0 or 1 (outer iteration strides)");
  const int64_t stride_arrays = flags & kLoopsOuterStrides ? 2 : 1;
  if (!c.section(h.loops_at, 2 + 8 * num_loops + 2 * int64_t{h.num_ops} + stride_arrays * 2 * int64_t{h.num_views},
                 1, true, "loops"))
    return false;
  std::vector<int32_t> last_child(num_loops + 1, -1);  // [parent + 1]: the latest loop with that parent
  for (int l = 0; l < num_loops; ++l) {
    const LoopRecord& r = lv.loop(l);
    const std::string where = "loop " + std::to_string(l);
    if (r.trip_count < 1 || r.trip_count > kMaxTripCount)
      return c.fail(where + ": trip_count " + std::to_string(r.trip_count) + " not in 1..2^24");
    if (r.first_op < 0 || r.first_op >= r.end_op || r.end_op > h.num_ops)
      return c.fail(where + ": ops [" + std::to_string(r.first_op) + ", " + std::to_string(r.end_op) +
                    ") not a range of ops");
    if (r.reserved != 0) return c.fail(where + ": reserved word must be 0");
    if (r.pred_op_plus1 == 0 && r.pred_task != 0) return c.fail(where + ": pred_task set on a for loop");
    if (r.parent_plus1 < 0 || r.parent_plus1 > l)
      return c.fail(where + ": parent " + std::to_string(r.parent_plus1 - 1) + " is not an earlier loop");
    const int32_t parent = r.parent_plus1 - 1;
    if (parent >= 0) {
      const LoopRecord& pr = lv.loop(parent);
      if (pr.parent_plus1 != 0)
        return c.fail(where + ": nested more than " + std::to_string(kMaxLoopDepth) + " loops deep");
      if (r.first_op < pr.first_op || r.end_op > pr.end_op)
        return c.fail(where + ": not inside the ops of its parent loop " + std::to_string(parent));
      if (r.trip_count * pr.trip_count > kMaxTripCount)
        return c.fail(where + ": " + std::to_string(r.trip_count * pr.trip_count) +
                      " runs in all (trip counts times its parent's), more than 2^24");
    }
    const int32_t prev = last_child[parent + 1];
    if (prev >= 0 && lv.loop(prev).end_op > r.first_op)
      return c.fail(where + ": overlaps loop " + std::to_string(prev) + " or is out of order");
    if (l > 0 && lv.loop(l - 1).first_op > r.first_op) return c.fail(where + ": loops out of order");
    last_child[parent + 1] = l;
  }
  // While loops: top level, no loop inside, the predicate a stacked bool (trip_count,) op of the
  // loop with one task (its slice is one element: the cover check below makes it one task).
  for (int l = 0; l < num_loops; ++l) {
    const LoopRecord& r = lv.loop(l);
    if (r.pred_op_plus1 == 0) continue;
    const std::string where = "loop " + std::to_string(l) + " (a while loop)";
    const int64_t pred = int64_t{r.pred_op_plus1} - 1;
    if (pred < r.first_op || pred >= r.end_op) return c.fail(where + ": predicate op not in the loop");
    if (r.parent_plus1 != 0) return c.fail(where + ": a while loop must be a top-level loop");
    for (int k = l + 1; k < num_loops; ++k)
      if (lv.loop(k).parent_plus1 == l + 1) return c.fail(where + ": holds a nested loop");
    const OpLoopRecord& pr = lv.op_records()[pred];
    const TensorRecord& out = p.tensor(p.op(static_cast<int>(pred)).out_tensor);
    if (pr.stacked != kStackedForward || out.dtype != kBool || out.rank != 1 || out.dims[0] != r.trip_count)
      return c.fail(where + ": the predicate op must write a stacked bool (trip_count,) tensor");
    if (r.pred_task < 0 || r.pred_task >= h.num_tasks || p.task(r.pred_task).op != pred)
      return c.fail(where + ": pred_task is not a task of the predicate op");
  }
  // The innermost loop of each op: parents come before their children, so the last write wins
  // (O(num_ops * kMaxLoopDepth): loops with one parent are disjoint).
  std::vector<int32_t> innermost(h.num_ops, -1);
  for (int l = 0; l < num_loops; ++l)
    for (int i = lv.loop(l).first_op; i < lv.loop(l).end_op; ++i) innermost[i] = l;
  for (int i = 0; i < h.num_ops; ++i) {
    const OpLoopRecord& r = lv.op_records()[i];
    const std::string where = op_where(i);
    const bool inside = innermost[i] >= 0;
    if (r.loop != innermost[i])
      return c.fail(where + ": loop id " + std::to_string(r.loop) + " disagrees with the loop ranges");
    const OpRecord& op = p.op(i);
    if (r.stacked < 0 || r.stacked > kStackedReversed)
      return c.fail(where + ": stacked must be 0, 1 or 2 (reversed)");
    if (r.stacked && op.store_view_plus1 != 0) return c.fail(where + ": a window store cannot be stacked");
    // A put in a loop body fills one slice of its stacked inbox per run (a peer may run ahead
    // by iterations; docs/plan_format.md "Loops and communication"): slice k at its k-th run,
    // the run index over its loops (outer iteration x inner trip count + inner iteration in a
    // nested loop), so no slice is reused within a call. Forward stacked: the body reads slice k
    // at run k (a reversed put would fill it only at the mirrored run, too late for its readers).
    if (op.kind == kOpPut && inside && r.stacked != kStackedForward)
      return c.fail(where + ": a put op in a loop must be stacked forward (one inbox slice per "
                            "run of its loops, slice k at run k)");
    if (r.stacked) {
      const TensorRecord& out = p.tensor(op.out_tensor);  // range checked by the caller first
      const int64_t slices = op.kind == kOpPut ? lv.op_trips(i) : lv.loop(r.loop).trip_count;
      if (!inside || out.rank < 1 || out.dims[0] != slices)
        return c.fail(where + ": a stacked op is in a loop and its output's first dim is the trip "
                              "count (a put's: its runs per call, over all its loops)");
    }
  }
  return true;
}

// The range [*lo, *hi] of the element shift of view v over every run of op (its loops'
// iterations times the view's iteration strides); false on overflow.
inline bool view_shift_range(const LoopView& lv, int v, int op, int64_t* lo, int64_t* hi) {
  *lo = *hi = 0;
  const int depth = lv.op_depth(op);
  for (int level = 0; level < depth; ++level) {
    const int64_t stride = level == depth - 1 ? lv.view_iter_stride(v) : lv.view_outer_iter_stride(v);
    int64_t far = 0;
    if (!mul_ok(lv.loop(lv.level_loop(op, level)).trip_count - 1, stride, &far)) return false;
    if (!add_ok(far < 0 ? *lo : *hi, far, far < 0 ? lo : hi)) return false;
  }
  return true;
}

// The first workspace tensor other than t whose bytes overlap t's (-1: none). An inbox, and the
// source of a put read in place, must be alone in its bytes: peers write or read them whenever
// they get there, so no local dependency could order a reuse against them.
inline int32_t workspace_overlap(const PlanView& p, int32_t t) {
  const TensorRecord& r = p.tensor(t);
  const int64_t lo = r.byte_offset, hi = lo + r.num_elements * dtype_size(r.dtype);
  for (int32_t k = 0; k < p.header().num_tensors; ++k) {
    const TensorRecord& o = p.tensor(k);
    if (k == t || o.storage != kStorageWorkspace) continue;
    if (o.byte_offset < hi && lo < o.byte_offset + o.num_elements * dtype_size(o.dtype)) return k;
  }
  return -1;
}

// Why put op i cannot be read in place ("" when it can; docs/plan_format.md, "Puts read in
// place"; the same rules as jax_ark/_persistent/_validate.py): its readers read each slot's tile
// in the source rank's source tensor, so that tensor must be a workspace tensor written once,
// outside loops, by one other op (the only writes peers may see), its (m, n) tile rows
// contiguous, every slot must have a source rank, and only programs' LOADs may read the inbox
// (the read path that resolves slots to peers; not an operand view, a store view or LOAD_AT).
// Expects records in range.
inline std::string read_in_place_problem(const PlanView& p, const LoopView& lv, int i) {
  const Header& h = p.header();
  const OpRecord& op = p.op(i);
  if (lv.op_loop(i) >= 0) return "it is in a loop";
  if (op.route_plus1 != 0) {
    const RouteView route = p.route(op);
    for (int q = 0; q < h.group_size; ++q)
      for (int b = 0; b < op.B; ++b)
        if (route.recv_from(q, b) < 0) return "a slot has no source rank (zeros)";
  }
  const ViewRecord& v = p.view(op.a_view);
  const int32_t src = v.tensor;
  if (p.tensor(src).storage != kStorageWorkspace)
    return "its source (tensor " + std::to_string(src) + ") is not a workspace tensor";
  if (v.strides[2] != 1 || (op.M > 1 && v.strides[1] != op.N))
    return "its source view's (m, n) tile is not contiguous";
  int writers = 0, writer = -1;
  for (int j = 0; j < h.num_ops; ++j)
    if (p.op(j).out_tensor == src) ++writers, writer = j;
  if (writers != 1)
    return "its source (tensor " + std::to_string(src) + ") is written by " + std::to_string(writers) +
           " ops, not one";
  const OpRecord& w = p.op(writer);
  if (w.kind == kOpPut || w.store_view_plus1 != 0 || lv.op_loop(writer) >= 0)
    return "its source (tensor " + std::to_string(src) + ") is written by op " +
           std::to_string(writer) + ", a put, a window store or an op in a loop";
  const auto of_inbox = [&](int32_t view) {
    return view >= 0 && view < h.num_views && p.view(view).tensor == op.out_tensor;
  };
  for (int j = 0; j < h.num_ops; ++j) {
    const OpRecord& o = p.op(j);
    if (of_inbox(o.a_view) || of_inbox(o.b_view) || of_inbox(o.store_view_plus1 - 1))
      return "op " + std::to_string(j) + " reads its inbox through an operand or store view";
    for (int part = 0; part < 2; ++part) {
      const int32_t at = part == 0 ? o.prologue_at : o.epilogue_at;
      const int32_t len = part == 0 ? o.prologue_len : o.epilogue_len;
      for (int k = 0; k < len; ++k)
        if (opcode_of(p.instruction(at + k)) == kLoadAt && of_inbox(p.instruction(at + k).a))
          return "op " + std::to_string(j) + " reads its inbox with LOAD_AT";
    }
  }
  return "";
}

}  // namespace check_detail

// v3: where the inboxes end in the workspace. Every PUT op writes a workspace tensor (its inbox)
// and the planner places the inboxes (and the sources of puts read in place) first, so they fill
// bytes [0, *inbox_end) and no other workspace tensor lies there: both executors keep those
// bytes in the group's symmetric region (persistent_comm_device.hpp), not in XLA's workspace.
// Returns "" or what is wrong. Expects tensor and op records already in range (check_plan checks
// them first).
inline std::string inbox_end_of(const PlanView& p, int64_t* inbox_end) {
  const Header& h = p.header();
  *inbox_end = 0;
  std::vector<char> is_inbox(static_cast<size_t>(h.num_tensors > 0 ? h.num_tensors : 0), 0);
  for (int i = 0; i < h.num_ops; ++i) {
    const OpRecord& op = p.op(i);
    if (op.kind != kOpPut) continue;
    if (op.out_tensor < 0 || op.out_tensor >= h.num_tensors) return "a put op's inbox is out of range";
    const TensorRecord& t = p.tensor(op.out_tensor);
    if (t.storage != kStorageWorkspace) return "a put op's inbox is not in the workspace";
    is_inbox[op.out_tensor] = 1;
    *inbox_end = std::max(*inbox_end, t.byte_offset + t.num_elements * dtype_size(t.dtype));
    if (op.read_in_place) {
      // Its source is read by peers in this rank's region: placed there too, and alone in its
      // bytes (peers read it whenever they get to it; no local dependency orders a reuse).
      const int32_t src = p.view(op.a_view).tensor;
      const TensorRecord& st = p.tensor(src);
      if (const int32_t k = check_detail::workspace_overlap(p, src); k >= 0)
        return "op " + std::to_string(i) + ": its read-in-place source (tensor " + std::to_string(src) +
               ") shares workspace bytes with tensor " + std::to_string(k);
      is_inbox[src] = 1;
      *inbox_end = std::max(*inbox_end, st.byte_offset + st.num_elements * dtype_size(st.dtype));
    }
  }
  for (int i = 0; i < h.num_tensors; ++i) {
    const TensorRecord& t = p.tensor(i);
    if (t.storage != kStorageWorkspace || is_inbox[i] || t.num_elements == 0) continue;
    if (t.byte_offset < *inbox_end)
      return "workspace tensor " + std::to_string(i) + " lies below the end of the inboxes (byte " +
             std::to_string(*inbox_end) +
             "): the executors keep those bytes in the group's symmetric region, so the planner "
             "must place every inbox first (re-plan with this jax_ark)";
  }
  return "";
}

// Returns "" when the plan can run safely against these buffers, else what is wrong (naming the
// section / tensor / view / op / task / worker).
inline std::string check_plan(const int32_t* words, int64_t num_words, const PlanBuffers& buf) {
  using namespace check_detail;
  if (words == nullptr || num_words < 32) return "plan shorter than its 32-word header";
  if (reinterpret_cast<uintptr_t>(words) % 8 != 0) return "plan buffer is not 8-byte aligned";
  Checker c{words, num_words, {}};
  const PlanView p{words};
  const Header& h = p.header();
  if (h.magic != kMagic) return "bad plan magic (not an ark plan)";
  if (h.version < 1 || h.version > kVersion)
    return "plan version " + std::to_string(h.version) + " not supported (this executor knows 1.." +
           std::to_string(kVersion) + ")";
  if (h.header_words != 32) return "header_words != 32";
  if (h.total_words != num_words)
    return "plan length " + std::to_string(num_words) + " != header.total_words " +
           std::to_string(h.total_words);
  if (h.num_workers < 1 || h.num_workers > kMaxWorkers)
    return "num_workers " + std::to_string(h.num_workers) + " not in 1.." + std::to_string(kMaxWorkers);
  if (h.num_tasks < 0 || h.num_ops < 0 || h.num_tensors < 0 || h.num_views < 0 || h.num_args < 0 ||
      h.num_outputs < 0 || h.num_dep_edges < 0 || h.code_words < 0 || h.names_bytes < 0)
    return "negative count in the plan header";
  if (h.flags != 0) return "header.flags must be 0";
  // v3: a plan with PUT ops names its group size; its signals follow the task counters.
  if (h.group_size < 0 || h.group_size > kMaxGroupSize || (h.version < 3 && h.group_size != 0))
    return "group_size " + std::to_string(h.group_size) + " not in 0.." + std::to_string(kMaxGroupSize) +
           " (and 0 before version 3)";
  int64_t expect_counters = 0;
  if (!mul_ok(int64_t{h.num_tasks}, int64_t{1} + h.group_size, &expect_counters) || expect_counters > INT32_MAX)
    return "num_tasks * (1 + group_size) overflows";
  if (h.num_counters != expect_counters) return "num_counters != num_tasks * (1 + group_size)";
  if (h.profile_words_per_task != kProfileWordsPerTask) return "profile_words_per_task != 4";
  if (h.code_words % 4) return "code_words is not a multiple of 4";
  if (!(c.section(h.tensors_at, h.num_tensors, 24, true, "tensors") &&
        c.section(h.views_at, h.num_views, 16, true, "views") &&
        c.section(h.ops_at, h.num_ops, 40, true, "ops") &&
        c.section(h.tasks_at, h.num_tasks, 8, false, "tasks") &&
        c.section(h.dep_offsets_at, int64_t{h.num_tasks} + 1, 1, false, "dependency offsets") &&
        c.section(h.deps_at, h.num_dep_edges, 1, false, "dependencies") &&
        c.section(h.queue_offsets_at, int64_t{h.num_workers} + 1, 1, false, "queue offsets") &&
        c.section(h.queues_at, h.num_tasks, 1, false, "queues") &&
        c.section(h.code_at, h.code_words, 1, false, "code") &&
        c.section(h.names_at, (int64_t{h.names_bytes} + 3) / 4, 1, false, "names")))
    return c.err;

  // ---- buffers ----
  if (static_cast<int64_t>(buf.arg_bytes.size()) != h.num_args)
    return "the call has " + std::to_string(buf.arg_bytes.size()) + " plan operands, the plan " +
           std::to_string(h.num_args);
  if (static_cast<int64_t>(buf.result_bytes.size()) != h.num_outputs)
    return "the call has " + std::to_string(buf.result_bytes.size()) + " outputs, the plan " +
           std::to_string(h.num_outputs);
  if (buf.num_counters != h.num_counters) return "counters result size != num_counters";
  if (buf.arg_dtypes.size() != buf.arg_bytes.size() || buf.result_dtypes.size() != buf.result_bytes.size() ||
      buf.result_alias.size() != buf.result_bytes.size())
    return "inconsistent buffer description";
  if (!buf.workspace_is_u8) return "the workspace result must be uint8";
  if (h.workspace_bytes < 0 || h.workspace_bytes > buf.workspace_bytes)
    return "workspace_bytes " + std::to_string(h.workspace_bytes) +
           " is negative or larger than the workspace result (" + std::to_string(buf.workspace_bytes) + ")";

  // ---- tensors ----
  std::vector<int32_t> result_tensor(h.num_outputs, -1);
  std::vector<int32_t> alias_of_arg(h.num_args, -1);  // the result tensor updating operand a in place
  for (int t = 0; t < h.num_tensors; ++t) {
    const TensorRecord& r = p.tensor(t);
    const std::string where = "tensor " + std::to_string(t);
    const int size = dtype_size(r.dtype);
    if (size == 0) return where + ": unknown dtype " + std::to_string(r.dtype);
    if (r.rank < 0 || r.rank > kMaxRank) return where + ": rank not in 0..6";
    int64_t elems = 1, bytes = 0;
    for (int d = 0; d < kMaxRank; ++d) {
      if (d >= r.rank ? r.dims[d] != 1 : r.dims[d] < 0) return where + ": bad dims";
      if (!mul_ok(elems, r.dims[d], &elems)) return where + ": element count overflows int64";
    }
    if (r.num_elements != elems) return where + ": num_elements != product of dims";
    if (!mul_ok(elems, size, &bytes)) return where + ": byte size overflows int64";
    if (r.storage == kStorageArg || r.storage == kStorageResult) {
      const bool arg = r.storage == kStorageArg;
      const int64_t count = arg ? h.num_args : h.num_outputs;
      if (r.storage_index < 0 || r.storage_index >= count)
        return where + ": " + (arg ? "operand" : "result") + " index " +
               std::to_string(r.storage_index) + " out of range";
      const int64_t have = arg ? buf.arg_bytes[r.storage_index] : buf.result_bytes[r.storage_index];
      const int32_t have_dt = arg ? buf.arg_dtypes[r.storage_index] : buf.result_dtypes[r.storage_index];
      if (have != bytes || have_dt != r.dtype)
        return where + ": " + (arg ? "operand " : "result ") + std::to_string(r.storage_index) +
               " has " + std::to_string(have) + " bytes of dtype code " + std::to_string(have_dt) +
               ", the plan expects " + std::to_string(bytes) + " of dtype code " + std::to_string(r.dtype);
      if (r.byte_offset != 0) return where + ": byte_offset must be 0 outside the workspace";
      if (!arg) {
        if (result_tensor[r.storage_index] >= 0)
          return where + ": shares result " + std::to_string(r.storage_index) + " with tensor " +
                 std::to_string(result_tensor[r.storage_index]);
        result_tensor[r.storage_index] = t;
        // In place (v2): the result IS operand alias_plus1 - 1's buffer, exactly when XLA passed
        // that buffer (an undeclared alias would let ops read bytes other ops overwrite).
        const int64_t a = int64_t{r.alias_plus1} - 1;
        if (a < -1 || a >= h.num_args) return where + ": alias operand out of range";
        if (a >= 0 && (buf.arg_bytes[a] != bytes || buf.arg_dtypes[a] != r.dtype))
          return where + ": aliases operand " + std::to_string(a) + " of another size or dtype";
        if (bytes > 0 && buf.result_alias[r.storage_index] != a)
          return where + ": declares alias operand " + std::to_string(a) + " but the call's result " +
                 std::to_string(r.storage_index) + " is " +
                 (buf.result_alias[r.storage_index] < 0
                      ? std::string(buf.result_alias[r.storage_index] == -1 ? "its own buffer"
                                                                             : "several operands' buffer")
                      : "operand " + std::to_string(buf.result_alias[r.storage_index]) + "'s buffer");
        if (a >= 0) {
          if (alias_of_arg[a] >= 0)
            return where + ": operand " + std::to_string(a) + " is already aliased by tensor " +
                   std::to_string(alias_of_arg[a]);
          alias_of_arg[a] = t;
        }
      } else if (r.alias_plus1 != 0) {
        return where + ": only a result may alias an operand";
      }
    } else if (r.storage == kStorageWorkspace) {
      int64_t end = 0;
      if (r.alias_plus1 != 0) return where + ": only a result may alias an operand";
      if (r.byte_offset < 0 || r.byte_offset % kWorkspaceAlign || !add_ok(r.byte_offset, bytes, &end) ||
          end > h.workspace_bytes)
        return where + ": bytes [" + std::to_string(r.byte_offset) + ", +" + std::to_string(bytes) +
               ") are not a 256-aligned range of the workspace (" + std::to_string(h.workspace_bytes) + " bytes)";
    } else {
      return where + ": unknown storage " + std::to_string(r.storage);
    }
  }
  for (int i = 0; i < h.num_outputs; ++i)
    if (result_tensor[i] < 0) return "result " + std::to_string(i) + " has no tensor";

  // ---- views (shape-independent part; extents are checked per use below) ----
  for (int v = 0; v < h.num_views; ++v) {
    const ViewRecord& r = p.view(v);
    if (r.tensor < 0 || r.tensor >= h.num_tensors || r.rank < 0 || r.rank > kMaxRank)
      return "view " + std::to_string(v) + ": tensor or rank out of range";
  }
  // v3 loops: checked before any view extent or op space depends on them.
  for (int i = 0; i < h.num_ops; ++i)
    if (p.op(i).out_tensor < 0 || p.op(i).out_tensor >= h.num_tensors)
      return op_where(i) + ": output tensor out of range";
  if (!check_loop_section(p, c)) return c.err;
  if (!check_route_section(p, c)) return c.err;
  const LoopView lv{words};
  std::vector<int32_t> writer(h.num_tensors, -1);
  std::vector<char> read(h.num_tensors, 0);
  const auto view_in = [&](int view, const int64_t* dims, int rank, int op) -> bool {
    const ViewRecord& v = p.view(view);
    int64_t hi = 0;
    if (v.rank != rank)
      return c.fail(op_where(op) + ": view " + std::to_string(view) + " has rank " +
                    std::to_string(v.rank) + ", its iteration space " + std::to_string(rank));
    int64_t shift_lo = 0, shift_hi = 0;  // v3: how far the view moves over the op's iterations
    const bool iter_ok = view_shift_range(lv, view, op, &shift_lo, &shift_hi);
    if (!view_extent(v, dims, rank, &hi) || !iter_ok || v.offset + shift_lo < 0 ||
        !add_ok(hi, shift_hi, &hi) || hi >= p.tensor(v.tensor).num_elements)
      return c.fail(op_where(op) + ": view " + std::to_string(view) + " reads outside tensor " +
                    std::to_string(v.tensor) + " (negative or overflowing offset / stride, or past its " +
                    std::to_string(p.tensor(v.tensor).num_elements) + " elements)");
    // A task reading bytes its own op writes would see them half overwritten (or never written).
    const TensorRecord& in = p.tensor(v.tensor);
    const int32_t out_id = p.op(op).out_tensor;
    const TensorRecord& out = p.tensor(out_id);
    const bool overlap = in.storage == kStorageWorkspace && out.storage == kStorageWorkspace &&
                         in.byte_offset < out.byte_offset + out.num_elements * dtype_size(out.dtype) &&
                         out.byte_offset < in.byte_offset + in.num_elements * dtype_size(in.dtype);
    // An aliased result's bytes are its operand's: the op writing it must not read that operand.
    const bool aliased = in.storage == kStorageArg && out.storage == kStorageResult &&
                         out.alias_plus1 != 0 && in.storage_index == out.alias_plus1 - 1;
    if (v.tensor == out_id || overlap || aliased)
      return c.fail(op_where(op) + ": view " + std::to_string(view) + " reads tensor " +
                    std::to_string(v.tensor) + ", whose bytes the op itself writes");
    read[v.tensor] = 1;
    return true;
  };
  // A program's bounds, operands and views; returns its cost per element (INTEGER_POW counts its
  // multiplications), or -1 with c.err set.
  const auto program = [&](int op, int at, int len, const int64_t* dims, int rank, bool acc_ok,
                           const char* what) -> int64_t {
    int64_t end = 0;
    if (len < 1 || len > kMaxProgramLen || at < 0 || !add_ok(at, len, &end) || end * 4 > h.code_words)
      return c.fail(op_where(op) + ": " + what + " program [" + std::to_string(at) + ", +" +
                    std::to_string(len) + ") outside the code section or not 1..64 long"), -1;
    int64_t cost = 0;
    for (int i = 0; i < len; ++i) {
      const Instruction& ins = p.instruction(at + i);
      const int32_t code = opcode_of(ins);
      const std::string where = op_where(op) + " " + what + " instruction " + std::to_string(i);
      const OpcodeInfo info = opcode_info(code);
      if (info.registers < 0 || (ins.op_and_dtype >> 24) != 0)
        return c.fail(where + ": unknown opcode " + std::to_string(code)), -1;
      if (dtype_size(dtype_of(ins)) == 0) return c.fail(where + ": unknown dtype"), -1;
      if (code == kLoadRank && h.group_size == 0)
        return c.fail(where + ": LOAD_RANK in a plan without a communication group"), -1;
      if (info.reads_acc && !acc_ok) return c.fail(where + ": LOAD_ACC in an op without accumulator"), -1;
      if (info.reads_view) {
        if (ins.a < 0 || ins.a >= h.num_views) return c.fail(where + ": view out of range"), -1;
        if (!view_in(ins.a, dims, rank, op)) return -1;
      }
      const int32_t regs[3] = {ins.a, ins.b, ins.c};
      for (int k = 0; k < info.registers; ++k)
        if (regs[k] < 0 || regs[k] >= i)
          return c.fail(where + ": operand register " + std::to_string(regs[k]) +
                        " is not an earlier instruction"), -1;
      // LOAD_AT moves the view's element by this register's int32 value; the executors clamp
      // the moved element into the tensor, and view_in above proved the unmoved reach inside it
      // (so the tensor is not empty): every offset value stays inside the buffer.
      if (info.moved && (ins.b < 0 || ins.b >= i || !is_int_dtype(dtype_of(p.instruction(at + ins.b)))))
        return c.fail(where + ": LOAD_AT offset register " + std::to_string(ins.b) +
                      " is not an earlier integer register"), -1;
      int64_t step = 1;
      if (info.exponent) {
        if (ins.b < -kMaxIntegerPowExponent || ins.b > kMaxIntegerPowExponent)
          return c.fail(where + ": integer_pow exponent " + std::to_string(ins.b) + " outside +-" +
                        std::to_string(kMaxIntegerPowExponent)), -1;
        step = std::max<int64_t>(1, ins.b < 0 ? -int64_t{ins.b} : ins.b);
      }
      cost += step;
    }
    return cost;
  };

  // ---- ops ----
  int64_t work = 0;
  for (int i = 0; i < h.num_ops; ++i) {
    const OpRecord& op = p.op(i);
    const std::string where = op_where(i);
    if (!known_op_kind(op.kind)) return where + ": unknown op kind " + std::to_string(op.kind);
    if (op.out_tensor < 0 || op.out_tensor >= h.num_tensors) return where + ": output tensor out of range";
    const TensorRecord& out = p.tensor(op.out_tensor);
    if (out.storage == kStorageArg) return where + ": writes operand tensor " + std::to_string(op.out_tensor);
    // A window store (v2; a matmul's: v3) writes only the window iter_dims of its aliased result,
    // at its store view's element + an int32 register, kept inside the tensor by the executors.
    const bool window = op.store_view_plus1 != 0;
    // A scatter fold (a REDUCE with a store view) gives its whole output its first value, then
    // folds values into elements chosen at run time: the one writer of its tensor.
    const bool fold = window && op.kind == kOpReduce;
    const auto stores_window = [&](const OpRecord& o) { return o.store_view_plus1 != 0 && o.kind != kOpReduce; };
    // Several window stores outside loops may update one tensor in turn (a chain of updates of
    // one buffer; the planner orders them by dependencies); no other op shares an output.
    if (writer[op.out_tensor] >= 0 &&
        !(stores_window(op) && stores_window(p.op(writer[op.out_tensor])) && lv.op_loop(i) < 0 &&
          lv.op_loop(writer[op.out_tensor]) < 0))
      return where + ": tensor " + std::to_string(op.out_tensor) + " is also written by op " +
             std::to_string(writer[op.out_tensor]);
    writer[op.out_tensor] = i;
    if (op.route_plus1 != 0 && op.kind != kOpPut) return where + ": only a put op has a routing table";
    if (op.read_in_place != 0 && (op.kind != kOpPut || op.read_in_place != 1))
      return where + ": read_in_place is 1 on a put op only";
    int64_t space_elems = out.num_elements;
    // A stacked op (v3) computes one slice (dims 1..rank) of its output per iteration.
    const bool stacked = lv.op_stacked(i);
    if (stacked) space_elems = out.dims[0] ? out.num_elements / out.dims[0] : 0;
    if (window) {
      if (!fold && ((op.kind != kOpMap && op.kind != kOpMatmul) || out.storage != kStorageResult ||
                    out.alias_plus1 == 0))
        return where + ": a window store must be a map or matmul op writing an aliased result";
      if (op.iter_rank < 0 || op.iter_rank > kMaxRank) return where + ": window rank not in 0..6";
      int64_t window_elems = 1;
      for (int d = 0; d < op.iter_rank; ++d)
        if (op.iter_dims[d] < 1 || !mul_ok(window_elems, op.iter_dims[d], &window_elems))
          return where + ": bad window iter_dims";
      if (!fold) space_elems = window_elems;  // a fold's epilogue walks its whole output
      if (fold && (op.kept_rank != 0 || is_arg_reduce(op.reduce_kind)))
        return where + ": a scatter fold has kept_rank 0 and no arg reduce kind";
      const int32_t sv = op.store_view_plus1 - 1;
      int64_t hi = 0;
      if (op.store_view_plus1 < 1 || sv >= h.num_views || p.view(sv).tensor != op.out_tensor ||
          p.view(sv).rank != op.iter_rank)
        return where + ": store view is not a view of its output over iter_dims";
      if (!view_extent(p.view(sv), op.iter_dims, op.iter_rank, &hi) || hi >= out.num_elements)
        return where + ": store view reaches outside its output";
      if (op.store_at_plus1 < 1 || op.store_at_plus1 > (fold ? op.prologue_len : op.epilogue_len))
        return where + ": store_at is not a register of its " + (fold ? "prologue" : "epilogue");
    } else if (op.store_at_plus1 != 0) {
      return where + ": store_at without a store view";
    }
    int64_t elems = 0;
    const int64_t int32_max = INT32_MAX;
    if (op.B < 1 || op.M < 1 || op.N < 1 || op.B > int32_max || op.M > int32_max || op.N > int32_max ||
        !mul_ok(op.B, op.M, &elems) || !mul_ok(elems, op.N, &elems) || elems != space_elems)
      return where + ": B*M*N = " + std::to_string(op.B) + "*" + std::to_string(op.M) + "*" +
             std::to_string(op.N) + " != the " + std::to_string(space_elems) + " elements of its " +
             (window && !fold ? "window" : "output") + " (each in 1..2^31-1)";
    if ((op.kind == kOpMap || op.kind == kOpReduce) && (op.B != 1 || (op.kind == kOpReduce && op.N != 1)))
      return where + ": a reduce op has B = N = 1, a map op B = 1";
    if (dtype_size(op.acc_dtype) == 0) return where + ": unknown acc_dtype";
    if (op.name_at < 0 || op.name_len < 0 || int64_t{op.name_at} + op.name_len > h.names_bytes)
      return where + ": name outside the names section";
    int64_t inner = 0;  // per output element, before the epilogue
    int64_t fold_work = 0;  // a scatter fold's prologue: once per iteration element
    if (op.kind == kOpMatmul) {
      if (op.K < 1 || op.K > int32_max) return where + ": K must be in 1..2^31-1";
      if (op.a_view < 0 || op.a_view >= h.num_views || op.b_view < 0 || op.b_view >= h.num_views)
        return where + ": operand view out of range";
      const int64_t ad[3] = {op.B, op.M, op.K}, bd[3] = {op.B, op.K, op.N};
      if (!view_in(op.a_view, ad, 3, i) || !view_in(op.b_view, bd, 3, i)) return c.err;
      inner = op.K;
    } else if (op.kind == kOpReduce) {
      if (!known_reduce_kind(op.reduce_kind)) return where + ": unknown reduce kind";
      if (op.reduce_kind == kReduceLast && !fold) return where + ": reduce kind 'last' outside a scatter fold";
      if (op.iter_rank < 0 || op.iter_rank > kMaxRank || op.kept_rank < 0 || op.kept_rank > op.iter_rank)
        return where + ": bad reduce iteration rank";
      int64_t kept = 1, red = 1;
      for (int d = 0; d < op.iter_rank; ++d) {
        int64_t& side = d < op.kept_rank ? kept : red;
        if (op.iter_dims[d] < 1 || !mul_ok(side, op.iter_dims[d], &side))
          return where + ": bad reduce iteration dims";
      }
      if ((!fold && kept != op.M) || red != op.K || op.K > int32_max)
        return where + ": iteration space != M x K";
      const int64_t pro = program(i, op.prologue_at, op.prologue_len, op.iter_dims, op.iter_rank,
                                  false, "prologue");
      if (pro < 0) return c.err;
      if (fold && !is_int_dtype(dtype_of(p.instruction(op.prologue_at + op.store_at_plus1 - 1))))
        return where + ": store_at is not an integer register of the prologue";
      if (fold) fold_work = std::exchange(inner, 0);
      inner = sat_mul(op.K, pro + 1);
    }
    if (op.kind == kOpPut) {
      // v3: a copy of the source tile into every peer's inbox; no programs.
      // Default routing: one slot per rank. A routing table (ppermute, a collective over a
      // subgroup of the plan's ranks) may have fewer slots; every value is checked here, so the
      // executor's sends and waits stay inside the group and the source view.
      if (op.route_plus1 == 0 ? op.B != h.group_size : (op.B < 1 || op.B > h.group_size))
        return where + ": a put op's B must be the plan's group_size (" + std::to_string(h.group_size) +
               "), or 1..group_size with a routing table";
      if (op.route_plus1 != 0) {
        if (h.routes_at == 0) return where + ": a routing table but no route section";
        const int64_t cells = int64_t{h.group_size} * op.B, at = int64_t{op.route_plus1} - 1;
        if (op.route_plus1 < 0 || at + 2 * cells > p.words[h.routes_at])
          return where + ": its routing table is outside the route section";
        const RouteView route = p.route(op);
        for (int q = 0; q < h.group_size; ++q)
          for (int b = 0; b < op.B; ++b) {
            const int32_t from = route.recv_from(q, b), row = route.send_row(q, b);
            if (from < -1 || from >= h.group_size || row < 0 || row >= op.B)
              return where + ": route of rank " + std::to_string(q) + " slot " + std::to_string(b) +
                     ": source rank " + std::to_string(from) + " not in -1.." +
                     std::to_string(h.group_size - 1) + " or source row " + std::to_string(row) +
                     " not in 0.." + std::to_string(op.B - 1);
          }
      }
      if (out.storage != kStorageWorkspace) return where + ": a put op writes a workspace tensor (its inbox)";
      if (op.prologue_len != 0 || op.epilogue_len != 0) return where + ": a put op has no programs";
      if (op.a_view < 0 || op.a_view >= h.num_views) return where + ": operand view out of range";
      const int64_t ad[3] = {op.B, op.M, op.N};
      if (!view_in(op.a_view, ad, 3, i)) return c.err;
      if (p.tensor(p.view(op.a_view).tensor).dtype != out.dtype)
        return where + ": a put op's source and inbox dtypes differ";
      // Peers write this rank's inbox whenever they get there: no other tensor may use its bytes.
      if (const int32_t t = workspace_overlap(p, op.out_tensor); t >= 0)
        return where + ": its inbox (tensor " + std::to_string(op.out_tensor) +
               ") shares workspace bytes with tensor " + std::to_string(t);
      if (op.read_in_place) {
        if (std::string why = read_in_place_problem(p, lv, i); !why.empty())
          return where + ": read_in_place, but " + why;
        work = sat_add(work, elems);  // signals only; readers' loads are counted with them
        continue;
      }
      work = sat_add(work, sat_mul(elems, op.B));
      continue;
    }
    const bool walks_window = window && !fold;
    const int64_t epi = program(i, op.epilogue_at, op.epilogue_len,
                                walks_window ? op.iter_dims : out.dims + (stacked ? 1 : 0),
                                walks_window ? op.iter_rank : out.rank - (stacked ? 1 : 0),
                                op.kind != kOpMap && !fold, "epilogue");
    if (epi < 0) return c.err;
    if (walks_window && !is_int_dtype(dtype_of(p.instruction(op.epilogue_at + op.store_at_plus1 - 1))))
      return where + ": store_at is not an integer register of the epilogue";
    work = sat_add(work, sat_mul(lv.op_trips(i), sat_add(sat_mul(elems, sat_add(inner, epi)), fold_work)));
  }
  if (work > kMaxWork)
    return "the plan's work (" + std::to_string(work) + " element-operations) exceeds the bound 2^45";
  for (int t = 0; t < h.num_tensors; ++t) {
    const TensorRecord& r = p.tensor(t);
    if (read[t] && r.storage != kStorageArg && writer[t] < 0)
      return "tensor " + std::to_string(t) + " is read by a view but no op writes it";
  }
  // A zero-size result needs no writer (v2 plans no op for an empty tensor).
  for (int i = 0; i < h.num_outputs; ++i)
    if (writer[result_tensor[i]] < 0 && p.tensor(result_tensor[i]).num_elements > 0)
      return "result " + std::to_string(i) + " is never written";

  // ---- tasks: inside their op, exact cover, dependencies ----
  const int32_t* dep_off = words + h.dep_offsets_at;  // sections were checked above
  const int32_t* deps = words + h.deps_at;
  std::vector<std::vector<int32_t>> tasks_of(h.num_ops);
  for (int t = 0; t < h.num_tasks; ++t) {
    const TaskRecord& task = p.task(t);
    const std::string where = "task " + std::to_string(t);
    if (task.op < 0 || task.op >= h.num_ops) return where + ": op out of range";
    if (task.flags != 0) return where + ": flags must be 0";
    const OpRecord& op = p.op(task.op);
    if (task.b0 < 0 || task.b1 > op.B || task.b0 >= task.b1 || task.m0 < 0 || task.m1 > op.M ||
        task.m0 >= task.m1 || task.n0 < 0 || task.n1 > op.N || task.n0 >= task.n1)
      return where + ": tile outside op " + std::to_string(task.op) + " or empty";
    if (op.kind == kOpMatmul && op.K * (task.n1 - task.n0) > kMaxMatmulPanel)
      return where + ": K x tile columns exceeds 2^28 elements";
    tasks_of[task.op].push_back(t);
  }
  std::vector<int64_t> cuts[3];
  std::vector<uint8_t> hit;
  for (int i = 0; i < h.num_ops; ++i) {
    const OpRecord& op = p.op(i);
    // Its fold runs in iteration order, over all of its output: one task.
    if (op.kind == kOpReduce && op.store_view_plus1 != 0 && tasks_of[i].size() != 1)
      return op_where(i) + ": a scatter fold must be exactly one task";
    const int64_t size[3] = {op.B, op.M, op.N};
    for (int a = 0; a < 3; ++a) cuts[a].assign({0, size[a]});
    for (int32_t t : tasks_of[i]) {
      const TaskRecord& task = p.task(t);
      cuts[0].insert(cuts[0].end(), {task.b0, task.b1});
      cuts[1].insert(cuts[1].end(), {task.m0, task.m1});
      cuts[2].insert(cuts[2].end(), {task.n0, task.n1});
    }
    int64_t cells = 1;
    for (auto& v : cuts) {
      std::sort(v.begin(), v.end());
      v.erase(std::unique(v.begin(), v.end()), v.end());
      cells = sat_mul(cells, static_cast<int64_t>(v.size()) - 1);
    }
    if (cells > kMaxTilingCells) return op_where(i) + ": its tiles do not form a grid of <= 2^24 cells";
    hit.assign(cells, 0);
    const auto at = [](const std::vector<int64_t>& v, int64_t x) {
      return static_cast<int64_t>(std::lower_bound(v.begin(), v.end(), x) - v.begin());
    };
    const int64_t nm = cuts[1].size() - 1, nn = cuts[2].size() - 1;
    for (int32_t t : tasks_of[i]) {
      const TaskRecord& task = p.task(t);
      for (int64_t b = at(cuts[0], task.b0); b < at(cuts[0], task.b1); ++b)
        for (int64_t m = at(cuts[1], task.m0); m < at(cuts[1], task.m1); ++m)
          for (int64_t n = at(cuts[2], task.n0); n < at(cuts[2], task.n1); ++n)
            if (hit[(b * nm + m) * nn + n]++)
              return "task " + std::to_string(t) + ": computes elements of op " + std::to_string(i) +
                     " another task computes too";
    }
    if (std::find(hit.begin(), hit.end(), 0) != hit.end())
      return op_where(i) + ": output elements no task computes";
  }
  if (dep_off[0] != 0 || dep_off[h.num_tasks - 1 + 1] != h.num_dep_edges)
    return "dependency offsets do not span the dependencies section";
  for (int t = 0; t < h.num_tasks; ++t) {
    if (dep_off[t + 1] < dep_off[t]) return "task " + std::to_string(t) + ": dependency offsets decrease";
    for (int e = dep_off[t]; e < dep_off[t + 1]; ++e)
      if (deps[e] < 0 || deps[e] >= h.num_tasks || deps[e] == t)
        return "task " + std::to_string(t) + ": dependency " + std::to_string(deps[e]) +
               " out of range or itself";
  }

  // ---- queues: every task exactly once; dependencies + queue order acyclic ----
  if (p.queue_begin(0) != 0 || p.queue_end(h.num_workers - 1) != h.num_tasks)
    return "queue offsets do not span all tasks";
  std::vector<int32_t> queue_prev(h.num_tasks, -1), worker_of(h.num_tasks, -1);
  for (int w = 0; w < h.num_workers; ++w) {
    if (p.queue_end(w) < p.queue_begin(w)) return "worker " + std::to_string(w) + ": queue offsets decrease";
    for (int q = p.queue_begin(w); q < p.queue_end(w); ++q) {
      const int32_t t = p.queue_task(q);
      if (t < 0 || t >= h.num_tasks) return "worker " + std::to_string(w) + ": queues unknown task " + std::to_string(t);
      if (worker_of[t] >= 0)
        return "task " + std::to_string(t) + " is queued twice (workers " + std::to_string(worker_of[t]) +
               " and " + std::to_string(w) + ")";
      worker_of[t] = w;
      queue_prev[t] = q > p.queue_begin(w) ? p.queue_task(q - 1) : -1;
    }
  }
  // v3 loops (docs/plan_format.md, "Loops"): stages (runs of ops between loop boundaries: the ops
  // before the first loop, an outer loop's ops before its inner loop, the inner loop, ...) never go
  // backwards along a queue or a same-iteration dependency (a carried one goes to an earlier
  // iteration of a loop both tasks are in); then the graph of same-iteration dependencies + queue
  // order being acyclic is what makes the plan deadlock-free.
  if (lv.num_loops() > 0) {
    std::vector<int32_t> stage(h.num_ops);
    std::vector<char> boundary(h.num_ops + 1, 0);
    for (int l = 0; l < lv.num_loops(); ++l) {
      boundary[lv.loop(l).first_op] = boundary[lv.loop(l).end_op] = 1;
      if (lv.while_pred_op(l) >= 0) boundary[lv.while_pred_op(l) + 1] = 1;  // head | body
    }
    for (int i = 0, n = 0; i < h.num_ops; ++i) stage[i] = n += boundary[i];
    for (int t = 0; t < h.num_tasks; ++t) {
      for (int e = dep_off[t]; e < dep_off[t + 1]; ++e)
        if (stage[p.task(deps[e]).op] > stage[p.task(t).op] && !lv.carried(p.task(t).op, p.task(deps[e]).op))
          return "task " + std::to_string(t) + ": depends on task " + std::to_string(deps[e]) +
                 " of a later loop stage";
      if (queue_prev[t] >= 0 && stage[p.task(queue_prev[t]).op] > stage[p.task(t).op])
        return "worker " + std::to_string(worker_of[t]) + ": queues task " + std::to_string(t) +
               " after task " + std::to_string(queue_prev[t]) + " of a later loop stage";
    }
  }
  const auto same_iteration = [&](int t, int e) { return !lv.carried(p.task(t).op, p.task(deps[e]).op); };
  // Kahn's algorithm over "t waits for dep (same iteration)" and "t runs after queue_prev[t]".
  std::vector<int32_t> indeg(h.num_tasks, 0), succ_begin(h.num_tasks + 1, 0), succ;
  for (int t = 0; t < h.num_tasks; ++t) {
    indeg[t] = queue_prev[t] >= 0;
    for (int e = dep_off[t]; e < dep_off[t + 1]; ++e)
      if (same_iteration(t, e)) ++indeg[t], ++succ_begin[deps[e] + 1];
    if (queue_prev[t] >= 0) ++succ_begin[queue_prev[t] + 1];
  }
  for (int t = 0; t < h.num_tasks; ++t) succ_begin[t + 1] += succ_begin[t];
  succ.resize(succ_begin[h.num_tasks]);
  {
    std::vector<int32_t> fill(succ_begin.begin(), succ_begin.end() - 1);
    for (int t = 0; t < h.num_tasks; ++t) {
      for (int e = dep_off[t]; e < dep_off[t + 1]; ++e)
        if (same_iteration(t, e)) succ[fill[deps[e]]++] = t;
      if (queue_prev[t] >= 0) succ[fill[queue_prev[t]]++] = t;
    }
  }
  std::vector<int32_t> ready;
  for (int t = 0; t < h.num_tasks; ++t)
    if (indeg[t] == 0) ready.push_back(t);
  for (size_t k = 0; k < ready.size(); ++k)
    for (int32_t e = succ_begin[ready[k]]; e < succ_begin[ready[k] + 1]; ++e)
      if (--indeg[succ[e]] == 0) ready.push_back(succ[e]);
  if (static_cast<int64_t>(ready.size()) != h.num_tasks) {
    int stuck = 0;
    while (indeg[stuck] == 0) ++stuck;
    return "dependency cycle (dependencies + queue order) through task " + std::to_string(stuck) +
           " on worker " + std::to_string(worker_of[stuck]) + ": the plan would deadlock";
  }
  if (h.group_size > 0) {
    int64_t inbox_end = 0;
    if (std::string err = inbox_end_of(p, &inbox_end); !err.empty()) return err;
  }
  return "";
}

// Plans that passed check_plan, so each plan is checked once rather than on every call (the check
// is O(plan): ~1.4 ms for 1024 tasks with 58k dependency edges). A hit compares the whole plan and
// its buffers (memcmp), never just a hash, so no crafted plan can borrow another's verdict. Holds
// at most kEntries plans and kBytes of words, least recently used out first.
class CheckedPlans {
 public:
  static constexpr size_t kEntries = 32;
  static constexpr size_t kBytes = size_t{64} << 20;

  std::string check(const int32_t* words, int64_t num_words, const PlanBuffers& buffers) {
    if (words == nullptr || num_words < 32 || num_words > static_cast<int64_t>(kBytes / 4))
      return check_plan(words, num_words, buffers);
    const uint64_t key = fingerprint(words, num_words);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->key == key && static_cast<int64_t>(it->words.size()) == num_words &&
            it->buffers == buffers &&
            std::memcmp(it->words.data(), words, sizeof(int32_t) * num_words) == 0) {
          entries_.splice(entries_.begin(), entries_, it);
          return "";
        }
      }
    }
    std::string err = check_plan(words, num_words, buffers);
    if (!err.empty()) return err;
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_front(Entry{key, std::vector<int32_t>(words, words + num_words), buffers});
    bytes_ += sizeof(int32_t) * num_words;
    while (entries_.size() > kEntries || bytes_ > kBytes) {
      bytes_ -= sizeof(int32_t) * entries_.back().words.size();
      entries_.pop_back();
    }
    return "";
  }

 private:
  struct Entry {
    uint64_t key;
    std::vector<int32_t> words;
    PlanBuffers buffers;
  };
  // Only to skip most non-matching entries quickly; equality is decided by memcmp.
  static uint64_t fingerprint(const int32_t* words, int64_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(n);
    const int64_t step = std::max<int64_t>(1, n / 256);
    for (int64_t i = 0; i < n; i += step) h = (h ^ static_cast<uint32_t>(words[i])) * 0x100000001B3ull;
    return h;
  }
  std::mutex mu_;
  std::list<Entry> entries_;
  size_t bytes_ = 0;
};

// The module's one cache of checked plans, shared by the CPU handler and the trace-time check of
// GPU plans (never destroyed: handlers may still run while the process exits).
inline CheckedPlans& checked_plans() {
  static CheckedPlans* cache = new CheckedPlans;
  return *cache;
}

}  // namespace jax_ark::plan
