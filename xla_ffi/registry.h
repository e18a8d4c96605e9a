// Self-registration of XLA FFI handlers.
//
// Each handler file registers its targets with JAX_ARK_REGISTER_TARGET at static-initialization
// time; the nanobind module of its backend hands the whole list to Python, which registers it
// with jax.ffi. Adding a handler therefore never touches a central list.
#pragma once

#include <string>
#include <vector>

namespace jax_ark::ffi_registry {

struct Target {
  std::string name;  // the custom-call target name, e.g. "ark_collective_cpu"
  void* handler;     // XLA_FFI_Handler*, as defined by XLA_FFI_DEFINE_HANDLER_SYMBOL
};

// One list per backend module (each module is its own shared object, so each sees its own list).
inline std::vector<Target>& targets() {
  static std::vector<Target> list;
  return list;
}

struct Registrar {
  Registrar(const char* name, void* handler) { targets().push_back({name, handler}); }
};

}  // namespace jax_ark::ffi_registry

#define JAX_ARK_CONCAT_INNER(a, b) a##b
#define JAX_ARK_CONCAT(a, b) JAX_ARK_CONCAT_INNER(a, b)
#define JAX_ARK_REGISTER_TARGET(name, handler_symbol)                                   \
  static ::jax_ark::ffi_registry::Registrar JAX_ARK_CONCAT(ark_registrar_, __LINE__)( \
      name, reinterpret_cast<void*>(handler_symbol))
