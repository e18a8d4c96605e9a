// The work units of the CPU collectives (see host_collectives.hpp).
#include "host_collectives.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#define ARK_HAVE_STREAMING_STORES 1
#else
#define ARK_HAVE_STREAMING_STORES 0
#endif

namespace jax_ark::cpu {
namespace {

// Elements reduced per tile (n > kFoldWidth only, or several outputs): the float32 partial
// results (8 KiB) stay in L1 between passes, and an all-reduce copies each finished tile from L1
// to the other outputs.
constexpr size_t kTileElems = 2048;

// Inputs folded per pass while the running value stays in a register: each element is loaded
// once from every input and stored once. (Folding one input at a time through an L1 accumulator
// stores every element n times; at 8 x 4 MiB that made the kernel 3x slower than this, and
// slower than XLA's own loop.) 8 covers the usual group in one pass; larger groups take passes of
// 8 through the L1 tile.
constexpr int kFoldWidth = 8;

// Unit boundaries fall on cache lines so no two units write the same line of an output (false
// sharing would serialize the ranks on the line's ownership).
constexpr size_t kCacheLineBytes = 64;

// A unit should be big enough that claiming it (one atomic increment) is noise, and small enough
// that a thread the scheduler preempts mid-unit (time slices are ~4 ms with 8 ranks on 2 cores)
// does not hold up the whole group (at 8 x 16 MiB, 4 units per rank measured ~25% slower than
// lax.psum, 16 on par; noisy numbers from a shared 2-core machine).
constexpr size_t kMinUnitBytes = size_t{16} << 10;
constexpr size_t kUnitsPerRank = 16;

// Above this many bytes written by the whole group in one all-reduce, the copies of the result
// into outputs 1..n-1 use non-temporal (streaming) stores (the fold writes output 0 with plain
// stores; the copies read that tile from L1): the data cannot stay in cache anyway, and a normal
// store first reads the destination line (read-for-ownership), so streaming cuts memory traffic
// by a third (8 threads, 8 x 4 MiB: 1.8 ms vs 2.4 ms plain; 8 x 16 MiB: 8.2 vs 10.9 ms; 2-core
// EPYC). Smaller outputs use plain stores so the consumer finds them in cache. A reduce-scatter's
// single output is written by the fold itself, with plain stores.
constexpr size_t kStreamingThresholdBytes = size_t{16} << 20;

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// Copies `bytes` from an L1-resident tile to memory, streaming when asked (and possible).
void store_tile(void* dst, const void* src, size_t bytes, bool streaming) {
#if ARK_HAVE_STREAMING_STORES
  if (streaming) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    // Plain stores up to the first 16-byte boundary, streaming 16-byte stores, plain tail.
    const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, s, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes != 0) std::memcpy(dst, src, bytes);  // null pointers are legal for empty buffers
}

// How fold_pass applies a reduction: `step` folds one more value in, and kTracksNan says whether
// NaN is tracked apart from the running value. Float max/min must propagate NaN from any rank
// (MaxOp/MinOp do it in one expression, but that chain of selects does not vectorize when 8
// inputs are folded in registers: measured 4x slower than a plain max at 8 x 4 MiB). So here they
// fold a plain compare-select, which gives MaxOp/MinOp's result for every non-NaN input (the
// same select, so also the same signed zero), and OR a NaN flag per element; a flagged element
// becomes the canonical quiet NaN.
template <class Op, class Accum>
struct FoldStep {
  static constexpr bool kTracksNan = false;
  static Accum step(Accum a, Accum x) { return Op()(a, x); }
};
template <>
struct FoldStep<MaxOp, float> {
  static constexpr bool kTracksNan = true;
  static float step(float a, float x) { return a > x ? a : x; }
};
template <>
struct FoldStep<MinOp, float> {
  static constexpr bool kTracksNan = true;
  static float step(float a, float x) { return a < x ? a : x; }
};

// dst[i] = the left fold over x[0..K)[i], starting from acc[i] when kFromAcc (else from x[0][i]);
// D is the accumulator type (a partial result) or T (the final, rounded result). K is a constant,
// so the fold over inputs unrolls and the loop over i vectorizes.
template <class T, int K, bool kFromAcc, class D, class Op>
void fold_pass(const typename AccumTraits<T>::Accum* acc, const T* const* x, D* dst, size_t len,
               Op) {
  using Traits = AccumTraits<T>;
  using Accum = typename Traits::Accum;
  using Step = FoldStep<Op, Accum>;
  const T* xs[K];
  for (int j = 0; j < K; ++j) xs[j] = x[j];
  for (size_t i = 0; i < len; ++i) {
    Accum a = kFromAcc ? acc[i] : Traits::load(xs[0][i]);
    bool nan = Step::kTracksNan && a != a;  // a partial result carries its NaN as a NaN
    for (int j = kFromAcc ? 0 : 1; j < K; ++j) {
      const Accum v = Traits::load(xs[j][i]);
      a = Step::step(a, v);
      if constexpr (Step::kTracksNan) nan |= v != v;
    }
    if constexpr (Step::kTracksNan) {
      a = nan ? std::numeric_limits<Accum>::quiet_NaN() : a;
    }
    if constexpr (std::is_same_v<D, T>) {
      dst[i] = Traits::store(a);
    } else {
      dst[i] = a;
    }
  }
}

// fold_pass with the input count k (1..kFoldWidth) chosen at run time.
template <class T, bool kFromAcc, class D, class Op>
void fold_pass_k(int k, const typename AccumTraits<T>::Accum* acc, const T* const* x, D* dst,
                 size_t len, Op op) {
  switch (k) {
    case 1: return fold_pass<T, 1, kFromAcc>(acc, x, dst, len, op);
    case 2: return fold_pass<T, 2, kFromAcc>(acc, x, dst, len, op);
    case 3: return fold_pass<T, 3, kFromAcc>(acc, x, dst, len, op);
    case 4: return fold_pass<T, 4, kFromAcc>(acc, x, dst, len, op);
    case 5: return fold_pass<T, 5, kFromAcc>(acc, x, dst, len, op);
    case 6: return fold_pass<T, 6, kFromAcc>(acc, x, dst, len, op);
    case 7: return fold_pass<T, 7, kFromAcc>(acc, x, dst, len, op);
    default: return fold_pass<T, kFoldWidth, kFromAcc>(acc, x, dst, len, op);
  }
}

// For every output k in `outputs`: out[k][output_offset + begin, output_offset + end) = left fold
// over ranks j of in[j][input_offset + begin, input_offset + end).
template <class T, class Op>
void reduce_range(const void* const* inputs, size_t input_offset, void* const* outputs,
                  int num_outputs, size_t output_offset, int n, size_t begin, size_t end,
                  bool streaming, Op op) {
  using Accum = typename AccumTraits<T>::Accum;
  Accum acc[kTileElems];  // partial results between passes (n > kFoldWidth)
  const T* x[kFoldWidth];
  for (size_t tile = begin; tile < end; tile += kTileElems) {
    const size_t len = std::min(kTileElems, end - tile);
    // The first output gets plain stores: the other outputs copy the tile from there, in L1.
    T* const first = static_cast<T*>(outputs[0]) + output_offset + tile;
    // Rank order 0..n-1 is the documented reduction order: results are identical on every rank.
    for (int j0 = 0; j0 < n; j0 += kFoldWidth) {
      const int k = std::min(kFoldWidth, n - j0);
      for (int j = 0; j < k; ++j) {
        x[j] = static_cast<const T*>(inputs[j0 + j]) + input_offset + tile;
      }
      const bool last = j0 + k == n;
      if (j0 == 0 && last) {
        fold_pass_k<T, false>(k, nullptr, x, first, len, op);
      } else if (j0 == 0) {
        fold_pass<T, kFoldWidth, false>(nullptr, x, acc, len, op);
      } else if (last) {
        fold_pass_k<T, true>(k, acc, x, first, len, op);
      } else {
        fold_pass<T, kFoldWidth, true>(acc, x, acc, len, op);
      }
    }
    for (int o = 1; o < num_outputs; ++o) {
      store_tile(static_cast<T*>(outputs[o]) + output_offset + tile, first, len * sizeof(T),
                 streaming);
    }
  }
}

void reduce_unit(const CollectiveWork& work, const WorkPlan& plan, size_t unit,
                 const GroupBuffers& group) {
  dispatch_element_type(work.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_reduce_kind(work.reduce, [&](auto reducer) {
      if (work.op == CollectiveOp::kAllReduce) {
        const size_t begin = std::min(work.block_elems, unit * plan.unit_elems);
        const size_t end = std::min(work.block_elems, begin + plan.unit_elems);
        reduce_range<T>(group.inputs, 0, group.outputs, group.size, 0, group.size, begin, end,
                        plan.streaming, reducer);
      } else {
        // reduce_scatter: units are (destination rank, piece of its block).
        const size_t pieces = ceil_div(work.block_elems, plan.unit_elems);
        const size_t rank = unit / pieces;
        const size_t begin = std::min(work.block_elems, (unit % pieces) * plan.unit_elems);
        const size_t end = std::min(work.block_elems, begin + plan.unit_elems);
        void* const output[1] = {group.outputs[rank]};
        reduce_range<T>(group.inputs, work.block_elems * rank, output, 1, 0, group.size, begin,
                        end, plan.streaming, reducer);
      }
    });
  });
}

}  // namespace

