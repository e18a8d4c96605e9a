// Binary layout of a persistent-kernel plan, version 3 (docs/plan_format.md is the normative text).
//
// A plan is ONE array of little-endian int32 words, produced by jax_ark._persistent.Plan.to_binary()
// and passed to the `ark_persistent` FFI call as its last operand (so on GPU it already lives in
// device memory and the host does no per-call work). Every record below is a plain struct of int32 /
// int64 fields whose int64 members sit at even word offsets, so a kernel or the CPU executor simply
// reinterpret_casts `words + section_offset` (the buffer must be 8-byte aligned; XLA buffers are).
//
// Header-only, no std:: dependencies, every function `ARK_HD` so the CUDA executor and the CPU
// executor read the same structs and evaluate the same scalar math (tile_ops.hpp).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define ARK_HD __host__ __device__ __forceinline__
#else
#define ARK_HD inline
#endif

namespace jax_ark::plan {

constexpr int32_t kMagic = 0x504B5241;  // bytes "ARKP"
// v2: integer tensors, integer opcodes; v3: loops (see the end) and / or comm (PUT) ops, both
// optional (a plan with both is refused by check_plan: comm inside loops is not supported yet)
constexpr int32_t kVersion = 3;
constexpr int32_t kMaxGroupSize = 4096;  // v3: ranks of the one communication group of a plan
constexpr int kMaxRank = 6;             // tensors, views and iteration spaces have rank <= 6
constexpr int kMaxProgramLen = 64;      // instructions per prologue / epilogue program
constexpr int kProfileWordsPerTask = 4; // int64 words per task in the profile result

// ---- enums ------------------------------------------------------------------------------------
enum DType : int32_t {
  kF32 = 0,
  kBF16 = 1,
  kF16 = 2,
  kBool = 3,    // stored as one byte, 0 or 1
  kInt32 = 4,   // v2; program registers of integer dtype hold the value's 32 bits
  kUInt32 = 5,  // v2
  // Narrow integers: a register holds the value sign- (int) or zero- (uint) extended to 32 bits;
  // every instruction of such a dtype wraps its 32-bit result to the dtype's width (round_to).
  kInt8 = 6, kUInt8 = 7, kInt16 = 8, kUInt16 = 9,
};

// A program register holds 32 bits. Registers written by an instruction of float dtype (f32 / bf16
// / f16) or bool hold a float32 value (bool: 0.0f or 1.0f); registers of integer dtype hold the
// two's-complement bits. Float opcodes (10..60) read and write float registers, integer opcodes
// (70..119) read and write bits (see is_int_opcode).
ARK_HD bool is_int_dtype(int32_t dtype) { return dtype >= kInt32 && dtype <= kUInt16; }

enum Storage : int32_t {
  kStorageArg = 0,        // FFI operand `storage_index` (user inputs, then constants)
  kStorageResult = 1,     // FFI result `storage_index` (user outputs)
  kStorageWorkspace = 2,  // bytes [byte_offset, byte_offset + nbytes) of the workspace result
};

enum OpKind : int32_t {
  kOpMatmul = 1,  // out[b,m,n] = epilogue(sum_k A[b,m,k] * B[b,k,n])
  kOpReduce = 2,  // out[m]     = epilogue(reduce_r prologue(m, r))
  kOpMap = 3,     // out[i]     = epilogue(i)   (no accumulator)
  // v3 communication: out is a symmetric workspace tensor [group_size, M, N] (its "inbox"). On
  // rank r a task with b0 <= r < b1 copies its (m, n) tile of a_view[p, m, n] into row r of peer
  // p's inbox for every rank p and signals p; then every task waits for the signals of the ranks
  // b in [b0, b1) (docs/plan_format.md, "Communication").
  // With a routing table (OpRecord.route_plus1, v3 ppermute / several groups): slot b of rank q's
  // inbox comes from rank recv_from(q, b) (none: -1, the slot is zeros), which reads
  // a_view[send_row(q, b), m, n]; B may then be less than group_size.
  kOpPut = 4,
};

// Accumulator of a REDUCE (docs/plan_format.md, "Ops"). Float kinds fold float32 values; integer
// kinds fold the prologue's 32 bits (isum wraps); arg kinds keep (best value, its index r) and
// yield the int32 index of the first extremum (a NaN counts as the extremum, as in XLA); prod
// multiplies float32 values, iprod the 32 bits (wrapping: the same bits for int32 and uint32);
// and / or / xor fold integer registers' bits.
enum ReduceKind : int32_t {
  kReduceSum = 0, kReduceMax = 1,
  kReduceMin = 2, kReduceISum = 3, kReduceIMax = 4, kReduceIMin = 5, kReduceUMax = 6,
  kReduceUMin = 7, kReduceArgMax = 8, kReduceArgMin = 9, kReduceIArgMax = 10, kReduceIArgMin = 11,
  kReduceProd = 12, kReduceIProd = 13, kReduceAnd = 14, kReduceOr = 15, kReduceXor = 16,
  kReduceLast = 17,  // scatter folds only: the value replaces the element (a scatter's `set`)
  kNumReduceKinds = 18,
};

// Program opcodes. Instruction i writes register i; operands a, b, c name earlier registers.
enum Opcode : int32_t {
  kLoadAcc = 0,   // r = the op's accumulator (MATMUL/REDUCE epilogue only), rounded to acc_dtype
  kLoad = 1,      // r = view a, element at the current iteration index
  kConst = 2,     // r = bit_cast<float>(a)
  // v2: r = view a's element at the current index moved by int32 register b elements (a device
  // value: gather / dynamic_slice indices), the element index clamped into the tensor
  kLoadAt = 3,
  kLoadIter = 4,  // v3: r = the current loop iteration as int32 (0 outside loops)
  kLoadRank = 5,  // v3: r = this call's rank in the plan's communication group as int32
  // unary (operand a)
  kNeg = 10, kExp = 11, kLog = 12, kTanh = 13, kLogistic = 14, kSqrt = 15, kRsqrt = 16,
  kErf = 17, kAbs = 18, kIntegerPow = 19 /* exponent = b (int32) */, kSin = 20, kCos = 21,
  kLog1p = 22, kExpm1 = 23, kSquare = 24, kSign = 25, kCopy = 26 /* convert: rounding only */,
  // binary (operands a, b)
  kAdd = 40, kSub = 41, kMul = 42, kDiv = 43, kMax = 44, kMin = 45, kPow = 46,
  kEq = 47, kNe = 48, kLt = 49, kLe = 50, kGt = 51, kGe = 52,
  kRem = 53,  // fmod: a - trunc(a / b) * b, exact, the dividend's sign (lax.rem of floats)
  // ternary
  kSelect = 60,   // r = (a != 0) ? c : b   (jax select_n(pred, on_false, on_true))
  // v2 integer binary (32-bit operands a, b; XLA semantics, see tile_ops.hpp apply_int_binary)
  kIAdd = 70, kISub = 71, kIMul = 72, kIDiv = 73, kIRem = 74, kUDiv = 75, kURem = 76,
  kIMax = 77, kIMin = 78, kUMax = 79, kUMin = 80, kAnd = 81, kOr = 82, kXor = 83,
  kShl = 84, kShrA = 85, kShrL = 86,
  kIEq = 87, kINe = 88, kILt = 89, kILe = 90, kIGt = 91, kIGe = 92,  // -> bool (float 0 / 1)
  kULt = 93, kULe = 94, kUGt = 95, kUGe = 96,
  // v2 integer unary (operand a) and conversions between register kinds
  kINeg = 100, kNot = 101, kIAbs = 102, kISign = 103,
  kI2F = 104, kU2F = 105,  // int32 / uint32 -> float32 (round to nearest even)
  kF2I = 106, kF2U = 107,  // float32 -> int32 / uint32: truncate, saturate, NaN -> 0
  kIMov = 108,             // bits unchanged (int32 <-> uint32)
  kIPow = 109,             // a^b for the int32 exponent b >= 0, wrapping multiplications
  kBitcast = 110,          // bits unchanged, float32 <-> int32 / uint32 (lax.bitcast_convert_type)
};

// ---- records ----------------------------------------------------------------------------------
struct Header {                     // 32 words
  int32_t magic, version, header_words, total_words;                  // 0..3
  int32_t num_workers, num_tasks, num_ops, num_tensors;               // 4..7
  int32_t num_views, num_args, num_outputs, flags;                    // 8..11
  int32_t tensors_at, views_at, ops_at, tasks_at;                     // 12..15 word offsets
  int32_t dep_offsets_at, deps_at, num_dep_edges, queue_offsets_at;   // 16..19
  int32_t queues_at, code_at, code_words, names_at;                   // 20..23
  int32_t names_bytes, num_counters, profile_words_per_task;           // 24..26
  int32_t routes_at;  // 27: v3 word offset of the route section (0 = none; see RouteView)
  int64_t workspace_bytes;                                            // 28..29
  int32_t loops_at;   // 30: v3 word offset of the loop section (0 = no loops; see LoopView)
  // 31: v3 ranks of the plan's communication group; 0 = no PUT ops (then num_counters =
  // num_tasks, else num_tasks * (1 + group_size): the signals follow the task counters).
  int32_t group_size;
};

struct TensorRecord {               // 24 words
  int32_t dtype, rank, storage, storage_index;  // 0..3
  int64_t byte_offset;                          // 4..5 workspace offset (0 unless workspace)
  int64_t num_elements;                         // 6..7
  int64_t dims[kMaxRank];                       // 8..19 row-major, contiguous; unused dims = 1
  // v2, results only: 1 + the operand index whose buffer this result is (input_output_aliases:
  // it starts with the operand's content, updated in place); 0 = its own buffer
  int32_t alias_plus1;                          // 20
  int32_t reserved[3];                          // 21..23
};

// A strided window onto a tensor, indexed by an iteration space of `rank` dims:
// element(idx) = tensor.flat[offset + sum_d idx[d] * strides[d]]   (strides may be 0: broadcast)
struct ViewRecord {                 // 16 words
  int32_t tensor, rank;             // 0..1
  int64_t offset;                   // 2..3 (elements)
  int64_t strides[kMaxRank];        // 4..15 (elements)
};

struct OpRecord {                   // 40 words
  int32_t kind, out_tensor, acc_dtype, reduce_kind;               // 0..3
  int32_t a_view, b_view, iter_rank, kept_rank;                   // 4..7
  int32_t prologue_at, prologue_len, epilogue_at, epilogue_len;   // 8..11 (instructions)
  int32_t name_at, name_len, tile_m, tile_n;                      // 12..15
  int64_t B, M, N, K;                                             // 16..23 canonical sizes
  int64_t iter_dims[kMaxRank];                                    // 24..35 REDUCE / window space
  // v2 window store (MAP only): 1 + a view of out_tensor over iter_dims and 1 + the epilogue
  // register holding an int32 element offset; the result goes to that view's element + offset,
  // clamped into the tensor (an in-place update of an aliased result); an offset equal to
  // kDropStore stores nothing (a scatter point out of bounds). 0 = whole-tensor op.
  // On a REDUCE (a scatter fold, kept_rank 0, one task): the epilogue first gives every element
  // of out_tensor its value (over out_tensor's shape, no accumulator); then, in iteration order
  // over iter_dims, the prologue's value is folded with reduce_kind into the element the view
  // names moved by the PROLOGUE's int32 register store_at (kDropStore or outside the tensor:
  // skipped). docs/plan_format.md, "Scatter folds".
  int32_t store_view_plus1, store_at_plus1;                       // 36..37
  // v3 PUT only: 1 + the word offset of this op's routing table in the route section (RouteView);
  // 0 = the default routing (slot b of every rank's inbox comes from rank b).
  int32_t route_plus1;                                            // 38
  // v3 PUT only, CPU executor only: 1 = no copies; a reader of the inbox reads each slot's tile
  // where it lies, in the source rank's source tensor (docs/plan_format.md, "Puts read in place").
  int32_t read_in_place;                                          // 39
};

// A window store's offset register value that drops the element instead of storing it: a
// scatter (`x.at[i].set(v)`) drops a point whose window does not fit, where dynamic_update_slice
// clamps. No real offset is negative (starts are clamped, strides >= 0).
constexpr int32_t kDropStore = INT32_MIN;

struct TaskRecord {                 // 8 words: one tile of one op, half-open ranges
  int32_t op, flags;
  int32_t b0, b1, m0, m1, n0, n1;
};

struct Instruction {                // 4 words
  int32_t op_and_dtype;             // opcode in bits 0..15, result dtype (rounding) in bits 16..23
  int32_t a, b, c;
};

static_assert(sizeof(Header) == 32 * 4, "Header layout");
static_assert(sizeof(TensorRecord) == 24 * 4, "TensorRecord layout");
static_assert(sizeof(ViewRecord) == 16 * 4, "ViewRecord layout");
static_assert(sizeof(OpRecord) == 40 * 4, "OpRecord layout");
static_assert(sizeof(TaskRecord) == 8 * 4, "TaskRecord layout");
static_assert(sizeof(Instruction) == 4 * 4, "Instruction layout");

ARK_HD int32_t opcode_of(const Instruction& ins) { return ins.op_and_dtype & 0xFFFF; }
ARK_HD int32_t dtype_of(const Instruction& ins) { return (ins.op_and_dtype >> 16) & 0xFF; }

ARK_HD int dtype_size(int32_t dtype) {
  switch (dtype) {
    case kF32: return 4;
    case kBF16: return 2;
    case kF16: return 2;
    case kBool: return 1;
    case kInt32: return 4;
    case kUInt32: return 4;
    case kInt8:
    case kUInt8: return 1;
    case kInt16:
    case kUInt16: return 2;
    default: return 0;
  }
}

// v3: index in `counters` of the signal that rank `src` sends for PUT task t (plan_format.md).
ARK_HD int64_t signal_index(int32_t num_tasks, int32_t group_size, int32_t t, int32_t src) {
  return int64_t{num_tasks} + int64_t{t} * group_size + src;
}

// v3 routing table of a PUT op with route_plus1 != 0. The route section (at header.routes_at, an
// even offset; absent when 0) is [route_words, 0] then route_words words; an op's table starts at
// word route_plus1 - 1 of them and holds recv_from[G][B] then send_row[G][B] (G = group_size,
// B = the op's B, row-major): slot b of rank q's inbox is written by rank recv_from[q][b] (-1: by
// nobody, the slot reads as zeros) from row send_row[q][b] of its a_view.
struct RouteView {
  const int32_t* table = nullptr;  // nullptr: the default routing
  int32_t group_size = 0, slots = 0;

