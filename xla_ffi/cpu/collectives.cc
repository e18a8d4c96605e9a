// XLA FFI handler of the `ark_collective` target on the CPU platform.
//
// Decodes and checks the operands and attributes of the contract in docs/internals.md
// ("Collectives"), then hands the call to the HostCommunicator of its (group, site). Every check
// happens before the rendezvous, so a malformed call fails alone with InvalidArgument instead of
// leaving its peers waiting for a partner that will never show up correctly.
#include <cstdint>
#include <exception>
#include <optional>
#include <sstream>
#include <string>

#include "../../cuda/src/cpu/host_communicator.hpp"
#include "jax_ark/collective_types.hpp"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ark::cpu {
namespace {

// Far above any real group (a JAX mesh on one host), low enough that a garbage value cannot make
// the communicator allocate n*n scratch entries.
constexpr int64_t kMaxGroupSize = 4096;

std::optional<ElementType> to_element_type(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return ElementType::kF32;
    case ffi::DataType::BF16: return ElementType::kBF16;
    case ffi::DataType::F16: return ElementType::kF16;
    case ffi::DataType::S32: return ElementType::kS32;
    default: return std::nullopt;
  }
}

std::string dims_to_string(ffi::AnyBuffer::Dimensions dims) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

ffi::Error invalid(const char* op_name, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string("ark_collective ") + op_name + ": " + what);
}

// Reads an int32[] scalar operand (rank or color); nullopt (and `error` set) if malformed.
std::optional<int32_t> read_scalar(ffi::AnyBuffer buffer, const char* name, const char* op_name,
                                   ffi::Error& error) {
  if (buffer.element_type() != ffi::DataType::S32 || buffer.dimensions().size() != 0) {
    error = invalid(op_name, std::string("operand `") + name +
                                 "` must be an int32 scalar, got a " +
                                 std::to_string(buffer.dimensions().size()) +
                                 "-d array of XLA dtype " +
                                 std::to_string(static_cast<int>(buffer.element_type())));
    return std::nullopt;
  }
  return *static_cast<const int32_t*>(buffer.untyped_data());
}

// The result shape each op must have for input shape `in` (see the table in docs/internals.md),
// and the element count of a block S. Returns an error message, empty if the shapes fit.
std::string check_shapes(CollectiveOp op, int64_t n, ffi::AnyBuffer::Dimensions in,
                         ffi::AnyBuffer::Dimensions out, size_t* block_elems) {
  auto product = [](const int64_t* begin, const int64_t* end) {
    size_t p = 1;
    for (const int64_t* d = begin; d != end; ++d) p *= static_cast<size_t>(*d);
    return p;
  };
  auto equal = [](const int64_t* a, const int64_t* a_end, const int64_t* b, const int64_t* b_end) {
    if (a_end - a != b_end - b) return false;
    for (; a != a_end; ++a, ++b)
      if (*a != *b) return false;
    return true;
  };
  std::ostringstream expected;
  bool ok = false;
  switch (op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kPermute:
      ok = equal(in.begin(), in.end(), out.begin(), out.end());
      expected << "the result shape must equal x's shape";
      *block_elems = product(in.begin(), in.end());
      break;
    case CollectiveOp::kAllGather:
      ok = out.size() == in.size() + 1 && out[0] == n &&
           equal(in.begin(), in.end(), out.begin() + 1, out.end());
      expected << "the result shape must be (group_size, *x.shape) with group_size=" << n;
      *block_elems = product(in.begin(), in.end());
      break;
    case CollectiveOp::kReduceScatter:
      if (in.size() == 0 || in[0] != n) {
        return "x's leading dimension must equal group_size=" + std::to_string(n) +
               ", got x shape " + dims_to_string(in);
      }
      ok = equal(in.begin() + 1, in.end(), out.begin(), out.end());
      expected << "the result shape must be x.shape[1:]";
      *block_elems = product(in.begin() + 1, in.end());
      break;
    case CollectiveOp::kAllToAll:
      if (in.size() == 0 || in[0] != n) {
        return "x's leading dimension must equal group_size=" + std::to_string(n) +
               ", got x shape " + dims_to_string(in);
      }
      ok = equal(in.begin(), in.end(), out.begin(), out.end());
      expected << "the result shape must equal x's shape";
      *block_elems = product(in.begin() + 1, in.end());
      break;
  }
  if (ok) return {};
  expected << "; got x shape " << dims_to_string(in) << " and result shape " << dims_to_string(out);
  return expected.str();
}

