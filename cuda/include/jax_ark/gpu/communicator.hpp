// Host side of a GPU communicator: one RankState per (communicator, rank) owns the rank's scratch
// (IPC-exportable), its control words, its host-mapped error record and the device table of peer
// pointers. The device twin (communicator_device.hpp) is what kernels see.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "jax_ark/gpu/common.hpp"
#include "jax_ark/gpu/communicator_device.hpp"

namespace jax_ark::gpu {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string cuda_error_message(cudaError_t err, const char* expr, const char* file, int line);

// Throws CudaError naming the failed call (host setup paths; the FFI handler has its own macro).
#define ARK_CUDA_THROW(expr)                                                                    \
  do {                                                                                          \
    cudaError_t ark_err_ = (expr);                                                              \
    if (ark_err_ != cudaSuccess)                                                                \
      throw ::jax_ark::gpu::CudaError(                                                          \
          ::jax_ark::gpu::cuda_error_message(ark_err_, #expr, __FILE__, __LINE__));             \
  } while (0)

// RAII owners ---------------------------------------------------------------------------------
struct DeviceFree {
  int device;
  void operator()(void* p) const;
};
using DeviceBuffer = std::unique_ptr<void, DeviceFree>;
// `zero` fills it with zeros, finished before returning (never a device-wide synchronization).
DeviceBuffer device_alloc(int device, size_t bytes, bool zero);
// Host -> device copy on a private stream, complete on return: safe to read from any stream.
void copy_to_device(int device, void* dst, const void* src, size_t bytes);

struct HostFree {
  void operator()(void* p) const;
};
using HostBuffer = std::unique_ptr<void, HostFree>;

// A peer's scratch opened from a CUDA IPC handle; closed on destruction.
class IpcMapping {
 public:
  IpcMapping(int device, const cudaIpcMemHandle_t& handle);
  ~IpcMapping();
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  uint8_t* get() const { return ptr_; }

 private:
  int device_;
  uint8_t* ptr_ = nullptr;
};

// How to reach peer j's scratch.
struct PeerLink {
  enum Kind { kSelf, kSameProcess, kIpc } kind = kSelf;
  uint8_t* same_process_ptr = nullptr;  // kSelf / kSameProcess
  int device = 0;                       // the peer's device (kSameProcess: for peer access)
  cudaIpcMemHandle_t handle{};          // kIpc
};

class RankState {
 public:
  RankState(int64_t comm_id, int device, int rank, const CommConfig& config);
  RankState(const RankState&) = delete;
  RankState& operator=(const RankState&) = delete;

  // Opens every peer and writes the device table of peer pointers. Call once.
  void connect(const std::vector<PeerLink>& peers);

  cudaIpcMemHandle_t ipc_handle() const;
  uint8_t* scratch() const { return static_cast<uint8_t*>(scratch_.get()); }
  const CommDevice& device_view() const { return view_; }
  const CommConfig& config() const { return config_; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int64_t comm_id() const { return comm_id_; }
  bool connected() const { return connected_.load(std::memory_order_acquire); }
  // Persistent plans (CommConfig::extra_bytes > 0): every rank's symmetric region as mapped here
  // (device array [n], mine included), mine, and its size; valid once connected.
  uint8_t* const* region_peers() const { return static_cast<uint8_t* const*>(region_table_.get()); }
  uint8_t* region() const { return scratch() + layout_.extra_offset; }
  uint64_t region_bytes() const { return config_.extra_bytes; }
  // The record the kernels write on failure (host-mapped: readable without a sync).
  const volatile ErrorRecord& error() const { return *error_host_; }
  std::string describe_error() const;  // "" when no error was recorded

 private:
  int64_t comm_id_;
  int device_;
  int rank_;
  CommConfig config_;
  ScratchLayout layout_;
  DeviceBuffer scratch_;
  DeviceBuffer control_;
  DeviceBuffer peer_table_;
  DeviceBuffer region_table_;  // extra_bytes > 0 only
  HostBuffer error_;
  volatile ErrorRecord* error_host_ = nullptr;
  std::vector<std::unique_ptr<IpcMapping>> mappings_;
  CommDevice view_;
  std::atomic<bool> connected_{false};  // set by the lowering thread, read by XLA's threads
};

// Process-wide registry of the rank states the FFI handler uses, keyed by (comm id, device).
class Registry {
 public:
  static Registry& instance();
  RankState& create(int64_t comm_id, int device, int rank, const CommConfig& config);
  RankState* find(int64_t comm_id, int device);
  std::vector<RankState*> all();

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<RankState>> states_;
};

// Enqueues one collective call on `stream` (no host synchronization).
cudaError_t launch_collective(const CommDevice& comm, const CollectiveArgs& args,
                              cudaStream_t stream);
// Every rank of one single-GPU communicator in ONE cooperative launch (the harness): rank r runs
// blocks [r * blocks_per_rank, (r + 1) * blocks_per_rank) with comm[r] and x[r] / y[r]; `args`
// (x, y and rank_operand ignored) is shared. Passed by value as kernel parameters, hence the rank
// limit (the 4 KiB parameter space of CUDA < 12.1).
constexpr int kMaxGroupRanks = 16;
struct GroupLaunch {
  CommDevice comm[kMaxGroupRanks];
  const void* x[kMaxGroupRanks];
  void* y[kMaxGroupRanks];
  const int32_t* rank_operand[kMaxGroupRanks];
  CollectiveArgs args;
  int32_t n = 0;
  int32_t skip_rank = -1;       // a rank whose blocks return at once (forced timeouts)
  uint32_t blocks_per_rank = 0;  // set by launch_collective_group
};
static_assert(sizeof(GroupLaunch) < 4000, "GroupLaunch must fit the 4 KiB kernel parameter space");
// Enqueues one call of every rank of `group` on `stream`; reports the blocks per rank it used.
cudaError_t launch_collective_group(const GroupLaunch& group, cudaStream_t stream,
                                    unsigned* blocks_per_rank);
// Forces the kernels to load now (lazy module loading must not happen inside a capture).
cudaError_t preload_kernels();
// Checks sizes and codes of a call; returns "" when valid, else a message.
std::string validate_call(const CommConfig& config, const CollectiveArgs& args, uint64_t x_bytes,
                          uint64_t y_bytes);

}  // namespace jax_ark::gpu