  ARK_HD bool routed() const { return table != nullptr; }
  ARK_HD int32_t recv_from(int q, int b) const {
    return table ? table[int64_t{q} * slots + b] : b;
  }
  ARK_HD int32_t send_row(int q, int b) const {
    return table ? table[int64_t{group_size} * slots + int64_t{q} * slots + b] : q;
  }
};

// Read-only accessors over the word array (no copies; valid while the buffer lives).
struct PlanView {
  const int32_t* words;

  ARK_HD const Header& header() const { return *reinterpret_cast<const Header*>(words); }
  ARK_HD const TensorRecord& tensor(int i) const {
    return reinterpret_cast<const TensorRecord*>(words + header().tensors_at)[i];
  }
  ARK_HD const ViewRecord& view(int i) const {
    return reinterpret_cast<const ViewRecord*>(words + header().views_at)[i];
  }
  ARK_HD const OpRecord& op(int i) const {
    return reinterpret_cast<const OpRecord*>(words + header().ops_at)[i];
  }
  ARK_HD const TaskRecord& task(int i) const {
    return reinterpret_cast<const TaskRecord*>(words + header().tasks_at)[i];
  }
  // Dependencies of task t: deps()[dep_begin(t) .. dep_end(t)) (CSR over tasks).
  ARK_HD int32_t dep_begin(int t) const { return words[header().dep_offsets_at + t]; }
  ARK_HD int32_t dep_end(int t) const { return words[header().dep_offsets_at + t + 1]; }
  ARK_HD int32_t dep(int e) const { return words[header().deps_at + e]; }
  // Queue of worker w: queue_task(queue_begin(w)) .. queue_task(queue_end(w) - 1), in order.
  ARK_HD int32_t queue_begin(int w) const { return words[header().queue_offsets_at + w]; }
  ARK_HD int32_t queue_end(int w) const { return words[header().queue_offsets_at + w + 1]; }
  ARK_HD int32_t queue_task(int i) const { return words[header().queues_at + i]; }
  // Program instruction i (absolute, i.e. op.epilogue_at + k).
  ARK_HD const Instruction& instruction(int i) const {
    return reinterpret_cast<const Instruction*>(words + header().code_at)[i];
  }
  ARK_HD const char* name_chars() const {
    return reinterpret_cast<const char*>(words + header().names_at);
  }
  // The routing of PUT op `o` (checked by check_plan: inside the route section, values in range).
  ARK_HD RouteView route(const OpRecord& o) const {
    const Header& h = header();
    if (h.version < 3 || h.routes_at == 0 || o.route_plus1 == 0)
      return RouteView{nullptr, h.group_size, static_cast<int32_t>(o.B)};
    return RouteView{words + h.routes_at + 2 + (o.route_plus1 - 1), h.group_size,
                     static_cast<int32_t>(o.B)};
  }
};

// ---- loops (v3) ----------------------------------------------------------------------------------
// A loop is a contiguous range of ops [first_op, end_op) whose tasks run trip_count times: the body
// is planned once. A loop may sit inside another loop's body (parent_plus1; at most kMaxLoopDepth
// levels). The loop section (at header.loops_at, an even offset; absent when 0) is
//   [num_loops, flags], LoopRecord x num_loops, OpLoopRecord x num_ops, int64 iter_stride x num_views,
//   and, when flags & kLoopsOuterStrides, int64 outer_iter_stride x num_views.
// Counters count finished runs (a task outside loops: 0 or 1; in a loop nested in another:
// outer_iteration * inner_trips + inner_iteration + 1). A run of task t waits for counters[d] >=
// dep_target(...) for each dependency d; a worker runs its queue's tasks of one loop (consecutive in
// its queue: a segment, with the inner loops' segments inside it) once per iteration (QueueCursor).
constexpr int kMaxLoopDepth = 2;             // a loop, and loops inside its body
constexpr int32_t kLoopsOuterStrides = 1;    // loop section flag: the outer_iter_stride array follows
constexpr int32_t kStackedForward = 1;       // OpLoopRecord::stacked: iteration i writes slice i
constexpr int32_t kStackedReversed = 2;      // ... slice trip_count - 1 - i (scan(reverse=True))
struct LoopRecord {                 // 8 words
  int64_t trip_count;               // 0..1, in 1..kMaxTripCount (plan_check.hpp)
  int32_t first_op, end_op;         // 2..3
  int32_t parent_plus1;             // 4: 1 + the loop whose body holds this one; 0 = top level
  // 5..6, a while loop (0 = a loop of trip_count iterations): 1 + its predicate op, a stacked bool
  // op whose slice i says whether iteration i runs the body (the ops after it), and that op's one
  // task. trip_count - 1 is the most body iterations (the guard). See QueueCursor.
  int32_t pred_op_plus1, pred_task;
  int32_t reserved;                 // 7
};
struct OpLoopRecord {               // 2 words
  int32_t loop;                     // the innermost loop this op belongs to, -1 = none
  int32_t stacked;                  // kStacked*: out_tensor is (trip_count, *S), one slice per run
};
static_assert(sizeof(LoopRecord) == 8 * 4, "LoopRecord layout");
static_assert(sizeof(OpLoopRecord) == 2 * 4, "OpLoopRecord layout");

struct LoopView {
  const int32_t* words;

