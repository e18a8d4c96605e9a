// XLA FFI handler of the `ark_persistent` target on the CPU platform (docs/plan_format.md, "The FFI
// call"). Operands: plan args..., plan words (int32, last). Results: outputs..., workspace,
// counters[, profile]. The handler checks the plan against the buffers, then runs it on worker
// threads owned by the executor (never on XLA's pool: see shared/DESIGN.md on pool starvation).
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "../../cuda/src/cpu/host_communicator.hpp"
#include "../../cuda/src/cpu/persistent_executor.hpp"
#include "jax_ark/plan_check.hpp"
#include "persistent_binding.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ark::cpu {
namespace {

ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ark_persistent: " + what);
}

// The plan format's dtype code of an FFI buffer (-1: a dtype plans cannot describe).
int32_t plan_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return jax_ark::plan::kF32;
    case ffi::DataType::BF16: return jax_ark::plan::kBF16;
    case ffi::DataType::F16: return jax_ark::plan::kF16;
    case ffi::DataType::PRED: return jax_ark::plan::kBool;
    case ffi::DataType::S32: return jax_ark::plan::kInt32;
    case ffi::DataType::U32: return jax_ark::plan::kUInt32;
    case ffi::DataType::S8: return jax_ark::plan::kInt8;
    case ffi::DataType::U8: return jax_ark::plan::kUInt8;
    case ffi::DataType::S16: return jax_ark::plan::kInt16;
    case ffi::DataType::U16: return jax_ark::plan::kUInt16;
    default: return -1;
  }
}

ffi::Error PersistentChecked(ffi::RunId run_id, ffi::RemainingArgs args, ffi::RemainingRets rets,
                             int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                             int64_t chaos_seed, int64_t profile);

// Any exception (an allocation failure while checking) becomes an error, never an abort.
ffi::Error PersistentImpl(ffi::RunId run_id, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                          int64_t chaos_seed, int64_t profile) {
  try {
    return PersistentChecked(run_id, args, rets, num_workers, num_tasks, timeout_ms, chaos_seed,
                             profile);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("ark_persistent: ") + e.what());
  }
}

// Plan v3 communication: the operand before the plan, int32[6] = rank, color, comm_key (low,
// high word), site (low, high word). rank/color come from jax.lax.axis_index at trace time
// (the device ordinal is not the rank on a permuted mesh); comm_key names the group's mesh axes
// and site the call site, as for ark_collective (docs/internals.md).
struct CommOperand {
  int32_t rank, color;
  int64_t comm_key, site;
};

int64_t join_words(int32_t lo, int32_t hi) {
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                              static_cast<uint32_t>(lo));
}

