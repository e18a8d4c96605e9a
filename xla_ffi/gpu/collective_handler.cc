// XLA FFI handler `ark_collective_cuda`: decodes the call, finds this device's rank state of the
// communicator bootstrapped at lowering time (jax_ark/_cuda_collectives.py) and enqueues ONE
// kernel on XLA's stream. No synchronization, no allocation.
//
// Two targets, one implementation (docs/gpu_runtime.md, "CUDA graphs"):
//  * `ark_collective_cuda` (default) is NOT command-buffer compatible: XLA runs it as its own
//    thunk, so this function runs on every call, and a communicator poisoned by an earlier
//    timeout is refused with DEADLINE_EXCEEDED before anything is enqueued.
//  * `ark_collective_cuda_graph` (JAX_ARK_CUDA_GRAPHS=1 at lowering) declares
//    kCmdBufferCompatible: XLA records this function's launch into its CUDA graph once (again when
//    the buffers move) and replays the kernel without calling it. That is safe because the launch
//    carries no per-call host state: everything that changes from call to call (the epoch, hence
//    the scratch half and the flag values) lives in device memory and is read by the kernel, the
//    rank state behind comm_id lives as long as the process, and every check below depends only on
//    the call site (attributes, shapes, the communicator's config), so passing it once at record
//    time means passing it on every replay. The one check that depends on history, "an earlier
//    call of this communicator failed", is repeated by the kernel: a replayed call on a poisoned
//    communicator returns at once instead of waiting out the timeout again. What a replay cannot
//    do is return an error to XLA: that failure shows only through jax_ark.check().
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "jax_ark/gpu/communicator.hpp"
#include "registry.h"
// XLA's header trips -Wreturn-type/-Wattributes in GCC; those are not ours to fix.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wreturn-type"
#pragma GCC diagnostic ignored "-Wattributes"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace ffi = xla::ffi;

namespace jax_ark::gpu {
namespace {

#define ARK_CUDA_FFI(expr)                                                                    \
  do {                                                                                        \
    cudaError_t ark_err_ = (expr);                                                            \
    if (ark_err_ != cudaSuccess)                                                              \
      return ffi::Error(ffi::ErrorCode::kInternal,                                            \
                        ::jax_ark::gpu::cuda_error_message(ark_err_, #expr, __FILE__, __LINE__)); \
  } while (0)

int32_t dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::S32: return kS32;
    default: return -1;
  }
}

constexpr int64_t kMaxTimeoutMs = int64_t{1} << 40;  // ~35 years

ffi::Error ArkCollectiveCudaImpl(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
                                 ffi::Buffer<ffi::S32> rank, ffi::Buffer<ffi::S32> color,
                                 ffi::Result<ffi::AnyBuffer> y, int32_t op, int32_t reduce,
                                 int64_t group_size, int64_t comm_key, int64_t timeout_ms,
                                 ffi::Span<const int64_t> send_to,
                                 ffi::Span<const int64_t> recv_from, int64_t comm_id,
                                 int64_t /*site: CUDA streams keep program order*/) {
  (void)color;     // the communicator (one group per device) already fixes the group
  (void)comm_key;  // folded into comm_id by the lowering
  // The stream's device is the CUDA ordinal in this process, whatever XLA calls the device.
  int device = device_ordinal;
#if CUDART_VERSION >= 12080
  ARK_CUDA_FFI(cudaStreamGetDevice(stream, &device));
#else
  // cudaStreamGetDevice is CUDA 12.8+. Older runtimes: XLA runs a device's thunks with that
  // device's primary context current, so the current device is the stream's; a mismatch would
  // find no communicator below and fail with a clear error rather than use a wrong one.
  ARK_CUDA_FFI(cudaGetDevice(&device));
#endif
  RankState* state = Registry::instance().find(comm_id, device);
  if (state == nullptr || !state->connected())
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_ark: no communicator " + std::to_string(comm_id) + " on CUDA device " +
                          std::to_string(device) +
                          " (it is created when the program is lowered; was it lowered in this "
                          "process?)");
  // A failure recorded by an earlier call poisons the communicator: its epochs are out of step.
  const std::string earlier = state->describe_error();
  if (!earlier.empty()) return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, earlier);