// Checks the permute tables: length n, entries in [-1, n), and send_to/recv_from describing the
// same partial permutation (send_to[s] == d exactly when recv_from[d] == s).
std::string check_permutation(int64_t n, ffi::Span<const int64_t> send_to,
                              ffi::Span<const int64_t> recv_from) {
  if (static_cast<int64_t>(send_to.size()) != n || static_cast<int64_t>(recv_from.size()) != n) {
    return "permute needs send_to and recv_from of length group_size=" + std::to_string(n) +
           ", got " + std::to_string(send_to.size()) + " and " + std::to_string(recv_from.size());
  }
  for (int64_t i = 0; i < n; ++i) {
    if (send_to[i] < -1 || send_to[i] >= n || recv_from[i] < -1 || recv_from[i] >= n) {
      return "permute table entry out of range [-1, " + std::to_string(n) + ") at index " +
             std::to_string(i);
    }
  }
  for (int64_t src = 0; src < n; ++src) {
    const int64_t dst = send_to[src];
    if (dst >= 0 && recv_from[dst] != src) {
      return "send_to and recv_from disagree: send_to[" + std::to_string(src) + "] = " +
             std::to_string(dst) + " but recv_from[" + std::to_string(dst) + "] = " +
             std::to_string(recv_from[dst]);
    }
  }
  for (int64_t dst = 0; dst < n; ++dst) {
    const int64_t src = recv_from[dst];
    if (src >= 0 && send_to[src] != dst) {
      return "send_to and recv_from disagree: recv_from[" + std::to_string(dst) + "] = " +
             std::to_string(src) + " but send_to[" + std::to_string(src) + "] = " +
             std::to_string(send_to[src]);
    }
  }
  return {};
}

uint64_t hash_table(ffi::Span<const int64_t> table, uint64_t h) {
  for (int64_t v : table) h = (h ^ static_cast<uint64_t>(v)) * 0x100000001b3ULL;  // FNV-1a step
  return h;
}