  ARK_HD const Header& header() const { return *reinterpret_cast<const Header*>(words); }
  ARK_HD int32_t at() const { return header().version >= 3 ? header().loops_at : 0; }
  ARK_HD int32_t num_loops() const { return at() ? words[at()] : 0; }
  ARK_HD int32_t flags() const { return at() ? words[at() + 1] : 0; }
  ARK_HD const LoopRecord& loop(int l) const {
    return reinterpret_cast<const LoopRecord*>(words + at() + 2)[l];
  }
  ARK_HD int32_t parent(int l) const { return loop(l).parent_plus1 - 1; }
  ARK_HD int32_t while_pred_op(int l) const { return loop(l).pred_op_plus1 - 1; }
  ARK_HD const OpLoopRecord* op_records() const {
    return reinterpret_cast<const OpLoopRecord*>(words + at() + 2 + 8 * num_loops());
  }
  ARK_HD int32_t op_loop(int op) const { return at() ? op_records()[op].loop : -1; }
  ARK_HD bool op_stacked(int op) const { return at() && op_records()[op].stacked != 0; }
  ARK_HD bool op_stacked_reversed(int op) const {
    return at() && op_records()[op].stacked == kStackedReversed;
  }
  // Element offset a view moves by per iteration of its reader's innermost loop (an xs slice).
  ARK_HD int64_t view_iter_stride(int v) const {
    if (!at()) return 0;
    const int32_t* strides = words + at() + 2 + 8 * num_loops() + 2 * header().num_ops;
    return reinterpret_cast<const int64_t*>(strides)[v];
  }
  // ... and per iteration of the loop around that loop (a nested loop's reader; 0 when absent).
  ARK_HD int64_t view_outer_iter_stride(int v) const {
    if (!(flags() & kLoopsOuterStrides)) return 0;
    const int32_t* strides =
        words + at() + 2 + 8 * num_loops() + 2 * header().num_ops + 2 * header().num_views;
    return reinterpret_cast<const int64_t*>(strides)[v];
  }
  // How far a view moves at a run of its reader in iteration `iter` of the reader's innermost
  // loop and `outer_iter` of the loop around it (0 when not nested).
  ARK_HD int64_t view_shift(int v, int64_t iter, int64_t outer_iter) const {
    return iter * view_iter_stride(v) + outer_iter * view_outer_iter_stride(v);
  }
  // The slice of its (trip_count, *S) output that a stacked op writes at iteration `iter`.
  ARK_HD int64_t stacked_slice(int op, int64_t iter) const {
    return op_stacked_reversed(op) ? loop(op_loop(op)).trip_count - 1 - iter : iter;
  }
  // Nesting depth of op: 0 outside loops, 1 in a top-level loop, 2 in a loop inside one.
  ARK_HD int op_depth(int op) const {
    const int32_t l = op_loop(op);
    return l < 0 ? 0 : (parent(l) >= 0 ? 2 : 1);
  }
  // The loop enclosing op at nesting level `level` (0 = top level), -1 when op is not that deep.
  ARK_HD int32_t level_loop(int op, int level) const {
    const int depth = op_depth(op);
    if (level >= depth) return -1;
    const int32_t l = op_loop(op);
    return level == depth - 1 ? l : parent(l);
  }
  // How many times op's tasks run in all (the product of its loops' trip counts).
  ARK_HD int64_t op_trips(int op) const {
    int64_t n = 1;
    for (int level = 0; level < op_depth(op); ++level) n *= loop(level_loop(op, level)).trip_count;
    return n;
  }
  // Loop levels ops a and b share (0: no common loop).
  ARK_HD int common_depth(int a, int b) const {
    int c = 0;
    while (c < kMaxLoopDepth && level_loop(a, c) >= 0 && level_loop(a, c) == level_loop(b, c)) ++c;
    return c;
  }
  // A dependency on an earlier iteration of a loop both ops are in: the dependency's op not earlier.
  ARK_HD bool carried(int task_op, int dep_op) const {
    return common_depth(task_op, dep_op) > 0 && dep_op >= task_op;
  }
  // The run index of op at iterations iters[0..depth) (outermost first): how many runs of op
  // precede this one. Counters store run index + 1 when the run is done.
  ARK_HD int64_t run_index(int op, const int64_t* iters) const {
    int64_t k = 0;
    for (int level = 0; level < op_depth(op); ++level)
      k = k * loop(level_loop(op, level)).trip_count + iters[level];
    return k;
  }
  // What counters[d] must reach before the run of a task of op task_op at iterations iters[] (its
  // loops', outermost first) runs: with C the innermost loop both ops are in and k the task's run
  // index counted over the loops down to C, R the runs of dep_op per iteration of C:
  // (k + 1) * R when dep_op is before task_op (this iteration of C), k * R otherwise (the
  // previous one: carried); all runs of dep_op when they share no loop.
  ARK_HD int64_t dep_target(int task_op, int dep_op, const int64_t* iters) const {
    const int c = common_depth(task_op, dep_op);
    if (c == 0) return op_trips(dep_op);
    int64_t k = 0;
    for (int level = 0; level < c; ++level)
      k = k * loop(level_loop(task_op, level)).trip_count + iters[level];
    int64_t runs = 1;
    for (int level = c; level < op_depth(dep_op); ++level)
      runs *= loop(level_loop(dep_op, level)).trip_count;
    return (dep_op < task_op ? k + 1 : k) * runs;
  }
};

// A worker's position in its queue: index q and, inside segments of loops' tasks (its tasks of
// one loop are consecutive in its queue; an inner loop's inside its outer loop's), the iteration
// of each entered loop. After the last task of a segment the worker goes back to the segment's
// first task until that loop's trip count is reached.
//
// While loops (top level, no loops inside): in each iteration the worker runs its *head* tasks
// (ops up to the predicate op) and then stops at a check point (pending_check) before its first
// body task, or at the segment's end when it has none. The executor then waits for the predicate
// task's counter to reach iteration + 1 (acquire), reads slice `iteration` of its bool output
// (every worker reads the same slot, which is written once per call, so all workers agree) and
// calls resolve_check: true runs the body; false ends the loop (the executor first stores each of
// the worker's segment tasks' counters = its trip count, release, so everything after the loop
// sees the loop as finished). A true predicate at the last iteration exceeds the guard: the
// executor fails the call (guard_exceeded()).
struct QueueCursor {
  int32_t q = 0, end_q = 0;
  int32_t depth = 0;                          // loops entered (= op_depth of the task at q)
  int32_t seg_begin[kMaxLoopDepth] = {0, 0}, seg_end[kMaxLoopDepth] = {0, 0};
  int64_t iters[kMaxLoopDepth] = {0, 0};      // iteration of each entered loop, outermost first
  int64_t trips_of[kMaxLoopDepth] = {1, 1};
  int32_t top_loop = -1;                      // the entered top-level loop
  bool pending_check = false;                 // at a while loop's check point (see above)
  bool checked = false;                       // this iteration's predicate was read (true)

