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
  if (h.magic != pf::kMagic || h.total_words != num_words || h.version < 3)
    return "not a plan of version >= 3 (bad magic, length or version)";
  if (h.group_size < 1 || h.group_size > kPersistentMaxGroup)
    return "the plan's communication group has " + std::to_string(h.group_size) +
           " ranks; the CUDA executor takes 1.." + std::to_string(kPersistentMaxGroup);
  int64_t inbox_end = 0;
  std::vector<bool> is_inbox(static_cast<size_t>(std::max(h.num_tensors, 0)), false);
  for (int i = 0; i < h.num_ops; ++i) {
    const pf::OpRecord& op = plan.op(i);
    if (op.kind != pf::kOpPut) continue;
    if (op.out_tensor < 0 || op.out_tensor >= h.num_tensors) return "a put op's inbox is out of range";
    const pf::TensorRecord& t = plan.tensor(op.out_tensor);
    if (t.storage != pf::kStorageWorkspace) return "a put op's inbox is not in the workspace";
    is_inbox[op.out_tensor] = true;
    inbox_end = std::max(inbox_end, t.byte_offset + tensor_bytes(t));
  }
  for (int i = 0; i < h.num_tensors; ++i) {
    const pf::TensorRecord& t = plan.tensor(i);
    if (t.storage != pf::kStorageWorkspace || is_inbox[i] || t.num_elements == 0) continue;
    if (t.byte_offset < inbox_end)
      return "workspace tensor " + std::to_string(i) + " lies below the end of the inboxes (byte " +
             std::to_string(inbox_end) +
             "): the CUDA executor keeps those bytes in the group's symmetric region, so the "
             "planner must place every inbox first (re-plan with this jax_ark)";
  }
  out->group_size = h.group_size;
  out->inbox_bytes = inbox_end;
  out->layout = PersistentSymLayout::of(h.num_tasks, h.group_size, inbox_end);
  return {};
}

