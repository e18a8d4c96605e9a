// One rank's share of each collective on the CPU backend (see host_collectives.hpp).
#include "host_collectives.hpp"

#include <algorithm>
#include <cstring>

namespace jax_ark::cpu {
namespace {

// Elements reduced per tile: the float32 accumulators (8 KiB) stay in L1 while the n inputs
// stream through once and the result is written n times, so each input byte is read once from
// memory and the accumulators never spill.
constexpr size_t kTileElems = 2048;

// Ranks split an all_reduce at multiples of a cache line so no two ranks write the same line of an
// output (false sharing would serialize them on the line's ownership).
constexpr size_t kCacheLineBytes = 64;

// out[k][begin, end) = left fold over ranks j of in[j][offset + begin, offset + end), for every
// output k in outs (all ranks' outputs for all_reduce, just this rank's for reduce_scatter).
template <class T, class Op>
void reduce_range(const void* const* inputs, size_t input_offset, void* const* outputs,
                  int num_outputs, size_t output_offset, int n, size_t begin, size_t end, Op op) {
  using Traits = AccumTraits<T>;
  using Accum = typename Traits::Accum;
  Accum acc[kTileElems];
  for (size_t tile = begin; tile < end; tile += kTileElems) {
    const size_t len = std::min(kTileElems, end - tile);
    const T* x0 = static_cast<const T*>(inputs[0]) + input_offset + tile;
    for (size_t i = 0; i < len; ++i) acc[i] = Traits::load(x0[i]);
    // Rank order 0..n-1 is the documented reduction order: results are identical on every rank.
    for (int j = 1; j < n; ++j) {
      const T* xj = static_cast<const T*>(inputs[j]) + input_offset + tile;
      for (size_t i = 0; i < len; ++i) acc[i] = op(acc[i], Traits::load(xj[i]));
    }
    for (int k = 0; k < num_outputs; ++k) {
      T* yk = static_cast<T*>(outputs[k]) + output_offset + tile;
      for (size_t i = 0; i < len; ++i) yk[i] = Traits::store(acc[i]);
    }
  }
}

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes != 0) std::memcpy(dst, src, bytes);  // null pointers are legal for empty buffers
}

template <class T, class Op>
void all_reduce_share(size_t count, int rank, const GroupBuffers& group, Op op) {
  const size_t n = static_cast<size_t>(group.size);
  const size_t align = std::max<size_t>(1, kCacheLineBytes / sizeof(T));
  size_t chunk = (count + n - 1) / n;
  chunk = (chunk + align - 1) / align * align;
  const size_t begin = std::min(count, chunk * static_cast<size_t>(rank));
  const size_t end = std::min(count, begin + chunk);
  reduce_range<T>(group.inputs, 0, group.outputs, group.size, 0, group.size, begin, end, op);
}

template <class T, class Op>
void reduce_scatter_share(size_t block, int rank, const GroupBuffers& group, Op op) {
  void* const own_output[1] = {group.outputs[rank]};
  reduce_range<T>(group.inputs, block * static_cast<size_t>(rank), own_output, 1, 0, group.size, 0,
                  block, op);
}

}  // namespace

void run_collective_share(CollectiveOp op, ReduceKind reduce, ElementType type, size_t block_elems,
                          int rank, const GroupBuffers& group, const int64_t* recv_from) {
  const size_t bytes = block_elems * element_size(type);
  char* const own_output = static_cast<char*>(group.outputs[rank]);
  switch (op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kReduceScatter:
      dispatch_element_type(type, [&](auto tag) {
        using T = typename decltype(tag)::type;
        dispatch_reduce_kind(reduce, [&](auto reducer) {
          if (op == CollectiveOp::kAllReduce) {
            all_reduce_share<T>(block_elems, rank, group, reducer);
          } else {
            reduce_scatter_share<T>(block_elems, rank, group, reducer);
          }
        });
      });
      return;
    case CollectiveOp::kAllGather:
      // y[j] = x of rank j: pull every peer's block into this rank's output.
      for (int j = 0; j < group.size; ++j)
        copy_bytes(own_output + bytes * j, group.inputs[j], bytes);
      return;
    case CollectiveOp::kAllToAll:
      // y[j] = x_j[r]: block r of every peer's input.
      for (int j = 0; j < group.size; ++j)
        copy_bytes(own_output + bytes * j, static_cast<const char*>(group.inputs[j]) + bytes * rank,
                   bytes);
      return;
    case CollectiveOp::kPermute: {
      const int64_t source = recv_from[rank];
      if (source < 0) {
        if (bytes != 0) std::memset(own_output, 0, bytes);  // all-zero bits are 0 in every dtype
      } else {
        copy_bytes(own_output, group.inputs[source], bytes);
      }
      return;
    }
  }
}

}  // namespace jax_ark::cpu