  ARK_HD void start(const PlanView& p, const LoopView& lv, int worker) {
    q = p.queue_begin(worker);
    end_q = p.queue_end(worker);
    depth = 0;
    pending_check = checked = false;
    settle(p, lv);
  }
  ARK_HD bool done() const { return q >= end_q && !pending_check; }
  ARK_HD int32_t task(const PlanView& p) const { return p.queue_task(q); }
  // The innermost loop's iteration (LOAD_ITER, stacked slices, iter_stride); 0 outside loops.
  ARK_HD int64_t iter() const { return depth ? iters[depth - 1] : 0; }
  ARK_HD int64_t outer_iter() const { return depth == 2 ? iters[0] : 0; }
  // Whether this is the task's last run (every entered loop at its last iteration).
  ARK_HD bool last_run() const {
    for (int level = 0; level < depth; ++level)
      if (iters[level] + 1 != trips_of[level]) return false;
    return true;
  }
  ARK_HD void advance(const PlanView& p, const LoopView& lv) {
    ++q;
    settle(p, lv);
  }
  // At a check point: a true predicate at the last iteration would need one more (the guard).
  ARK_HD bool guard_exceeded() const { return iters[0] + 1 >= trips_of[0]; }
  // After the executor read the predicate of a pending check (and, when false, ended the
  // worker's segment tasks' counters).
  ARK_HD void resolve_check(const PlanView& p, const LoopView& lv, bool taken) {
    pending_check = false;
    if (taken) {
      checked = true;
    } else {
      q = seg_end[0];
      depth = 0;
    }
    settle(p, lv);
  }