ffi::Error collective_impl(ffi::RunId run_id, ffi::AnyBuffer x, ffi::AnyBuffer rank_buffer,
                           ffi::AnyBuffer color_buffer, ffi::Result<ffi::AnyBuffer> y, int32_t op,
                           int32_t reduce, int64_t group_size, int64_t comm_key,
                           int64_t timeout_ms, ffi::Span<const int64_t> send_to,
                           ffi::Span<const int64_t> recv_from, int64_t site) {
  if (op < 0 || op >= kNumCollectiveOps) {
    return ffi::Error::InvalidArgument("ark_collective: attribute `op` must be in [0, " +
                                       std::to_string(kNumCollectiveOps) + "), got " +
                                       std::to_string(op));
  }
  const auto coll_op = static_cast<CollectiveOp>(op);
  const char* op_name = collective_op_name(coll_op);
  if (op_reduces(coll_op) && (reduce < 0 || reduce >= kNumReduceKinds)) {
    return invalid(op_name, "attribute `reduce` must be 0 (sum), 1 (max) or 2 (min), got " +
                                std::to_string(reduce));
  }
  if (group_size < 1 || group_size > kMaxGroupSize) {
    return invalid(op_name, "attribute `group_size` must be in [1, " +
                                std::to_string(kMaxGroupSize) + "], got " +
                                std::to_string(group_size));
  }
  if (timeout_ms <= 0) {
    return invalid(op_name,
                   "attribute `timeout_ms` must be positive, got " + std::to_string(timeout_ms));
  }
  const std::optional<ElementType> type = to_element_type(x.element_type());
  if (!type) {
    return invalid(op_name, "unsupported dtype (XLA type " +
                                std::to_string(static_cast<int>(x.element_type())) +
                                "); supported: float32, bfloat16, float16, int32");
  }
  if (y->element_type() != x.element_type()) {
    return invalid(op_name, "the result dtype must equal x's dtype");
  }
  ffi::Error error;
  const std::optional<int32_t> rank = read_scalar(rank_buffer, "rank", op_name, error);
  if (!rank) return error;
  const std::optional<int32_t> color = read_scalar(color_buffer, "color", op_name, error);
  if (!color) return error;
  if (*rank < 0 || *rank >= group_size) {
    return invalid(op_name, "operand `rank` must be in [0, group_size=" +
                                std::to_string(group_size) + "), got " + std::to_string(*rank));
  }
  if (*color < 0) {
    return invalid(op_name, "operand `color` must be >= 0, got " + std::to_string(*color));
  }
  size_t block_elems = 0;
  const std::string shape_error =
      check_shapes(coll_op, group_size, x.dimensions(), y->dimensions(), &block_elems);
  if (!shape_error.empty()) return invalid(op_name, shape_error);

  uint64_t table_hash = 0;
  if (coll_op == CollectiveOp::kPermute) {
    const std::string table_error = check_permutation(group_size, send_to, recv_from);
    if (!table_error.empty()) return invalid(op_name, table_error);
    table_hash = hash_table(recv_from, hash_table(send_to, 0xcbf29ce484222325ULL));
  }

  CollectiveCall call{};
  call.op = coll_op;
  // Non-reducing ops ignore `reduce`; normalize it so it cannot make signatures differ.
  call.reduce = op_reduces(coll_op) ? static_cast<ReduceKind>(reduce) : ReduceKind::kSum;
  call.type = *type;
  call.input_elems = x.element_count();
  call.block_elems = block_elems;
  call.input = x.untyped_data();
  call.output = y->untyped_data();
  call.rank = *rank;
  call.run_id = run_id.run_id;
  call.timeout_ms = timeout_ms;
  call.recv_from = recv_from.begin();
  call.table_hash = table_hash;

  // Nothing below may throw across the C ABI; the only throwing operations are allocations
  // (first use of a group, error messages), reported as an error instead of terminating XLA.
  try {
    std::shared_ptr<HostCommunicator> comm = HostCommunicator::get(
        CommunicatorKey{comm_key, *color, static_cast<int32_t>(group_size), site});
    const CollectiveStatus status = comm->run(call);
    switch (status.code) {
      case CollectiveStatus::Code::kOk: return ffi::Error::Success();
      case CollectiveStatus::Code::kInvalidArgument:
        return ffi::Error(ffi::ErrorCode::kInvalidArgument, status.message);
      case CollectiveStatus::Code::kDeadlineExceeded:
        return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, status.message);
      case CollectiveStatus::Code::kAborted:
        return ffi::Error(ffi::ErrorCode::kAborted, status.message);
    }
    return ffi::Error::Internal("ark_collective: unknown status");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ark_collective ") + op_name + ": " + e.what());
  }
}

}  // namespace
}  // namespace jax_ark::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArkCollectiveCpu, jax_ark::cpu::collective_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // rank: int32[]
                                  .Arg<ffi::AnyBuffer>()  // color: int32[]
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int32_t>("op")
                                  .Attr<int32_t>("reduce")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("comm_key")
                                  .Attr<int64_t>("timeout_ms")
                                  .Attr<ffi::Span<const int64_t>>("send_to")
                                  .Attr<ffi::Span<const int64_t>>("recv_from")
                                  .Attr<int64_t>("site"));

JAX_ARK_REGISTER_TARGET("ark_collective", ArkCollectiveCpu);
