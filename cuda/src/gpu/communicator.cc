// Host side of the GPU communicator: allocation, IPC export/import, peer access, registry.
#include "jax_ark/gpu/communicator.hpp"

#include <algorithm>
#include <cstring>
#include <sstream>

namespace jax_ark::gpu {

const char* op_name(int32_t op) {
  switch (op) {
    case kAllReduce: return "all_reduce";
    case kAllGather: return "all_gather";
    case kReduceScatter: return "reduce_scatter";
    case kPermute: return "permute";
    case kAllToAll: return "all_to_all";
    default: return "unknown_op";
  }
}

std::string cuda_error_message(cudaError_t err, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << "jax_ark CUDA error: " << expr << " failed with " << cudaGetErrorName(err) << " ("
     << cudaGetErrorString(err) << ") at " << file << ":" << line;
  return os.str();
}

namespace {
// Restores the caller's current device (setup code runs on Python threads that may use others).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    ARK_CUDA_THROW(cudaGetDevice(&previous_));
    ARK_CUDA_THROW(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};
}  // namespace

void DeviceFree::operator()(void* p) const {
  // Errors are ignored on purpose: this runs in destructors, possibly at interpreter exit.
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFree(p);
  cudaSetDevice(previous);
}

void HostFree::operator()(void* p) const { cudaFreeHost(p); }

namespace {
// Setup fills and copies run on a private non-blocking stream and wait for that stream alone.
// - Not cudaDeviceSynchronize: setup runs at lowering time while XLA may have a collective kernel
//   in flight on this device, spinning for a peer device whose launch (another XLA thread) is
//   still to come; a device-wide wait here would stall, and with a lock held, deadlock.
// - Not a plain cudaMemcpy either: from pageable memory it may return before the DMA lands, and
//   the legacy stream it uses is not ordered with XLA's (or the harness's) non-blocking streams,
//   so a kernel launched right after could read the old bytes.
class SetupStream {
 public:
  SetupStream() { ARK_CUDA_THROW(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~SetupStream() { cudaStreamDestroy(stream_); }
  SetupStream(const SetupStream&) = delete;
  SetupStream& operator=(const SetupStream&) = delete;
  cudaStream_t get() const { return stream_; }
  void finish() const { ARK_CUDA_THROW(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
};
}  // namespace

DeviceBuffer device_alloc(int device, size_t bytes, bool zero) {
  DeviceGuard guard(device);
  void* p = nullptr;
  ARK_CUDA_THROW(cudaMalloc(&p, bytes));
  DeviceBuffer owned(p, DeviceFree{device});
  if (zero) {
    SetupStream stream;
    ARK_CUDA_THROW(cudaMemsetAsync(p, 0, bytes, stream.get()));
    stream.finish();
  }
  return owned;
}

void copy_to_device(int device, void* dst, const void* src, size_t bytes) {
  DeviceGuard guard(device);
  SetupStream stream;
  ARK_CUDA_THROW(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream.get()));
  stream.finish();
}

IpcMapping::IpcMapping(int device, const cudaIpcMemHandle_t& handle) : device_(device) {
  DeviceGuard guard(device);
  void* p = nullptr;
  ARK_CUDA_THROW(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess));
  ptr_ = static_cast<uint8_t*>(p);
}

IpcMapping::~IpcMapping() {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device_);
  cudaIpcCloseMemHandle(ptr_);
  cudaSetDevice(previous);
}

RankState::RankState(int64_t comm_id, int device, int rank, const CommConfig& config)
    : comm_id_(comm_id), device_(device), rank_(rank), config_(config) {
  if (config.n_ranks < 1 || config.n_ranks > kMaxRanks)
    throw std::invalid_argument("jax_ark: group size must be in [1, " + std::to_string(kMaxRanks) +
                                "], got " + std::to_string(config.n_ranks));
  if (rank < 0 || rank >= config.n_ranks)
    throw std::invalid_argument("jax_ark: rank out of range for the group");
  if (config.blocks < 1 || config.blocks > kMaxBlocks)
    throw std::invalid_argument("jax_ark: blocks must be in [1, " + std::to_string(kMaxBlocks) + "]");
  if (config.piece_bytes < 16 || config.piece_bytes % 16 != 0)
    throw std::invalid_argument("jax_ark: piece_bytes must be a positive multiple of 16");
  if (config.ll_bytes < 4 || config.ll_bytes % 4 != 0)
    throw std::invalid_argument("jax_ark: ll_bytes must be a positive multiple of 4");
  layout_ = ScratchLayout::of(config);

  // Zeroed scratch: flags start at 0, below every call's sequence (epoch >= 1), and LL flags at
  // 0, which ll_flag_of never returns.
  scratch_ = device_alloc(device, layout_.total_bytes, /*zero=*/true);
  control_ = device_alloc(device, sizeof(RankControl), /*zero=*/true);
  peer_table_ = device_alloc(device, sizeof(uint8_t*) * config.n_ranks, /*zero=*/true);
  if (config.extra_bytes > 0)
    region_table_ = device_alloc(device, sizeof(uint8_t*) * config.n_ranks, /*zero=*/true);
  {
    DeviceGuard guard(device);
    const RankControl initial{/*epoch=*/1u, 0u, 0u, 0u};
    copy_to_device(device, control_.get(), &initial, sizeof(initial));
    void* host = nullptr;
    ARK_CUDA_THROW(cudaHostAlloc(&host, sizeof(ErrorRecord), cudaHostAllocMapped));
    error_.reset(host);
    std::memset(host, 0, sizeof(ErrorRecord));
    error_host_ = static_cast<volatile ErrorRecord*>(host);
    void* mapped = nullptr;
    ARK_CUDA_THROW(cudaHostGetDevicePointer(&mapped, host, 0));
    view_.error = static_cast<ErrorRecord*>(mapped);
    ARK_CUDA_THROW(preload_kernels());
  }
  view_.peers = static_cast<uint8_t* const*>(peer_table_.get());
  view_.local = scratch();
  view_.control = static_cast<RankControl*>(control_.get());
  view_.comm_id = comm_id;
  view_.n = config.n_ranks;
  view_.rank = rank;
  view_.device = device;
  view_.blocks = config.blocks;
  view_.piece_bytes = config.piece_bytes;
  view_.ll_slot_packets = layout_.ll_slot_packets;
  view_.flags_offset = layout_.flags_offset;
  view_.ll_offset = layout_.ll_offset;
  view_.chunk_offset = layout_.chunk_offset;
}

cudaIpcMemHandle_t RankState::ipc_handle() const {
  DeviceGuard guard(device_);
  cudaIpcMemHandle_t handle;
  ARK_CUDA_THROW(cudaIpcGetMemHandle(&handle, scratch_.get()));
  return handle;
}

void RankState::connect(const std::vector<PeerLink>& peers) {
  if (connected_) throw std::logic_error("jax_ark: communicator rank connected twice");
  if (static_cast<int>(peers.size()) != config_.n_ranks)
    throw std::invalid_argument("jax_ark: connect needs one link per rank");
  std::vector<uint8_t*> table(peers.size(), nullptr);
  for (size_t j = 0; j < peers.size(); ++j) {
    const PeerLink& link = peers[j];
    if (static_cast<int>(j) == rank_) {
      table[j] = scratch();
    } else if (link.kind == PeerLink::kIpc) {
      mappings_.push_back(std::make_unique<IpcMapping>(device_, link.handle));
      table[j] = mappings_.back()->get();
    } else {
      if (link.same_process_ptr == nullptr)
        throw std::invalid_argument("jax_ark: same-process peer without a scratch pointer");
      if (link.device != device_) {
        DeviceGuard guard(device_);
        int can = 0;
        ARK_CUDA_THROW(cudaDeviceCanAccessPeer(&can, device_, link.device));
        if (!can)
          throw CudaError("jax_ark: device " + std::to_string(device_) +
                          " cannot access peer device " + std::to_string(link.device));
        const cudaError_t err = cudaDeviceEnablePeerAccess(link.device, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          (void)cudaGetLastError();  // "already enabled" is fine; clear the non-sticky error
        } else {
          ARK_CUDA_THROW(err);
        }
      }
      table[j] = link.same_process_ptr;
    }
  }
  copy_to_device(device_, peer_table_.get(), table.data(), sizeof(uint8_t*) * table.size());
  if (region_table_) {  // the same layout on every rank: each peer's region at the same offset
    std::vector<uint8_t*> regions(table.size());
    for (size_t j = 0; j < table.size(); ++j) regions[j] = table[j] + layout_.extra_offset;
    copy_to_device(device_, region_table_.get(), regions.data(), sizeof(uint8_t*) * regions.size());
  }
  connected_.store(true, std::memory_order_release);
}

std::string RankState::describe_error() const {
  if (error_host_->state == 0) return "";
  std::ostringstream os;
  const int peer = error_host_->peer;
  os << "jax_ark: " << op_name(error_host_->op) << " on rank " << error_host_->rank;
  if (peer == -2) {
    os << " received a rank operand that differs from the communicator's rank";
  } else {
    os << " timed out waiting for peer rank " << peer << " after "
       << static_cast<double>(error_host_->waited_ns) / 1e6 << " ms";
  }
  os << " (call epoch " << error_host_->epoch << ", device " << error_host_->device
     << ", communicator " << error_host_->comm_id << ", group size " << config_.n_ranks
     << "); the communicator is unusable from now on";
  return os.str();
}

Registry& Registry::instance() {
  // Deliberately leaked: destroying CUDA allocations after the runtime shut down at exit fails.
  static Registry* registry = new Registry();
  return *registry;
}

RankState& Registry::create(int64_t comm_id, int device, int rank, const CommConfig& config) {
  const auto exists = [&] {
    return std::logic_error("jax_ark: communicator " + std::to_string(comm_id) +
                            " already exists on device " + std::to_string(device));
  };
  if (find(comm_id, device) != nullptr) throw exists();
  // Built outside the lock: the FFI handler looks rank states up (find) on XLA's launch threads,
  // which must not wait for this allocation and its CUDA calls (a kernel already running on
  // another device may be spinning for the launch that such a wait would hold back).
  auto state = std::make_unique<RankState>(comm_id, device, rank, config);
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& s : states_)
    if (s->comm_id() == comm_id && s->device() == device) throw exists();
  states_.push_back(std::move(state));
  return *states_.back();
}

RankState* Registry::find(int64_t comm_id, int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& s : states_)
    if (s->comm_id() == comm_id && s->device() == device) return s.get();
  return nullptr;
}