 private:
  ARK_HD bool needs_check(const PlanView& p, const LoopView& lv) const {
    if (depth != 1 || checked || lv.while_pred_op(top_loop) < 0) return false;
    return q == seg_end[0] || p.task(p.queue_task(q)).op > lv.while_pred_op(top_loop);
  }
  ARK_HD void settle(const PlanView& p, const LoopView& lv) {
    for (;;) {
      if (needs_check(p, lv)) {
        pending_check = true;
        return;
      }
      if (depth == 0 || q != seg_end[depth - 1]) break;
      if (++iters[depth - 1] < trips_of[depth - 1]) {
        q = seg_begin[depth - 1];
        if (depth == 1) checked = false;
        continue;
      }
      --depth;
    }
    const int32_t before = depth;
    enter(p, lv);
    if (depth > before && needs_check(p, lv)) pending_check = true;
  }
  ARK_HD void enter(const PlanView& p, const LoopView& lv) {
    while (q < end_q && depth < kMaxLoopDepth) {
      const int32_t l = lv.level_loop(p.task(p.queue_task(q)).op, depth);
      if (l < 0) return;
      int32_t e = q + 1;
      while (e < end_q && lv.level_loop(p.task(p.queue_task(e)).op, depth) == l) ++e;
      seg_begin[depth] = q;
      seg_end[depth] = e;
      iters[depth] = 0;
      trips_of[depth] = lv.loop(l).trip_count;
      if (depth == 0) {
        top_loop = l;
        checked = false;
      }
      ++depth;
    }
  }
};

}  // namespace jax_ark::plan