WorkPlan plan_work(const CollectiveWork& work, int group_size) {
  const size_t n = static_cast<size_t>(group_size);
  const size_t elem = element_size(work.type);
  const size_t block_bytes = work.block_elems * elem;
  WorkPlan plan{};
  plan.streaming = false;
  switch (work.op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kReduceScatter: {
      // all_reduce spreads one array over the whole group; reduce_scatter has n blocks to make.
      const size_t spread = work.op == CollectiveOp::kAllReduce ? n * kUnitsPerRank : kUnitsPerRank;
      const size_t align = std::max<size_t>(1, kCacheLineBytes / elem);
      size_t unit = std::max(ceil_div(work.block_elems, spread), kMinUnitBytes / elem);
      plan.unit_elems = ceil_div(unit, align) * align;
      const size_t pieces = ceil_div(work.block_elems, plan.unit_elems);
      plan.num_units = work.op == CollectiveOp::kAllReduce ? pieces : pieces * n;
      plan.streaming =
          work.op == CollectiveOp::kAllReduce && block_bytes * n >= kStreamingThresholdBytes;
      break;
    }
    case CollectiveOp::kAllGather:
    case CollectiveOp::kAllToAll:
      plan.num_units = n * n;  // (destination, source) pairs; memcpy streams large copies itself
      break;
    case CollectiveOp::kPermute:
      plan.num_units = n;
      break;
  }
  return plan;
}