  if (group_size != state->config().n_ranks)
    return ffi::Error::InvalidArgument("jax_ark: group_size " + std::to_string(group_size) +
                                       " differs from the communicator's " +
                                       std::to_string(state->config().n_ranks));
  CollectiveArgs args;
  args.op = op;
  args.reduce = reduce;
  args.dtype = dtype_code(x.element_type());
  if (args.dtype < 0 || x.element_type() != y->element_type())
    return ffi::Error::InvalidArgument(
        "jax_ark: collectives support float32, bfloat16, float16 and int32 with equal x/y dtypes");
  const uint64_t n = static_cast<uint64_t>(group_size);
  const uint64_t x_bytes = x.size_bytes();
  const uint64_t y_bytes = y->size_bytes();
  const bool per_peer_block = op == kReduceScatter || op == kAllToAll;
  if (per_peer_block && x_bytes % n != 0)
    return ffi::Error::InvalidArgument("jax_ark: x does not split into group_size blocks");
  args.block_bytes = per_peer_block ? x_bytes / n : x_bytes;
  args.x = x.untyped_data();
  args.y = y->untyped_data();
  args.rank_operand = rank.typed_data();
  // Contract (docs/internals.md): timeout_ms > 0, like the CPU backend. Capped so the
  // nanoseconds fit 64 bits next to %globaltimer.
  if (timeout_ms <= 0 || timeout_ms > kMaxTimeoutMs)
    return ffi::Error::InvalidArgument("jax_ark: timeout_ms must be in [1, " +
                                       std::to_string(kMaxTimeoutMs) + "], got " +
                                       std::to_string(timeout_ms));
  args.timeout_ns = static_cast<uint64_t>(timeout_ms) * 1000000ull;
  for (int j = 0; j < kMaxRanks; ++j) args.send_to[j] = args.recv_from[j] = -1;
  if (op == kPermute) {
    if (send_to.size() != n || recv_from.size() != n)
      return ffi::Error::InvalidArgument("jax_ark: permute needs send_to/recv_from of group size");
    for (uint64_t j = 0; j < n; ++j) {
      args.send_to[j] = static_cast<int32_t>(send_to[j]);
      args.recv_from[j] = static_cast<int32_t>(recv_from[j]);
    }
  }
  const std::string problem = validate_call(state->config(), args, x_bytes, y_bytes);
  if (!problem.empty()) return ffi::Error::InvalidArgument("jax_ark: " + problem);

  // Kernels launch into the current device's context: make it the stream's device.
  // (Usually already current: XLA runs this device's thunks on this thread with its primary
  // context, which is the one the runtime API uses too.)
  int current = -1;
  ARK_CUDA_FFI(cudaGetDevice(&current));
  if (current != device) ARK_CUDA_FFI(cudaSetDevice(device));
  ARK_CUDA_FFI(launch_collective(state->device_view(), args, stream));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ark::gpu

namespace {
// The one binding of both targets (the attributes the lowering in _cuda_collectives.py emits).
auto collective_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Arg<ffi::AnyBuffer>()         // x
      .Arg<ffi::Buffer<ffi::S32>>()  // rank
      .Arg<ffi::Buffer<ffi::S32>>()  // color
      .Ret<ffi::AnyBuffer>()         // y
      .Attr<int32_t>("op")
      .Attr<int32_t>("reduce")
      .Attr<int64_t>("group_size")
      .Attr<int64_t>("comm_key")
      .Attr<int64_t>("timeout_ms")
      .Attr<ffi::Span<const int64_t>>("send_to")
      .Attr<ffi::Span<const int64_t>>("recv_from")
      .Attr<int64_t>("comm_id")
      .Attr<int64_t>("site");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkCollectiveCuda, jax_ark::gpu::ArkCollectiveCudaImpl,
                              collective_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkCollectiveCudaGraph, jax_ark::gpu::ArkCollectiveCudaImpl,
                              collective_binding(), {ffi::Traits::kCmdBufferCompatible});

JAX_ARK_REGISTER_TARGET("ark_collective_cuda", ArkCollectiveCuda);
JAX_ARK_REGISTER_TARGET("ark_collective_cuda_graph", ArkCollectiveCudaGraph);
