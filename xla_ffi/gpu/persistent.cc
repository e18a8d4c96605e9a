// XLA FFI handler `ark_persistent` for the CUDA platform: decodes the call exactly as
// docs/plan_format.md ("The FFI call ark_persistent") says and enqueues the persistent kernel on
// XLA's stream. It never synchronizes: a failure recorded on the device by an earlier call is
// reported by the next call (and the failed call's outputs are invalid).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "jax_ark/gpu/persistent_launch.hpp"
#include "jax_ark/plan_format.hpp"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ark {
namespace {

ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ark_persistent: " + msg);
}

ffi::Error PersistentCuda(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                          int64_t chaos_seed, int64_t profile) {
  // A failure of an earlier call on this device surfaces here, before anything new is enqueued.
  std::string failure;
  bool is_timeout = false;
  if (gpu::persistent_take_failure(&failure, &is_timeout))
    return ffi::Error(is_timeout ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kInternal,
                      failure);

  if (profile != 0 && profile != 1) return invalid("profile must be 0 or 1");
  if (num_workers < 1 || num_workers > (1 << 20)) return invalid("num_workers out of range");
  if (num_tasks < 0 || num_tasks > (int64_t{1} << 31) - 1) return invalid("num_tasks out of range");
  if (timeout_ms <= 0) return invalid("timeout_ms must be > 0");

  // Operands: the storage-0 arrays, then the plan (int32[total_words]) last.
  if (args.size() < 1) return invalid("expected the plan as the last operand");
  const size_t num_args = args.size() - 1;
  auto plan = args.get<ffi::AnyBuffer>(num_args);
  if (!plan.has_value()) return plan.error();
  if (plan->element_type() != ffi::DataType::S32)
    return invalid("the plan operand must be int32");
  std::vector<void*> arg_ptrs(num_args);
  for (size_t i = 0; i < num_args; ++i) {
    auto a = args.get<ffi::AnyBuffer>(i);
    if (!a.has_value()) return a.error();
    arg_ptrs[i] = a->untyped_data();
  }

  // Results: the user outputs, then workspace (u8), counters (s32[num_tasks]), [profile].
  const size_t fixed = 2 + static_cast<size_t>(profile);
  if (rets.size() < fixed) return invalid("expected workspace and counters results");
  const size_t num_outputs = rets.size() - fixed;
  std::vector<void*> out_ptrs(num_outputs);
  for (size_t i = 0; i < num_outputs; ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return r.error();
    out_ptrs[i] = (*r)->untyped_data();
  }
  auto workspace = rets.get<ffi::AnyBuffer>(num_outputs);
  if (!workspace.has_value()) return workspace.error();
  if ((*workspace)->element_type() != ffi::DataType::U8)
    return invalid("the workspace result must be uint8");
  auto counters = rets.get<ffi::AnyBuffer>(num_outputs + 1);
  if (!counters.has_value()) return counters.error();
  if ((*counters)->element_type() != ffi::DataType::S32 ||
      static_cast<int64_t>((*counters)->element_count()) != num_tasks)
    return invalid("the counters result must be int32[num_tasks] (num_tasks = " +
                   std::to_string(num_tasks) + ")");
  int64_t* profile_ptr = nullptr;
  if (profile == 1) {
    auto prof = rets.get<ffi::AnyBuffer>(num_outputs + 2);
    if (!prof.has_value()) return prof.error();
    if ((*prof)->element_type() != ffi::DataType::S64 ||
        static_cast<int64_t>((*prof)->element_count()) != num_tasks * plan::kProfileWordsPerTask)
      return invalid("the profile result must be int64[num_tasks * 4]");
    profile_ptr = static_cast<int64_t*>((*prof)->untyped_data());
  }

  gpu::PersistentLaunchArgs launch;
  launch.plan = static_cast<const int32_t*>(plan->untyped_data());
  launch.plan_words = static_cast<int64_t>(plan->element_count());
  launch.args = arg_ptrs.data();
  launch.num_args = static_cast<int>(num_args);
  launch.results = out_ptrs.data();
  launch.num_results = static_cast<int>(num_outputs);
  launch.workspace = (*workspace)->untyped_data();
  launch.workspace_bytes = static_cast<int64_t>((*workspace)->size_bytes());
  launch.counters = static_cast<int32_t*>((*counters)->untyped_data());
  launch.profile = profile_ptr;
  launch.num_workers = static_cast<int>(num_workers);
  launch.num_tasks = static_cast<int>(num_tasks);
  launch.timeout_ms = timeout_ms;
  launch.chaos_seed = chaos_seed;
  if (std::string err = gpu::persistent_enqueue(stream, launch); !err.empty())
    return ffi::Error(ffi::ErrorCode::kInternal, err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ark

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCuda, jax_ark::PersistentCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("num_workers")
                                  .Attr<int64_t>("num_tasks")
                                  .Attr<int64_t>("timeout_ms")
                                  .Attr<int64_t>("chaos_seed")
                                  .Attr<int64_t>("profile"));

JAX_ARK_REGISTER_TARGET("ark_persistent", ArkPersistentCuda);