ffi::Error PersistentChecked(ffi::RunId run_id, ffi::RemainingArgs args, ffi::RemainingRets rets,
                             int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                             int64_t chaos_seed, int64_t profile) {
  if (profile != 0 && profile != 1) return invalid("profile must be 0 or 1");
  if (args.size() < 1) return invalid("missing the plan operand");
  auto plan_buf = args.get<ffi::AnyBuffer>(args.size() - 1);
  if (!plan_buf.has_value()) return invalid("cannot decode the plan operand");
  if (plan_buf->element_type() != ffi::DataType::S32) return invalid("the plan must be int32 words");
  const auto* words = static_cast<const int32_t*>(plan_buf->untyped_data());
  const size_t num_words = plan_buf->element_count();
  if (num_words < 32) return invalid("plan shorter than its header");
  const jax_ark::plan::Header& header = jax_ark::plan::PlanView{words}.header();
  if (header.num_workers != num_workers || header.num_tasks != num_tasks)
    return invalid("attributes num_workers/num_tasks disagree with the plan header");

  // v3: a plan with put tasks takes the comm operand (int32[6]) right before the plan.
  const int32_t group_size = header.version >= 3 ? header.group_size : 0;
  if (group_size < 0 || group_size > jax_ark::plan::kMaxGroupSize)
    return invalid("group_size " + std::to_string(group_size) + " not in 0.." +
                   std::to_string(jax_ark::plan::kMaxGroupSize));
  if (group_size > 0 && args.size() < 2) return invalid("missing the comm operand");
  const size_t num_plan_args = args.size() - 1 - (group_size > 0 ? 1 : 0);
  CommOperand comm_id{};
  if (group_size > 0) {
    auto ids = args.get<ffi::AnyBuffer>(args.size() - 2);
    if (!ids.has_value() || ids->element_type() != ffi::DataType::S32 || ids->element_count() != 6)
      return invalid("a plan with put tasks takes an int32[6] comm operand before the plan");
    const auto* v = static_cast<const int32_t*>(ids->untyped_data());
    comm_id = CommOperand{v[0], v[1], join_words(v[2], v[3]), join_words(v[4], v[5])};
    if (comm_id.rank < 0 || comm_id.rank >= group_size || comm_id.color < 0)
      return invalid("comm operand: rank " + std::to_string(comm_id.rank) + " not in [0, " +
                     std::to_string(group_size) + ") or color " + std::to_string(comm_id.color) +
                     " < 0");
  }
  PersistentBuffers buffers;
  jax_ark::plan::PlanBuffers sizes;
  for (size_t i = 0; i < num_plan_args; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return invalid("cannot decode operand " + std::to_string(i));
    buffers.args.push_back(b->untyped_data());
    buffers.arg_bytes.push_back(b->size_bytes());
    sizes.arg_bytes.push_back(static_cast<int64_t>(b->size_bytes()));
    sizes.arg_dtypes.push_back(plan_dtype(b->element_type()));
  }
  const size_t extra = profile ? 3 : 2;
  if (rets.size() < extra) return invalid("too few results");
  const size_t num_outputs = rets.size() - extra;
  for (size_t i = 0; i < num_outputs; ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return invalid("cannot decode result " + std::to_string(i));
    buffers.results.push_back((*r)->untyped_data());
    buffers.result_bytes.push_back((*r)->size_bytes());
    sizes.result_bytes.push_back(static_cast<int64_t>((*r)->size_bytes()));
    sizes.result_dtypes.push_back(plan_dtype((*r)->element_type()));
    // input_output_aliases: XLA hands the aliased operand's own buffer as this result.
    int32_t alias = -1;
    for (size_t a = 0; a < buffers.args.size() && (*r)->size_bytes() > 0; ++a)
      if (buffers.args[a] == buffers.results.back()) alias = alias == -1 ? static_cast<int32_t>(a) : -2;
    sizes.result_alias.push_back(alias);
  }
  auto workspace = rets.get<ffi::AnyBuffer>(num_outputs);
  auto counters = rets.get<ffi::AnyBuffer>(num_outputs + 1);
  if (!workspace.has_value() || !counters.has_value()) return invalid("cannot decode workspace/counters");
  buffers.workspace = static_cast<uint8_t*>((*workspace)->untyped_data());
  buffers.workspace_bytes = (*workspace)->size_bytes();
  sizes.workspace_bytes = static_cast<int64_t>(buffers.workspace_bytes);
  sizes.workspace_is_u8 = (*workspace)->element_type() == ffi::DataType::U8;
  sizes.num_counters = static_cast<int64_t>((*counters)->element_count());
  if ((*counters)->element_type() != ffi::DataType::S32 ||
      (*counters)->element_count() != static_cast<size_t>(num_tasks) * (1 + group_size))
    return invalid("counters must be int32[num_tasks * (1 + group_size)]");
  buffers.counters = static_cast<int32_t*>((*counters)->untyped_data());
  if (profile) {
    auto prof = rets.get<ffi::AnyBuffer>(num_outputs + 2);
    if (!prof.has_value() || (*prof)->element_type() != ffi::DataType::S64 ||
        (*prof)->element_count() != static_cast<size_t>(num_tasks) * jax_ark::plan::kProfileWordsPerTask)
      return invalid("profile must be int64[num_tasks * 4]");
    buffers.profile = static_cast<int64_t*>((*prof)->untyped_data());
  }
  // Checked once per plan (and buffers): later calls with the same words hit the cache.
  const std::string problem =
      jax_ark::plan::checked_plans().check(words, static_cast<int64_t>(num_words), sizes);
  if (!problem.empty()) return invalid("invalid plan: " + problem);

  PersistentOptions options;
  options.timeout_ms = timeout_ms > 0 ? timeout_ms : 60000;
  options.chaos_seed = static_cast<uint64_t>(chaos_seed);
  // Opt-in, process-wide, read per call (the plan and the GPU handler do not change with it).
  const char* fma = std::getenv("JAX_ARK_CPU_FMA");
  options.fused_matmul = fma != nullptr && *fma != '\0' && std::string_view(fma) != "0";
  PersistentComm comm;
  if (group_size > 0) {
    // The group's symmetric regions at this call site (one per (group, site), reused by every
    // call there; persistent_region.hpp). check_plan above checked that the inboxes come first
    // in the workspace.
    int64_t inbox_end = 0;
    if (std::string err = jax_ark::plan::inbox_end_of(jax_ark::plan::PlanView{words}, &inbox_end);
        !err.empty())
      return invalid("invalid plan: " + err);
    std::string err;
    comm.region = PersistentRegion::get(
        CommunicatorKey{comm_id.comm_key, comm_id.color, group_size, comm_id.site}, words,
        static_cast<int64_t>(num_words), inbox_end, &err);
    if (!comm.region) return invalid("rank " + std::to_string(comm_id.rank) + ": " + err);
    comm.rank = comm_id.rank;
    comm.size = group_size;
    comm.run_id = run_id.run_id;
    options.comm = &comm;
  }
  try {
    PersistentResult result = run_plan(words, buffers, options);
    switch (result.status) {
      case PersistentStatus::kOk: return ffi::Error::Success();
      case PersistentStatus::kDeadlineExceeded:
        return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, result.message);
      case PersistentStatus::kResourceExhausted:
        return ffi::Error(ffi::ErrorCode::kResourceExhausted, result.message);
      case PersistentStatus::kAborted: return ffi::Error(ffi::ErrorCode::kAborted, result.message);
      default: return ffi::Error(ffi::ErrorCode::kInternal, result.message);
    }
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("ark_persistent: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCpu, PersistentImpl,
                              jax_ark::persistent_binding<ffi::RunId>());

JAX_ARK_REGISTER_TARGET("ark_persistent", ArkPersistentCpu);
// The name a program lowered with JAX_ARK_CUDA_GRAPHS=1 calls (one ffi_call names one target for
// every platform): on the CPU the same handler, there being no command buffers here.
JAX_ARK_REGISTER_TARGET("ark_persistent_graph", ArkPersistentCpu);

}  // namespace jax_ark::cpu
