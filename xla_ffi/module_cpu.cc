// nanobind module of the CPU backend: hands the registered FFI targets to Python as capsules.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../cuda/src/cpu/host_communicator.hpp"
#include "../cuda/src/cpu/persistent_fusion.hpp"
#include "jax_ark/plan_check.hpp"
#include "registry.h"

namespace nb = nanobind;

NB_MODULE(_ark_cpu, m) {
  m.doc() = "jax_ark CPU reference backend (XLA FFI handlers on host threads)";
  m.def("registrations", []() {
    nb::dict out;
    for (const auto& target : jax_ark::ffi_registry::targets())
      out[target.name.c_str()] = nb::capsule(target.handler);
    return out;
  });
  m.def(
      "cancel_collectives",
      [](const std::string& reason) { jax_ark::cpu::HostCommunicator::cancel_all(reason); },
      nb::arg("reason"),
      "Makes every CPU collective waiting now or started later fail at once (process exit).");
  // The runtime's check of a binary plan (plan_check.hpp), for executors whose plan words live
  // where the handler cannot read them without a device sync (the GPU): run on the exact words
  // before they become the call's operand, through the same cache as the CPU handler (an eager
  // call checks its plan on every call).
  m.def(
      "check_plan",
      [](nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> words,
         std::vector<int64_t> arg_bytes, std::vector<int32_t> arg_dtypes,
         std::vector<int64_t> result_bytes, std::vector<int32_t> result_dtypes,
         std::vector<int32_t> result_alias, int64_t workspace_bytes, int64_t num_counters) {
        jax_ark::plan::PlanBuffers buffers;
        buffers.arg_bytes = std::move(arg_bytes);
        buffers.arg_dtypes = std::move(arg_dtypes);
        buffers.result_bytes = std::move(result_bytes);
        buffers.result_dtypes = std::move(result_dtypes);
        buffers.result_alias = std::move(result_alias);
        buffers.workspace_bytes = workspace_bytes;
        buffers.num_counters = num_counters;
        // The checker wants 8-byte aligned words (int64 fields); numpy gives no such promise.
        std::vector<int64_t> aligned((words.shape(0) + 1) / 2);
        std::memcpy(aligned.data(), words.data(), words.shape(0) * sizeof(int32_t));
        nb::gil_scoped_release release;
        return jax_ark::plan::checked_plans().check(
            reinterpret_cast<const int32_t*>(aligned.data()), static_cast<int64_t>(words.shape(0)),
            buffers);
      },
      nb::arg("words"), nb::arg("arg_bytes"), nb::arg("arg_dtypes"), nb::arg("result_bytes"),
      nb::arg("result_dtypes"), nb::arg("result_alias"), nb::arg("workspace_bytes"),
      nb::arg("num_counters"),
      "'' when the plan words can run safely against buffers of these sizes and dtype codes, else "
      "what is wrong.");
  // Tests: which instruction sequences the CPU executor fuses (persistent_fusion.hpp).
  m.def(
      "_gelu_tanh_starts",
      [](nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> words) {
        std::vector<int64_t> aligned((words.shape(0) + 1) / 2);  // as check_plan: 8-byte aligned
        std::memcpy(aligned.data(), words.data(), words.shape(0) * sizeof(int32_t));
        return jax_ark::cpu::gelu_tanh_starts(
            jax_ark::plan::PlanView{reinterpret_cast<const int32_t*>(aligned.data())});
      },
      nb::arg("words"),
      "Absolute instruction indices where the CPU executor evaluates jax.nn.gelu's tanh form in "
      "one pass; the words must be a plan check_plan accepted.");
}
