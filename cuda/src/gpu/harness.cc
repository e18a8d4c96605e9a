// Single-GPU harness: N ranks of one communicator in one process, all ranks' blocks in ONE
// cooperative launch per call (see harness.hpp).
#include "jax_ark/gpu/harness.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "jax_ark/gpu/communicator.hpp"

namespace jax_ark::gpu {
namespace {

class Stream {
 public:
  Stream() { ARK_CUDA_THROW(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class Event {
 public:
  explicit Event(unsigned flags = cudaEventDefault) {
    ARK_CUDA_THROW(cudaEventCreateWithFlags(&event_, flags));
  }
  ~Event() { cudaEventDestroy(event_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

struct GraphExec {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphExec() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

std::atomic<int64_t> next_harness_comm{-1};

// N connected rank states on the current device, with per-rank stream and buffers.
struct HarnessGroup {
  int device = 0;
  CommConfig config;
  std::vector<std::unique_ptr<RankState>> ranks;
  Stream stream;  // every call of every rank: one cooperative launch on this stream
  std::vector<DeviceBuffer> xs, ys, rank_operands;
  CollectiveArgs args;
  uint64_t x_bytes = 0, y_bytes = 0;
  // Several x's / y's per rank live at these strides (256: as aligned as XLA's buffers).
  uint64_t x_stride = 0, y_stride = 0;
  int32_t x_sets = 1, y_slots = 1;

  HarnessGroup(int32_t op, int32_t reduce, int32_t dtype, int32_t n, uint64_t x_bytes_in,
               const std::vector<int32_t>& send_to, const std::vector<int32_t>& recv_from,
               const HarnessOptions& options, int32_t x_sets_in = 1, int32_t y_slots_in = 1) {
    if (n < 1 || n > kMaxGroupRanks)
      throw std::invalid_argument("jax_ark harness: rank count must be in [1, " +
                                  std::to_string(kMaxGroupRanks) + "]");
    ARK_CUDA_THROW(cudaGetDevice(&device));
    int sms = 0;
    ARK_CUDA_THROW(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    config.n_ranks = n;
    // Every rank's blocks spin on the others': all of them must be resident at once, one block
    // per SM at most (512 threads with __launch_bounds__ always fit one per SM).
    config.blocks = options.blocks > 0 ? options.blocks : std::clamp(sms / n, 1, 16);
    if (config.blocks * n > sms)
      throw std::invalid_argument("jax_ark harness: blocks * ranks exceeds the SM count (" +
                                  std::to_string(sms) + "), ranks could not all be resident");
    config.piece_bytes = options.piece_bytes;
    config.ll_bytes = options.ll_bytes;

    args.op = op;
    args.reduce = reduce;
    args.dtype = dtype;
    args.timeout_ns = static_cast<uint64_t>(std::max<int64_t>(options.timeout_ms, 1)) * 1000000ull;
    const bool per_peer_block = op == kReduceScatter || op == kAllToAll;
    if (per_peer_block && x_bytes_in % n != 0)
      throw std::invalid_argument("jax_ark harness: x must hold n equal blocks");
    args.block_bytes = per_peer_block ? x_bytes_in / n : x_bytes_in;
    for (int j = 0; j < kMaxRanks; ++j) args.send_to[j] = args.recv_from[j] = -1;
    if (op == kPermute) {
      if (static_cast<int>(send_to.size()) != n || static_cast<int>(recv_from.size()) != n)
        throw std::invalid_argument("jax_ark harness: permute needs send_to/recv_from of length n");
      for (int j = 0; j < n; ++j) {
        args.send_to[j] = send_to[j];
        args.recv_from[j] = recv_from[j];
      }
    }
    x_bytes = x_bytes_in;
    y_bytes = (op == kAllGather || op == kAllToAll) ? n * args.block_bytes : args.block_bytes;
    const std::string problem = validate_call(config, args, x_bytes, y_bytes);
    if (!problem.empty()) throw std::invalid_argument("jax_ark harness: " + problem);

    x_sets = std::max(x_sets_in, 1);
    y_slots = std::max(y_slots_in, 1);
    x_stride = ScratchLayout::round_up(std::max<uint64_t>(x_bytes, 16), 256);
    y_stride = ScratchLayout::round_up(std::max<uint64_t>(y_bytes, 16), 256);
    const int64_t comm_id = next_harness_comm.fetch_sub(1);
    for (int r = 0; r < n; ++r) ranks.push_back(std::make_unique<RankState>(comm_id, device, r, config));
    std::vector<PeerLink> links(n);
    for (int j = 0; j < n; ++j) {
      links[j].kind = PeerLink::kSameProcess;
      links[j].same_process_ptr = ranks[j]->scratch();
      links[j].device = device;
    }
    for (int r = 0; r < n; ++r) {
      ranks[r]->connect(links);
      xs.push_back(device_alloc(device, x_stride * x_sets, true));
      ys.push_back(device_alloc(device, y_stride * y_slots, true));
      rank_operands.push_back(device_alloc(device, sizeof(int32_t), false));
      copy_to_device(device, rank_operands[r].get(), &r, sizeof(int32_t));
    }
  }

  // One call of every rank but `skip_rank`.
  cudaError_t launch(int call = 0, int32_t skip_rank = -1) const {
    GroupLaunch g{};
    g.args = args;
    g.n = static_cast<int32_t>(ranks.size());
    g.skip_rank = skip_rank;
    for (int r = 0; r < g.n; ++r) {
      g.comm[r] = ranks[r]->device_view();
      g.x[r] = static_cast<uint8_t*>(xs[r].get()) + (call % x_sets) * x_stride;
      g.y[r] = static_cast<uint8_t*>(ys[r].get()) + (call % y_slots) * y_stride;
      g.rank_operand[r] = static_cast<const int32_t*>(rank_operands[r].get());
    }
    return launch_collective_group(g, stream.get(), nullptr);
  }

  void sync_all() const { ARK_CUDA_THROW(cudaStreamSynchronize(stream.get())); }

  void throw_recorded_errors() const {
    std::ostringstream os;
    bool any = false;
    for (const auto& r : ranks) {
      const std::string msg = r->describe_error();
      if (msg.empty()) continue;
      os << (any ? "\n" : "") << msg;
      any = true;
    }
    if (any) throw std::runtime_error(os.str());
  }
};

}  // namespace

std::vector<std::string> harness_run(int32_t op, int32_t reduce, int32_t dtype, int32_t n,
                                     const std::vector<std::string>& inputs,
                                     const std::vector<int32_t>& send_to,
                                     const std::vector<int32_t>& recv_from,
                                     const HarnessOptions& options) {
  if (static_cast<int>(inputs.size()) != n)
    throw std::invalid_argument("jax_ark harness: need one input per rank");
  for (const auto& in : inputs)
    if (in.size() != inputs[0].size())
      throw std::invalid_argument("jax_ark harness: inputs differ in size");
  const int32_t iters = std::max(options.iters, 1);
  const int32_t sets = std::max(options.input_sets, 1);
  if (inputs[0].size() % sets != 0)
    throw std::invalid_argument("jax_ark harness: inputs do not split into input_sets");
  const uint64_t x_bytes = inputs[0].size() / sets;
  HarnessGroup group(op, reduce, dtype, n, x_bytes, send_to, recv_from, options, sets,
                     options.all_outputs ? iters : 1);
  for (int r = 0; r < n; ++r)
    for (int s = 0; s < sets; ++s)
      copy_to_device(group.device, static_cast<uint8_t*>(group.xs[r].get()) + s * group.x_stride,
                     inputs[r].data() + s * x_bytes, x_bytes);
  for (int it = 0; it < iters; ++it) ARK_CUDA_THROW(group.launch(it, options.skip_rank));
  group.sync_all();
  group.throw_recorded_errors();
  // The last call's y, or every call's (slot i = call i).
  const int32_t first = options.all_outputs ? 0 : (iters - 1) % group.y_slots;
  const int32_t count = options.all_outputs ? iters : 1;
  std::vector<std::string> outputs(n);
  for (int r = 0; r < n; ++r) {
    outputs[r].resize(group.y_bytes * count);
    for (int k = 0; k < count; ++k)
      ARK_CUDA_THROW(cudaMemcpy(outputs[r].data() + k * group.y_bytes,
                                static_cast<uint8_t*>(group.ys[r].get()) +
                                    (first + k) * group.y_stride,
                                group.y_bytes, cudaMemcpyDeviceToHost));
  }
  return outputs;
}

double harness_time(int32_t op, int32_t reduce, int32_t dtype, int32_t n, uint64_t x_bytes,
                    int32_t iters, bool graph, const HarnessOptions& options) {
  if (iters < 1) throw std::invalid_argument("jax_ark harness: iters must be >= 1");
  std::vector<int32_t> send_to, recv_from;
  if (op == kPermute) {  // a ring
    for (int r = 0; r < n; ++r) {
      send_to.push_back((r + 1) % n);
      recv_from.push_back((r + n - 1) % n);
    }
  }
  HarnessGroup group(op, reduce, dtype, n, x_bytes, send_to, recv_from, options);
  cudaStream_t s0 = group.stream.get();
  Event start, stop;
  GraphExec g;
  if (graph) {  // `iters` group launches as one graph
    ARK_CUDA_THROW(cudaStreamBeginCapture(s0, cudaStreamCaptureModeThreadLocal));
    for (int it = 0; it < iters; ++it) ARK_CUDA_THROW(group.launch());
    ARK_CUDA_THROW(cudaStreamEndCapture(s0, &g.graph));
    ARK_CUDA_THROW(cudaGraphInstantiate(&g.exec, g.graph, 0));
    ARK_CUDA_THROW(cudaGraphLaunch(g.exec, s0));  // warm-up
  } else {
    for (int it = 0; it < std::min(iters, 10); ++it) ARK_CUDA_THROW(group.launch());  // warm-up
  }
  group.sync_all();
  group.throw_recorded_errors();
  ARK_CUDA_THROW(cudaEventRecord(start.get(), s0));
  if (graph) {
    ARK_CUDA_THROW(cudaGraphLaunch(g.exec, s0));
  } else {
    for (int it = 0; it < iters; ++it) ARK_CUDA_THROW(group.launch());
  }
  ARK_CUDA_THROW(cudaEventRecord(stop.get(), s0));
  group.sync_all();
  group.throw_recorded_errors();
  float ms = 0;
  ARK_CUDA_THROW(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return ms * 1000.0 / iters;
}

double copy_bandwidth(uint64_t nbytes, int32_t iters) {
  if (nbytes == 0 || iters < 1) throw std::invalid_argument("jax_ark: copy_bandwidth needs bytes and iters");
  int device = 0;
  ARK_CUDA_THROW(cudaGetDevice(&device));
  DeviceBuffer src = device_alloc(device, nbytes, true);
  DeviceBuffer dst = device_alloc(device, nbytes, true);
  Stream stream;
  Event start, stop;
  ARK_CUDA_THROW(cudaMemcpyAsync(dst.get(), src.get(), nbytes, cudaMemcpyDeviceToDevice, stream.get()));
  ARK_CUDA_THROW(cudaEventRecord(start.get(), stream.get()));
  for (int i = 0; i < iters; ++i)
    ARK_CUDA_THROW(cudaMemcpyAsync(dst.get(), src.get(), nbytes, cudaMemcpyDeviceToDevice, stream.get()));
  ARK_CUDA_THROW(cudaEventRecord(stop.get(), stream.get()));
  ARK_CUDA_THROW(cudaStreamSynchronize(stream.get()));
  float ms = 0;
  ARK_CUDA_THROW(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return 2.0 * static_cast<double>(nbytes) * iters / (ms * 1e-3) / 1e9;
}

}  // namespace jax_ark::gpu
