// nanobind module of the CUDA backend: hands the registered FFI targets to Python as capsules.
#include <nanobind/nanobind.h>

#include "registry.h"

namespace nb = nanobind;

NB_MODULE(_ark_cuda, m) {
  m.doc() = "jax_ark CUDA runtime (XLA FFI handlers that enqueue GPU-driven kernels)";
  m.def("registrations", []() {
    nb::dict out;
    for (const auto& target : jax_ark::ffi_registry::targets())
      out[target.name.c_str()] = nb::capsule(target.handler);
    return out;
  });
}
