// XLA FFI handler `ark_persistent` for the CUDA platform: decodes the call exactly as
// docs/plan_format.md ("The FFI call ark_persistent") says and enqueues the persistent kernel on
// XLA's stream. It never synchronizes: a failure recorded on the device by an earlier call is
// reported by the next call (and the failed call's outputs are invalid).
//
// Plans without put tasks have a second target, `ark_persistent_graph` (JAX_ARK_CUDA_GRAPHS=1 at
// lowering, as for the collectives; docs/gpu_runtime.md, "CUDA graphs"), the same function
// declared command-buffer compatible: XLA may record its memsets and launch into its CUDA graph
// once and replay them without calling it. What a replay repeats is right: every check below
// depends on the call site only (attributes, buffer sizes, the device's resident blocks), and
// the launch parameters are the buffers' addresses, which XLA records again when they move. What
// a replay keeps from the recording is the call's number (`seq` of the abort word): after a
// failure on the device (abort word >= that number) each replay stops at once with invalid
// outputs instead of running or waiting out its timeout again, and the failure shows through
// jax_ark.check() (the handler that would report it at the next call does not run). Plans with
// put tasks have `ark_persistent_comm` and its twin `ark_persistent_comm_graph`: their epoch is not
// a launch parameter but the rank's control word in device memory (the kernel reads it and its
// last block advances it), so a replayed launch is the site's next call on every rank.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "jax_ark/gpu/communicator.hpp"
#include "jax_ark/gpu/persistent_launch.hpp"
#include "jax_ark/plan_format.hpp"
#include "persistent_binding.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ark {
namespace {

ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ark_persistent: " + msg);
}

// comm_id != 0: a plan with put tasks (target ark_persistent_comm): its group's communicator,
// bootstrapped at lowering (jax_ark/_persistent/_gpu_comm.py), holds this rank's symmetric region;
// inbox_bytes is the plan's (persistent_comm_needs, computed at lowering from the same words).
ffi::Error PersistentImpl(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                          int64_t chaos_seed, int64_t profile, int64_t comm_id, int64_t inbox_bytes) {
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

  // Communication: the rank state of this device in the plan's communicator.
  gpu::RankState* state = nullptr;
  int64_t group_size = 0;
  if (comm_id != 0) {
    int device = 0;
#if CUDART_VERSION >= 12080
    if (cudaStreamGetDevice(stream, &device) != cudaSuccess) return invalid("cudaStreamGetDevice failed");
#else
    if (cudaGetDevice(&device) != cudaSuccess) return invalid("cudaGetDevice failed");
#endif
    state = gpu::Registry::instance().find(comm_id, device);
    if (state == nullptr || !state->connected() || state->region_peers() == nullptr)
      return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                        "ark_persistent: no communicator " + std::to_string(comm_id) +
                            " with a symmetric region on CUDA device " + std::to_string(device) +
                            " (it is created when the program is lowered in this process)");
    group_size = state->config().n_ranks;
    const gpu::PersistentSymLayout layout = gpu::PersistentSymLayout::of(num_tasks, static_cast<int32_t>(group_size), inbox_bytes);
    if (inbox_bytes < 0 || layout.total_bytes > state->region_bytes())
      return invalid("the plan needs a symmetric region of " + std::to_string(layout.total_bytes) +
                     " bytes; its communicator has " + std::to_string(state->region_bytes()));
  }

  // Operands: the storage-0 arrays, [the comm operand (int32[6]; the rank comes from the
  // communicator here)], then the plan (int32[total_words]) last.
  const size_t trailing = comm_id != 0 ? 2 : 1;
  if (args.size() < trailing) return invalid("expected the plan (and the comm operand) as the last operands");
  const size_t num_args = args.size() - trailing;
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
  const int64_t num_counters = num_tasks * (1 + group_size);  // signals follow (unused on GPUs)
  if ((*counters)->element_type() != ffi::DataType::S32 ||
      static_cast<int64_t>((*counters)->element_count()) != num_counters)
    return invalid("the counters result must be int32[" + std::to_string(num_counters) + "]");
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
  if (state != nullptr) {
    const gpu::PersistentSymLayout layout = gpu::PersistentSymLayout::of(num_tasks, static_cast<int32_t>(group_size), inbox_bytes);
    launch.comm.peers = state->region_peers();
    launch.comm.local = state->region();
    launch.comm.rank = state->rank();
    launch.comm.n = static_cast<int32_t>(group_size);
    // The epoch lives in the rank's control words on the device (read by the kernel, advanced
    // by its last block), so a launch replayed from a CUDA graph gets the next call's epoch.
    launch.comm.epoch = 0;
    launch.comm_control = state->device_view().control;
    launch.comm.inbox_bytes = inbox_bytes;
    launch.comm.num_tasks = static_cast<int32_t>(num_tasks);
    launch.comm.signals_offset = layout.signals_offset;
    launch.comm.inbox_offset = layout.inbox_offset;
  }
  if (std::string err = gpu::persistent_enqueue(stream, launch); !err.empty())
    return ffi::Error(ffi::ErrorCode::kInternal, err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ark

namespace jax_ark {
namespace {
ffi::Error PersistentCuda(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                          int64_t chaos_seed, int64_t profile) {
  return PersistentImpl(stream, args, rets, num_workers, num_tasks, timeout_ms, chaos_seed, profile, 0, 0);
}
ffi::Error PersistentCommCuda(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                              int64_t num_workers, int64_t num_tasks, int64_t timeout_ms,
                              int64_t chaos_seed, int64_t profile, int64_t comm_id,
                              int64_t inbox_bytes) {
  if (comm_id == 0) return invalid("ark_persistent_comm needs a communicator (comm_id != 0)");
  return PersistentImpl(stream, args, rets, num_workers, num_tasks, timeout_ms, chaos_seed, profile,
                        comm_id, inbox_bytes);
}
}  // namespace
}  // namespace jax_ark

namespace {
// The persistent call's binding on this platform (persistent_binding.h: shared with the CPU).
auto cuda_persistent_binding() {
  return jax_ark::persistent_binding<xla::ffi::PlatformStream<cudaStream_t>>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCuda, jax_ark::PersistentCuda,
                              cuda_persistent_binding());
// The command-buffer-compatible registration of the same handler (plans without put tasks).
XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCudaGraph, jax_ark::PersistentCuda,
                              cuda_persistent_binding(), {xla::ffi::Traits::kCmdBufferCompatible});
// Plans with put tasks (plan v3 communication): the same call plus the communicator.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCommCuda, jax_ark::PersistentCommCuda,
                              cuda_persistent_binding()
                                  .Attr<int64_t>("comm_id")
                                  .Attr<int64_t>("inbox_bytes"));
// Its command-buffer-compatible registration: the communicator behind comm_id lives as long as
// the process and the epoch is read and advanced on the device, so a replay is a new call.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkPersistentCommCudaGraph, jax_ark::PersistentCommCuda,
                              cuda_persistent_binding()
                                  .Attr<int64_t>("comm_id")
                                  .Attr<int64_t>("inbox_bytes"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

JAX_ARK_REGISTER_TARGET("ark_persistent", ArkPersistentCuda);
JAX_ARK_REGISTER_TARGET("ark_persistent_graph", ArkPersistentCudaGraph);
JAX_ARK_REGISTER_TARGET("ark_persistent_comm", ArkPersistentCommCuda);
JAX_ARK_REGISTER_TARGET("ark_persistent_comm_graph", ArkPersistentCommCudaGraph);
