// Single-GPU harness of persistent plans with put tasks: every rank of a group on the current GPU,
// each with its own buffers and symmetric region, all ranks' workers in ONE cooperative launch per
// call (persistent_group_enqueue). The GPU tests drive it through _ark_cuda.persistent_group_run.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "jax_ark/gpu/communicator.hpp"
#include "jax_ark/gpu/persistent_launch.hpp"
#include "jax_ark/plan_check.hpp"
#include "jax_ark/plan_format.hpp"

namespace jax_ark::gpu {

namespace pf = jax_ark::plan;

namespace {

int64_t tensor_bytes(const pf::TensorRecord& t) {
  return t.num_elements * static_cast<int64_t>(pf::dtype_size(t.dtype));
}

// Owns a non-blocking stream; destroyed with it.
class HarnessStream {
 public:
  HarnessStream() { ARK_CUDA_THROW(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~HarnessStream() { cudaStreamDestroy(stream_); }
  HarnessStream(const HarnessStream&) = delete;
  HarnessStream& operator=(const HarnessStream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// One rank's device buffers for the whole run of calls.
struct RankBuffers {
  DeviceBuffer plan, workspace, counters, region;
  std::vector<DeviceBuffer> args, results;  // results[j] empty: an in-place result (its operand's)
  std::vector<void*> arg_ptrs, result_ptrs;
};

}  // namespace

std::string persistent_comm_needs(const int32_t* words, int64_t num_words, PersistentCommNeeds* out) {
  if (num_words < 32) return "the plan is shorter than its header";
  const pf::PlanView plan{words};
  const pf::Header& h = plan.header();
  if (h.magic != pf::kMagic || h.total_words != num_words || h.version < 1)
    return "not a plan (bad magic, length or version)";
  if (h.version < 3 || h.group_size == 0) {  // no communication: nothing symmetric
    *out = PersistentCommNeeds{};
    return {};
  }
  if (h.group_size < 1 || h.group_size > kPersistentMaxGroup)
    return "the plan's communication group has " + std::to_string(h.group_size) +
           " ranks; the CUDA executor takes 1.." + std::to_string(kPersistentMaxGroup);
  int64_t inbox_end = 0;
  if (std::string err = jax_ark::plan::inbox_end_of(plan, &inbox_end); !err.empty()) return err;
  out->group_size = h.group_size;
  out->inbox_bytes = inbox_end;
  out->layout = PersistentSymLayout::of(h.num_tasks, h.group_size, inbox_end);
  return {};
}

namespace {

// Every rank's buffers and region for a run of calls of one plan on the current device.
class Group {
 public:
  Group(const std::vector<int32_t>& plan_words, int32_t n_ranks) : words_(plan_words), n_(n_ranks) {
    if (std::string err = persistent_comm_needs(words_.data(), static_cast<int64_t>(words_.size()), &needs_);
        !err.empty())
      throw std::invalid_argument("persistent_group_run: " + err);
    // A plan without a group runs as n_ranks independent copies (compute-only baselines).
    if (needs_.group_size != 0 && n_ranks != needs_.group_size)
      throw std::invalid_argument("persistent_group_run: the plan is for " + std::to_string(needs_.group_size) +
                                  " ranks, got " + std::to_string(n_ranks));
    if (n_ranks < 1 || n_ranks > kPersistentMaxGroup)
      throw std::invalid_argument("persistent_group_run: n_ranks must be in 1.." +
                                  std::to_string(kPersistentMaxGroup));
    const pf::Header& h = header();
    arg_bytes_.assign(static_cast<size_t>(h.num_args), -1);
    out_bytes_.assign(static_cast<size_t>(h.num_outputs), -1);
    std::vector<int32_t> out_alias(static_cast<size_t>(h.num_outputs), 0);
    const pf::PlanView plan{words_.data()};
    for (int i = 0; i < h.num_tensors; ++i) {
      const pf::TensorRecord& t = plan.tensor(i);
      if (t.storage == pf::kStorageArg && t.storage_index >= 0 && t.storage_index < h.num_args)
        arg_bytes_[t.storage_index] = tensor_bytes(t);
      if (t.storage == pf::kStorageResult && t.storage_index >= 0 && t.storage_index < h.num_outputs) {
        out_bytes_[t.storage_index] = tensor_bytes(t);
        out_alias[t.storage_index] = t.alias_plus1;
      }
    }
    ARK_CUDA_THROW(cudaGetDevice(&device_));
    const size_t plan_bytes = words_.size() * sizeof(int32_t);
    ranks_.resize(static_cast<size_t>(n_));
    std::vector<uint8_t*> regions(static_cast<size_t>(n_));
    for (int32_t r = 0; r < n_; ++r) {
      RankBuffers& b = ranks_[r];
      b.plan = device_alloc(device_, plan_bytes, false);
      copy_to_device(device_, b.plan.get(), words_.data(), plan_bytes);
      b.workspace = device_alloc(device_, static_cast<size_t>(std::max<int64_t>(h.workspace_bytes, 1)), false);
      b.counters = device_alloc(device_, sizeof(int32_t) * static_cast<size_t>(std::max(h.num_counters, 1)), true);
      // Entry and signals start at 0 (never empty: a plan without a group has no region at all).
      b.region = device_alloc(device_, std::max<uint64_t>(needs_.layout.total_bytes, 256), true);
      regions[r] = static_cast<uint8_t*>(b.region.get());
      for (int32_t i = 0; i < h.num_args; ++i) {
        b.args.push_back(device_alloc(device_, static_cast<size_t>(std::max<int64_t>(arg_bytes_[i], 1)), false));
        b.arg_ptrs.push_back(b.args.back().get());
      }
      for (int32_t j = 0; j < h.num_outputs; ++j) {
        const int32_t alias = out_alias[j];
        if (alias > 0 && alias <= h.num_args) {  // XLA passes the operand's buffer itself
          b.results.emplace_back(nullptr, DeviceFree{device_});
          b.result_ptrs.push_back(b.arg_ptrs[alias - 1]);
        } else {
          b.results.push_back(device_alloc(device_, static_cast<size_t>(std::max<int64_t>(out_bytes_[j], 1)), false));
          b.result_ptrs.push_back(b.results.back().get());
        }
      }
    }
    peers_ = device_alloc(device_, sizeof(uint8_t*) * regions.size(), false);
    copy_to_device(device_, peers_.get(), regions.data(), sizeof(uint8_t*) * regions.size());
    regions_ = regions;
  }

  const pf::Header& header() const { return pf::PlanView{words_.data()}.header(); }

  // Checks one call's operands (inputs[r][i]): a rank and byte count each, as the plan says.
  void check(const std::vector<std::vector<std::string>>& inputs, const std::string& what) const {
    const pf::Header& h = header();
    if (static_cast<int32_t>(inputs.size()) != n_)
      throw std::invalid_argument("persistent_group_run: " + what + " has inputs for " +
                                  std::to_string(inputs.size()) + " ranks, not " + std::to_string(n_));
    for (int32_t r = 0; r < n_; ++r) {
      if (static_cast<int32_t>(inputs[r].size()) != h.num_args)
        throw std::invalid_argument("persistent_group_run: " + what + ", rank " + std::to_string(r) + ": " +
                                    std::to_string(inputs[r].size()) + " operands, the plan takes " +
                                    std::to_string(h.num_args));
      for (int32_t i = 0; i < h.num_args; ++i)
        if (static_cast<int64_t>(inputs[r][i].size()) != arg_bytes_[i])
          throw std::invalid_argument("persistent_group_run: " + what + ", rank " + std::to_string(r) +
                                      ", operand " + std::to_string(i) + ": " +
                                      std::to_string(inputs[r][i].size()) + " bytes, the plan says " +
                                      std::to_string(arg_bytes_[i]));
    }
  }

  // Copies one call's operands in, after checking them.
  void upload(const std::vector<std::vector<std::string>>& inputs, const std::string& what) {
    check(inputs, what);
    const pf::Header& h = header();
    for (int32_t r = 0; r < n_; ++r)
      for (int32_t i = 0; i < h.num_args; ++i)
        if (arg_bytes_[i] > 0)
          copy_to_device(device_, ranks_[r].arg_ptrs[i], inputs[r][i].data(), inputs[r][i].size());
  }

  // Every rank's part of the call with epoch `epoch` (>= 1).
  std::vector<PersistentLaunchArgs> call(uint64_t epoch, int64_t timeout_ms, int64_t chaos_seed) {
    const pf::Header& h = header();
    std::vector<PersistentLaunchArgs> launch(static_cast<size_t>(n_));
    for (int32_t r = 0; r < n_; ++r) {
      RankBuffers& b = ranks_[r];
      PersistentLaunchArgs& a = launch[r];
      a.plan = static_cast<const int32_t*>(b.plan.get());
      a.plan_words = static_cast<int64_t>(words_.size());
      a.args = b.arg_ptrs.data();
      a.num_args = h.num_args;
      a.results = b.result_ptrs.data();
      a.num_results = h.num_outputs;
      a.workspace = b.workspace.get();
      a.workspace_bytes = std::max<int64_t>(h.workspace_bytes, 1);
      a.counters = static_cast<int32_t*>(b.counters.get());
      a.num_workers = h.num_workers;
      a.num_tasks = h.num_tasks;
      a.timeout_ms = timeout_ms;
      a.chaos_seed = chaos_seed;
      if (needs_.group_size == 0) continue;  // no group: comm.n = 0
      a.comm.peers = static_cast<uint8_t* const*>(peers_.get());
      a.comm.local = regions_[r];
      a.comm.rank = r;
      a.comm.n = n_;
      a.comm.epoch = epoch;  // the same on every rank for the same call
      a.comm.inbox_bytes = needs_.inbox_bytes;
      a.comm.num_tasks = h.num_tasks;
      a.comm.signals_offset = needs_.layout.signals_offset;
      a.comm.inbox_offset = needs_.layout.inbox_offset;
    }
    return launch;
  }

  // Each rank's user outputs (bytes), after the stream finished.
  std::vector<std::vector<std::string>> download() const {
    const pf::Header& h = header();
    std::vector<std::vector<std::string>> out(static_cast<size_t>(n_));
    for (int32_t r = 0; r < n_; ++r)
      for (int32_t j = 0; j < h.num_outputs; ++j) {
        std::string bytes(static_cast<size_t>(std::max<int64_t>(out_bytes_[j], 0)), '\0');
        if (!bytes.empty())
          ARK_CUDA_THROW(cudaMemcpy(bytes.data(), ranks_[r].result_ptrs[j], bytes.size(), cudaMemcpyDeviceToHost));
        out[r].push_back(std::move(bytes));
      }
    return out;
  }

  // Enqueues `calls` on the stream, waits for it and raises the device's error record, if any.
  void run(const std::vector<std::vector<PersistentLaunchArgs>>& calls, int32_t skip_rank,
           cudaEvent_t start = nullptr, cudaEvent_t stop = nullptr) {
    if (std::string err = persistent_group_enqueue(stream_.get(), calls, skip_rank, start, stop); !err.empty())
      throw std::runtime_error(err);
    ARK_CUDA_THROW(cudaStreamSynchronize(stream_.get()));
    std::string failure;
    bool is_timeout = false;
    if (persistent_take_failure(&failure, &is_timeout)) throw std::runtime_error(failure);
  }

 private:
  std::vector<int32_t> words_;
  int32_t n_;
  int device_ = 0;
  PersistentCommNeeds needs_;
  std::vector<int64_t> arg_bytes_, out_bytes_;
  std::vector<RankBuffers> ranks_;
  std::vector<uint8_t*> regions_;
  DeviceBuffer peers_;
  HarnessStream stream_;
};

// Owns a CUDA event.
class HarnessEvent {
 public:
  HarnessEvent() { ARK_CUDA_THROW(cudaEventCreate(&event_)); }
  ~HarnessEvent() { cudaEventDestroy(event_); }
  HarnessEvent(const HarnessEvent&) = delete;
  HarnessEvent& operator=(const HarnessEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace

std::vector<std::vector<std::vector<std::string>>> persistent_group_run(
    const std::vector<int32_t>& plan_words, int32_t n_ranks,
    const std::vector<std::vector<std::vector<std::string>>>& calls, int64_t timeout_ms,
    int64_t chaos_seed, int32_t skip_rank) {
  Group group(plan_words, n_ranks);
  // Every call's inputs are checked before anything runs.
  for (size_t c = 0; c < calls.size(); ++c) group.check(calls[c], "call " + std::to_string(c));
  std::vector<std::vector<std::vector<std::string>>> outputs;
  for (size_t c = 0; c < calls.size(); ++c) {
    group.upload(calls[c], "call " + std::to_string(c));
    group.run({group.call(static_cast<uint64_t>(c) + 1, timeout_ms, chaos_seed)}, skip_rank);
    outputs.push_back(group.download());
  }
  return outputs;
}

double persistent_group_time(const std::vector<int32_t>& plan_words, int32_t n_ranks,
                             const std::vector<std::vector<std::string>>& inputs, int32_t iters,
                             int64_t timeout_ms) {
  if (iters < 1) throw std::invalid_argument("persistent_group_time: iters must be >= 1");
  Group group(plan_words, n_ranks);
  group.upload(inputs, "the inputs");
  group.run({group.call(1, timeout_ms, 0)}, -1);  // warm-up: module load, first-touch of buffers
  std::vector<std::vector<PersistentLaunchArgs>> calls;
  for (int32_t c = 0; c < iters; ++c) calls.push_back(group.call(static_cast<uint64_t>(c) + 2, timeout_ms, 0));
  HarnessEvent start, stop;
  group.run(calls, -1, start.get(), stop.get());
  float ms = 0.f;
  ARK_CUDA_THROW(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return 1000.0 * static_cast<double>(ms) / iters;
}

}  // namespace jax_ark::gpu