std::vector<RankState*> Registry::all() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<RankState*> out;
  for (const auto& s : states_) out.push_back(s.get());
  return out;
}

std::string validate_call(const CommConfig& config, const CollectiveArgs& args, uint64_t x_bytes,
                          uint64_t y_bytes) {
  const uint64_t n = static_cast<uint64_t>(config.n_ranks);
  if (args.dtype < kF32 || args.dtype > kS32) return "unsupported dtype code";
  if (args.reduce < kSum || args.reduce > kMin) return "unsupported reduce code";
  const uint64_t es = static_cast<uint64_t>(dtype_size(args.dtype));
  const uint64_t m = args.block_bytes;
  if (m % es != 0) return "block size is not a whole number of elements";
  uint64_t want_x = m, want_y = m;
  switch (args.op) {
    case kAllReduce: break;
    case kAllGather: want_y = n * m; break;
    case kReduceScatter: want_x = n * m; break;
    case kAllToAll: want_x = n * m; want_y = n * m; break;
    case kPermute:
      for (uint64_t j = 0; j < n; ++j) {
        if (args.send_to[j] < -1 || args.send_to[j] >= config.n_ranks ||
            args.recv_from[j] < -1 || args.recv_from[j] >= config.n_ranks)
          return "permute route out of range";
        if (args.send_to[j] >= 0 && args.recv_from[args.send_to[j]] != static_cast<int32_t>(j))
          return "permute routes disagree: send_to[j] = d requires recv_from[d] = j";
        // The other direction too: a receiver whose sender sends elsewhere would wait forever.
        if (args.recv_from[j] >= 0 && args.send_to[args.recv_from[j]] != static_cast<int32_t>(j))
          return "permute routes disagree: recv_from[d] = j requires send_to[j] = d";
      }
      break;
    default: return "unknown op code";
  }
  if (x_bytes != want_x || y_bytes != want_y) {
    std::ostringstream os;
    os << op_name(args.op) << ": operand/result sizes " << x_bytes << "/" << y_bytes
       << " bytes do not fit group size " << n;
    return os.str();
  }
  // Chunked calls number their rounds inside the flag word (kRoundBits); mirror the kernel's
  // round count (collective_kernels.cu: chunked_call) and refuse what would overflow it.
  const ScratchLayout layout = ScratchLayout::of(config);
  const uint64_t ll_capacity = (static_cast<uint64_t>(layout.ll_slot_packets) - 1) * 4;
  if (m > ll_capacity) {
    const uint64_t per_round = static_cast<uint64_t>(config.piece_bytes) * config.blocks;
    uint64_t rounds = 0;
    if (args.op == kAllReduce) {
      const uint64_t count = m / es, vec = 16 / es;
      const uint64_t shard_bytes = ((count + n - 1) / n + vec - 1) / vec * vec * es;
      rounds = 2 * ((std::min(shard_bytes, m) + per_round - 1) / per_round);
    } else {
      rounds = (m + per_round - 1) / per_round;
    }
    if (rounds > kMaxRoundsPerCall) {
      std::ostringstream os;
      os << op_name(args.op) << ": " << m << " bytes per peer need " << rounds
         << " rounds of the communicator's scratch, more than " << kMaxRoundsPerCall;
      return os.str();
    }
  }
  return "";
}

}  // namespace jax_ark::gpu
