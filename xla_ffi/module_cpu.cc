// nanobind module of the CPU backend: hands the registered FFI targets to Python as capsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "../cuda/src/cpu/host_communicator.hpp"
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
}
