// nanobind module of the CUDA backend: FFI target capsules, communicator bootstrap (used by
// jax_ark/_cuda_collectives.py at lowering time), the error record, and the single-GPU harness.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "jax_ark/gpu/communicator.hpp"
#include "jax_ark/gpu/harness.hpp"
#include "jax_ark/gpu/persistent_launch.hpp"
#include "registry.h"

namespace nb = nanobind;
using namespace jax_ark::gpu;

namespace {

nb::bytes comm_create(int64_t comm_id, int device, int rank, int n_ranks, int blocks,
                      uint32_t piece_bytes, uint32_t ll_bytes, uint64_t extra_bytes) {
  CommConfig config;
  config.n_ranks = n_ranks;
  config.blocks = blocks;
  config.piece_bytes = piece_bytes;
  config.ll_bytes = ll_bytes;
  config.extra_bytes = extra_bytes;
  cudaIpcMemHandle_t handle;
  {
    // Allocation, zeroing and kernel preloading may block on the driver: other Python threads
    // (a host callback of a running XLA program among them) must not wait for them.
    nb::gil_scoped_release release;
    handle = Registry::instance().create(comm_id, device, rank, config).ipc_handle();
  }
  return nb::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

// peers[j] = (kind, device, ipc handle): kind "self", "local" (same process: direct pointer, peer
// access when the device differs) or "ipc" (another process: the handle is opened).
void comm_connect(int64_t comm_id, int device,
                  const std::vector<std::tuple<std::string, int, nb::bytes>>& peers) {
  RankState* state = Registry::instance().find(comm_id, device);
  if (state == nullptr)
    throw std::invalid_argument("jax_ark: comm_connect before comm_create on this device");
  std::vector<PeerLink> links(peers.size());
  for (size_t j = 0; j < peers.size(); ++j) {
    const auto& [kind, peer_device, handle] = peers[j];
    PeerLink& link = links[j];
    link.device = peer_device;
    if (kind == "self") {
      link.kind = PeerLink::kSelf;
      link.same_process_ptr = state->scratch();
    } else if (kind == "local") {
      RankState* peer = Registry::instance().find(comm_id, peer_device);
      if (peer == nullptr)
        throw std::invalid_argument("jax_ark: local peer on device " + std::to_string(peer_device) +
                                    " has no rank state for this communicator");
      link.kind = PeerLink::kSameProcess;
      link.same_process_ptr = peer->scratch();
    } else if (kind == "ipc") {
      if (handle.size() != sizeof(cudaIpcMemHandle_t))
        throw std::invalid_argument("jax_ark: malformed CUDA IPC handle");
      link.kind = PeerLink::kIpc;
      std::memcpy(&link.handle, handle.c_str(), sizeof(cudaIpcMemHandle_t));
    } else {
      throw std::invalid_argument("jax_ark: unknown peer kind " + kind);
    }
  }
  {
    nb::gil_scoped_release release;
    state->connect(links);
  }
}

nb::object last_error() {
  for (RankState* state : Registry::instance().all()) {
    const std::string message = state->describe_error();
    if (message.empty()) continue;
    const volatile ErrorRecord& r = state->error();
    nb::dict out;
    out["message"] = message;
    out["op"] = std::string(op_name(r.op));
    out["rank"] = static_cast<int>(r.rank);
    out["peer"] = static_cast<int>(r.peer);
    out["epoch"] = static_cast<uint64_t>(r.epoch);
    out["device"] = static_cast<int>(r.device);
    out["comm_id"] = static_cast<int64_t>(r.comm_id);
    return out;
  }
  return nb::none();
}

HarnessOptions options_of(int32_t blocks, uint32_t piece_bytes, uint32_t ll_bytes,
                          int64_t timeout_ms, int32_t skip_rank, int32_t iters,
                          int32_t input_sets = 1, bool all_outputs = false) {
  HarnessOptions o;
  o.input_sets = input_sets;
  o.all_outputs = all_outputs;
  o.blocks = blocks;
  o.piece_bytes = piece_bytes;
  o.ll_bytes = ll_bytes;
  o.timeout_ms = timeout_ms;
  o.skip_rank = skip_rank;
  o.iters = iters;
  return o;
}

}  // namespace

NB_MODULE(_ark_cuda, m) {
  m.doc() = "jax_ark CUDA runtime (XLA FFI handlers that enqueue GPU-driven kernels)";
  m.def("registrations", []() {
    nb::dict out;
    for (const auto& target : jax_ark::ffi_registry::targets())
      out[target.name.c_str()] = nb::capsule(target.handler);
    return out;
  });
  m.def("comm_create", &comm_create, nb::arg("comm_id"), nb::arg("device"), nb::arg("rank"),
        nb::arg("n_ranks"), nb::arg("blocks"), nb::arg("piece_bytes"), nb::arg("ll_bytes"),
        nb::arg("extra_bytes") = 0,
        "Allocates this device's rank state of a communicator (with extra_bytes of symmetric "
        "region for a persistent plan); returns its CUDA IPC handle.");
  m.def(
      "persistent_comm_needs",
      [](const nb::bytes& plan_words) {
        if (plan_words.size() % sizeof(int32_t) != 0)
          throw std::invalid_argument("persistent_comm_needs: plan_words is not int32 words");
        std::vector<int32_t> words(plan_words.size() / sizeof(int32_t));
        std::memcpy(words.data(), plan_words.c_str(), plan_words.size());
        PersistentCommNeeds needs;
        if (std::string err = persistent_comm_needs(words.data(), static_cast<int64_t>(words.size()), &needs);
            !err.empty())
          throw std::invalid_argument("jax_ark: " + err);
        return std::make_tuple(needs.group_size, needs.inbox_bytes, needs.layout.total_bytes);
      },
      nb::arg("plan_words"),
      "(group_size, inbox_bytes, region_bytes) of a plan with put tasks on a GPU.");
  m.def("comm_connect", &comm_connect, nb::arg("comm_id"), nb::arg("device"), nb::arg("peers"),
        "Opens every peer's scratch: peers[j] = (kind, device, handle), kind self/local/ipc.");
  m.def("has_comm", [](int64_t comm_id, int device) {
    RankState* s = Registry::instance().find(comm_id, device);
    return s != nullptr && s->connected();
  });
  m.def("last_error", &last_error,
        "The first failure recorded by a GPU collective of this process (dict), or None.");
  m.def(
      "persistent_take_failure",
      [](int device) -> nb::object {
        std::string message;
        bool failed = false;
        {
          nb::gil_scoped_release release;
          int previous = 0;
          ARK_CUDA_THROW(cudaGetDevice(&previous));
          if (previous != device) ARK_CUDA_THROW(cudaSetDevice(device));
          bool is_timeout = false;
          failed = persistent_take_failure(&message, &is_timeout);
          if (previous != device) ARK_CUDA_THROW(cudaSetDevice(previous));
        }
        if (!failed) return nb::none();
        return nb::str(message.c_str());
      },
      nb::arg("device"),
      "The failure the persistent kernel recorded on CUDA device `device` since the last look "
      "(its message; cleared by this call), or None. The handler reports it at the next call; calls "
      "replayed from a CUDA graph (JAX_ARK_CUDA_GRAPHS=1) run no handler, so jax_ark.check() asks.");
  m.def("device_sm_count", [](int device) {
    int sms = 0;
    ARK_CUDA_THROW(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  });
  m.def(
      "persistent_max_workers",
      [](int device) {
        int blocks = 0;
        if (std::string err = persistent_max_workers(device, &blocks); !err.empty())
          throw std::runtime_error(err);
        return blocks;
      },
      nb::arg("device"),
      "Blocks of the persistent kernel CUDA device `device` keeps resident at once (max workers).");
  m.def(
      "harness_run",
      [](int32_t op, int32_t reduce, int32_t dtype, int32_t n_ranks,
         const std::vector<nb::bytes>& inputs, const std::vector<int32_t>& send_to,
         const std::vector<int32_t>& recv_from, int32_t iters, int64_t timeout_ms, int32_t blocks,
         uint32_t piece_bytes, uint32_t ll_bytes, int32_t skip_rank, int32_t input_sets,
         bool all_outputs) {
        std::vector<std::string> in;
        for (const auto& b : inputs) in.emplace_back(b.c_str(), b.size());
        std::vector<std::string> out;
        {
          nb::gil_scoped_release release;
          out = harness_run(op, reduce, dtype, n_ranks, in, send_to, recv_from,
                            options_of(blocks, piece_bytes, ll_bytes, timeout_ms, skip_rank, iters,
                                       input_sets, all_outputs));
        }
        std::vector<nb::bytes> result;
        for (const auto& o : out) result.emplace_back(o.data(), o.size());
        return result;
      },
      nb::arg("op"), nb::arg("reduce"), nb::arg("dtype"), nb::arg("n_ranks"), nb::arg("inputs"),
      nb::arg("send_to"), nb::arg("recv_from"), nb::arg("iters") = 1,
      nb::arg("timeout_ms") = 10000, nb::arg("blocks") = 0, nb::arg("piece_bytes") = 32768,
      nb::arg("ll_bytes") = 65536, nb::arg("skip_rank") = -1, nb::arg("input_sets") = 1,
      nb::arg("all_outputs") = false,
      "Runs n ranks of one collective as concurrent streams on the current GPU (raw bytes in/out).");
  m.def(
      "harness_time",
      [](int32_t op, int32_t reduce, int32_t dtype, int32_t n_ranks, uint64_t nbytes, int32_t iters,
         bool graph, int64_t timeout_ms, int32_t blocks, uint32_t piece_bytes, uint32_t ll_bytes) {
        nb::gil_scoped_release release;
        return harness_time(op, reduce, dtype, n_ranks, nbytes, iters, graph,
                            options_of(blocks, piece_bytes, ll_bytes, timeout_ms, -1, 1));
      },
      nb::arg("op"), nb::arg("reduce"), nb::arg("dtype"), nb::arg("n_ranks"), nb::arg("nbytes"),
      nb::arg("iters"), nb::arg("graph") = true, nb::arg("timeout_ms") = 10000,
      nb::arg("blocks") = 0, nb::arg("piece_bytes") = 32768, nb::arg("ll_bytes") = 65536,
      "Microseconds per call (nbytes = x bytes per rank), timed with cudaEvents.");
  m.def(
      "copy_bandwidth",
      [](uint64_t nbytes, int32_t iters) {
        nb::gil_scoped_release release;
        return copy_bandwidth(nbytes, iters);
      },
      nb::arg("nbytes"), nb::arg("iters") = 20,
      "Device-to-device cudaMemcpyAsync bandwidth in GB/s (bytes read + bytes written).");
  m.def(
      "persistent_group_run",
      [](const nb::bytes& plan_words, int32_t n_ranks,
         const std::vector<std::vector<std::vector<nb::bytes>>>& inputs, int64_t timeout_ms,
         int64_t chaos_seed, int32_t skip_rank) {
        if (plan_words.size() % sizeof(int32_t) != 0)
          throw std::invalid_argument("persistent_group_run: plan_words is not int32 words");
        std::vector<int32_t> words(plan_words.size() / sizeof(int32_t));
        std::memcpy(words.data(), plan_words.c_str(), plan_words.size());
        std::vector<std::vector<std::vector<std::string>>> calls(inputs.size());
        for (size_t c = 0; c < inputs.size(); ++c)
          for (const auto& rank : inputs[c]) {
            calls[c].emplace_back();
            for (const auto& b : rank) calls[c].back().emplace_back(b.c_str(), b.size());
          }
        std::vector<std::vector<std::vector<std::string>>> out;
        {
          nb::gil_scoped_release release;
          out = persistent_group_run(words, n_ranks, calls, timeout_ms, chaos_seed, skip_rank);
        }
        std::vector<std::vector<std::vector<nb::bytes>>> result(out.size());
        for (size_t c = 0; c < out.size(); ++c)
          for (const auto& rank : out[c]) {
            result[c].emplace_back();
            for (const auto& b : rank) result[c].back().emplace_back(b.data(), b.size());
          }
        return result;
      },
      nb::arg("plan_words"), nb::arg("n_ranks"), nb::arg("inputs"), nb::arg("timeout_ms") = 10000,
      nb::arg("chaos_seed") = 0, nb::arg("skip_rank") = -1,
      "Back-to-back calls of a plan with put tasks on every rank of a group on the current GPU "
      "(one cooperative launch per call): inputs[call][rank][operand] bytes -> "
      "outputs[call][rank][output] bytes.");
  m.def(
      "persistent_group_time",
      [](const nb::bytes& plan_words, int32_t n_ranks, const std::vector<std::vector<nb::bytes>>& inputs,
         int32_t iters, int64_t timeout_ms) {
        if (plan_words.size() % sizeof(int32_t) != 0)
          throw std::invalid_argument("persistent_group_time: plan_words is not int32 words");
        std::vector<int32_t> words(plan_words.size() / sizeof(int32_t));
        std::memcpy(words.data(), plan_words.c_str(), plan_words.size());
        std::vector<std::vector<std::string>> in;
        for (const auto& rank : inputs) {
          in.emplace_back();
          for (const auto& b : rank) in.back().emplace_back(b.c_str(), b.size());
        }
        nb::gil_scoped_release release;
        return persistent_group_time(words, n_ranks, in, iters, timeout_ms);
      },
      nb::arg("plan_words"), nb::arg("n_ranks"), nb::arg("inputs"), nb::arg("iters") = 20,
      nb::arg("timeout_ms") = 10000,
      "Microseconds per call of back-to-back calls of a plan with put tasks on every rank of a "
      "group on the current GPU (inputs[rank][operand] bytes), timed with CUDA events.");
}