void run_rank_output(const CollectiveWork& work, const WorkPlan& plan, int rank,
                     const GroupBuffers& group) {
  const size_t n = static_cast<size_t>(group.size);
  const size_t r = static_cast<size_t>(rank);
  switch (work.op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kReduceScatter:
      dispatch_element_type(work.type, [&](auto tag) {
        using T = typename decltype(tag)::type;
        dispatch_reduce_kind(work.reduce, [&](auto reducer) {
          // all_reduce reduces the whole input, reduce_scatter this rank's block of it.
          const size_t offset = work.op == CollectiveOp::kAllReduce ? 0 : work.block_elems * r;
          void* const output[1] = {group.outputs[r]};
          reduce_range<T>(group.inputs, offset, output, 1, 0, group.size, 0, work.block_elems,
                          false, reducer);
        });
      });
      return;
    case CollectiveOp::kAllGather:
    case CollectiveOp::kAllToAll:
      for (size_t src = 0; src < n; ++src) run_work_unit(work, plan, r * n + src, group);
      return;
    case CollectiveOp::kPermute:
      run_work_unit(work, plan, r, group);
      return;
  }
}

void run_work_unit(const CollectiveWork& work, const WorkPlan& plan, size_t unit,
                   const GroupBuffers& group) {
  const size_t n = static_cast<size_t>(group.size);
  const size_t bytes = work.block_elems * element_size(work.type);
  switch (work.op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kReduceScatter:
      reduce_unit(work, plan, unit, group);
      return;
    case CollectiveOp::kAllGather: {
      // y_dst[src] = x_src
      const size_t dst = unit / n, src = unit % n;
      copy_bytes(static_cast<char*>(group.outputs[dst]) + bytes * src, group.inputs[src], bytes);
      return;
    }
    case CollectiveOp::kAllToAll: {
      // y_dst[src] = x_src[dst]
      const size_t dst = unit / n, src = unit % n;
      copy_bytes(static_cast<char*>(group.outputs[dst]) + bytes * src,
                 static_cast<const char*>(group.inputs[src]) + bytes * dst, bytes);
      return;
    }
    case CollectiveOp::kPermute: {
      const int64_t src = work.recv_from[unit];
      if (src < 0) {
        // All-zero bits are 0 in every supported dtype.
        if (bytes != 0) std::memset(group.outputs[unit], 0, bytes);
      } else {
        copy_bytes(group.outputs[unit], group.inputs[src], bytes);
      }
      return;
    }
  }
}

void finish_work(const WorkPlan& plan) {
#if ARK_HAVE_STREAMING_STORES
  // Streaming stores are weakly ordered: without a fence the release store that signals
  // departure could become visible before the data, and a peer could read a stale output.
  // (memcpy's own streaming paths fence themselves.)
  if (plan.streaming) _mm_sfence();
#endif
}

}  // namespace jax_ark::cpu