std::vector<std::vector<std::vector<std::string>>> persistent_group_run(
    const std::vector<int32_t>& plan_words, int32_t n_ranks,
    const std::vector<std::vector<std::vector<std::string>>>& calls, int64_t timeout_ms,
    int64_t chaos_seed, int32_t skip_rank) {
  PersistentCommNeeds needs;
  if (std::string err = persistent_comm_needs(plan_words.data(), static_cast<int64_t>(plan_words.size()), &needs);
      !err.empty())
    throw std::invalid_argument("persistent_group_run: " + err);
  if (n_ranks != needs.group_size)
    throw std::invalid_argument("persistent_group_run: the plan is for " + std::to_string(needs.group_size) +
                                " ranks, got " + std::to_string(n_ranks));
  const pf::PlanView plan{plan_words.data()};
  const pf::Header& h = plan.header();
  std::vector<int64_t> arg_bytes(static_cast<size_t>(h.num_args), -1), out_bytes(static_cast<size_t>(h.num_outputs), -1);
  std::vector<int32_t> out_alias(static_cast<size_t>(h.num_outputs), 0);
  for (int i = 0; i < h.num_tensors; ++i) {
    const pf::TensorRecord& t = plan.tensor(i);
    if (t.storage == pf::kStorageArg && t.storage_index >= 0 && t.storage_index < h.num_args)
      arg_bytes[t.storage_index] = tensor_bytes(t);
    if (t.storage == pf::kStorageResult && t.storage_index >= 0 && t.storage_index < h.num_outputs) {
      out_bytes[t.storage_index] = tensor_bytes(t);
      out_alias[t.storage_index] = t.alias_plus1;
    }
  }
  for (size_t c = 0; c < calls.size(); ++c) {
    if (static_cast<int32_t>(calls[c].size()) != n_ranks)
      throw std::invalid_argument("persistent_group_run: call " + std::to_string(c) + " has inputs for " +
                                  std::to_string(calls[c].size()) + " ranks, not " + std::to_string(n_ranks));
    for (int32_t r = 0; r < n_ranks; ++r) {
      if (static_cast<int32_t>(calls[c][r].size()) != h.num_args)
        throw std::invalid_argument("persistent_group_run: call " + std::to_string(c) + ", rank " +
                                    std::to_string(r) + ": " + std::to_string(calls[c][r].size()) +
                                    " operands, the plan takes " + std::to_string(h.num_args));
      for (int32_t i = 0; i < h.num_args; ++i)
        if (static_cast<int64_t>(calls[c][r][i].size()) != arg_bytes[i])
          throw std::invalid_argument("persistent_group_run: call " + std::to_string(c) + ", rank " +
                                      std::to_string(r) + ", operand " + std::to_string(i) + ": " +
                                      std::to_string(calls[c][r][i].size()) + " bytes, the plan says " +
                                      std::to_string(arg_bytes[i]));
    }
  }

  int device = 0;
  ARK_CUDA_THROW(cudaGetDevice(&device));
  HarnessStream stream;
  const size_t plan_bytes = plan_words.size() * sizeof(int32_t);
  std::vector<RankBuffers> ranks(static_cast<size_t>(n_ranks));
  std::vector<uint8_t*> regions(static_cast<size_t>(n_ranks));
  for (int32_t r = 0; r < n_ranks; ++r) {
    RankBuffers& b = ranks[r];
    b.plan = device_alloc(device, plan_bytes, false);
    copy_to_device(device, b.plan.get(), plan_words.data(), plan_bytes);
    b.workspace = device_alloc(device, static_cast<size_t>(std::max<int64_t>(h.workspace_bytes, 1)), false);
    b.counters = device_alloc(device, sizeof(int32_t) * static_cast<size_t>(std::max(h.num_counters, 1)), true);
    b.region = device_alloc(device, needs.layout.total_bytes, true);  // signals and entry start at 0
    regions[r] = static_cast<uint8_t*>(b.region.get());
    for (int32_t i = 0; i < h.num_args; ++i) {
      b.args.push_back(device_alloc(device, static_cast<size_t>(std::max<int64_t>(arg_bytes[i], 1)), false));
      b.arg_ptrs.push_back(b.args.back().get());
    }
    for (int32_t j = 0; j < h.num_outputs; ++j) {
      const int32_t alias = out_alias[j];
      if (alias > 0 && alias <= h.num_args) {  // XLA passes the operand's buffer itself
        b.results.emplace_back(nullptr, DeviceFree{device});
        b.result_ptrs.push_back(b.arg_ptrs[alias - 1]);
      } else {
        b.results.push_back(device_alloc(device, static_cast<size_t>(std::max<int64_t>(out_bytes[j], 1)), false));
        b.result_ptrs.push_back(b.results.back().get());
      }
    }
  }
  DeviceBuffer peers = device_alloc(device, sizeof(uint8_t*) * regions.size(), false);
  copy_to_device(device, peers.get(), regions.data(), sizeof(uint8_t*) * regions.size());

  std::vector<std::vector<std::vector<std::string>>> outputs(calls.size());
  for (size_t c = 0; c < calls.size(); ++c) {
    std::vector<PersistentLaunchArgs> launch(static_cast<size_t>(n_ranks));
    for (int32_t r = 0; r < n_ranks; ++r) {
      RankBuffers& b = ranks[r];
      for (int32_t i = 0; i < h.num_args; ++i)
        if (arg_bytes[i] > 0) copy_to_device(device, b.arg_ptrs[i], calls[c][r][i].data(), calls[c][r][i].size());
      PersistentLaunchArgs& a = launch[r];
      a.plan = static_cast<const int32_t*>(b.plan.get());
      a.plan_words = static_cast<int64_t>(plan_words.size());
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
      a.comm.peers = static_cast<uint8_t* const*>(peers.get());
      a.comm.local = regions[r];
      a.comm.rank = r;
      a.comm.n = n_ranks;
      a.comm.epoch = static_cast<uint64_t>(c) + 1;  // calls 1..C of this site, the same on every rank
      a.comm.inbox_bytes = needs.inbox_bytes;
      a.comm.num_tasks = h.num_tasks;
      a.comm.signals_offset = needs.layout.signals_offset;
      a.comm.inbox_offset = needs.layout.inbox_offset;
    }
    if (std::string err = persistent_group_enqueue(stream.get(), launch, skip_rank); !err.empty())
      throw std::runtime_error(err);
    ARK_CUDA_THROW(cudaStreamSynchronize(stream.get()));
    std::string failure;
    bool is_timeout = false;
    if (persistent_take_failure(&failure, &is_timeout)) throw std::runtime_error(failure);
    outputs[c].resize(static_cast<size_t>(n_ranks));
    for (int32_t r = 0; r < n_ranks; ++r)
      for (int32_t j = 0; j < h.num_outputs; ++j) {
        std::string bytes(static_cast<size_t>(std::max<int64_t>(out_bytes[j], 0)), '\0');
        if (!bytes.empty())
          ARK_CUDA_THROW(cudaMemcpy(bytes.data(), ranks[r].result_ptrs[j], bytes.size(), cudaMemcpyDeviceToHost));
        outputs[c][r].push_back(std::move(bytes));
      }
  }
  return outputs;
}

}  // namespace jax_ark::gpu
