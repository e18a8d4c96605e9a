// GPU-driven collectives: one kernel per call, enqueued on the caller's stream.
//
// Two protocols (docs/gpu_runtime.md):
//  * LL (per-peer message <= CommConfig::ll_bytes): every rank pushes 8-byte packets {4 data bytes,
//    ll_flag_of(epoch)} straight into slot [my rank] of every destination's LL area; readers poll
//    the packets, so data and "signal" arrive together. Block 0 also pushes one header packet to EVERY rank
//    (data or not) and polls the headers of every rank: each call thereby depends on every peer
//    having started it (needed by the buffer-reuse argument below, and for permute).
//  * chunked (larger): rounds of (put one piece per peer into its chunk area, release-signal a
//    per-(source, block) flag on every peer, acquire-wait for every peer's flag, consume). All-reduce
//    is a reduce-scatter phase followed by an all-gather phase through the same rounds.
//
// Buffer reuse, WHY it is safe without acks:
//  1. Across calls: call e uses scratch half (e & 1) (LL and chunked areas alike). A rank in call
//     e+2 writes half (e & 1) of peer p. It finished call e+1, which needed p's packets/flags of call
//     e+1, so p's call-e+1 kernel had started, so p's call-e kernel (same stream, earlier) had ended:
//     p is done reading half (e & 1). Every call of every op gives every rank a dependency on every
//     peer (LL headers; chunked flags are signalled to all peers each round, even with no data).
//  2. Within a chunked call: round g uses piece parity (g & 1) and flag value seq(e, g). Block b
//     writes peer p's parity ((g+1) & 1) in round g+1 only after it saw p's round-g flag for block
//     b, which p raised after consuming round g-1 (= same parity) in block b (program order +
//     __syncthreads before the signal).
//  3. Flags are monotonic (64-bit epoch in the high bits, round+1 in the low kRoundBits), waits use
//     >=, so stale values from older calls never satisfy a newer wait and flags are never reset.
//     LL packets are compared for equality with ll_flag_of(epoch); the half they live in only holds
//     flags of epochs e-2, e-4..., or 0 (never written).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_ark/gpu/communicator.hpp"
#include "jax_ark/gpu/communicator_device.hpp"
#include "jax_ark/gpu/cooperative_launch.cuh"

namespace jax_ark::gpu {
namespace {

// ---- element types and reductions --------------------------------------------------------
// 16-bit floats are widened to float32 and rounded once at the end (contract: docs/internals.md).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  __device__ static Acc widen(float v) { return v; }
  __device__ static float narrow(Acc a) { return a; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  __device__ static Acc widen(__half v) { return __half2float(v); }
  __device__ static __half narrow(Acc a) { return __float2half_rn(a); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static Acc widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 narrow(Acc a) { return __float2bfloat16_rn(a); }
};
template <>
struct Elem<int32_t> {
  using Acc = int32_t;
  __device__ static Acc widen(int32_t v) { return v; }
  __device__ static int32_t narrow(Acc a) { return a; }
};

// max/min propagate NaN like lax.max/lax.min; integer sums wrap like XLA's.
template <int R>
__device__ __forceinline__ float combine(float a, float b) {
  if constexpr (R == kSum) return a + b;
  if constexpr (R == kMax) return (a != a || a > b) ? a : b;
  return (a != a || a < b) ? a : b;
}
template <int R>
__device__ __forceinline__ int32_t combine(int32_t a, int32_t b) {
  if constexpr (R == kSum)
    return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
  if constexpr (R == kMax) return a > b ? a : b;
  return a < b ? a : b;
}

template <typename T>
__device__ __forceinline__ T bits_to(uint32_t bits) {
  T v;
  if constexpr (sizeof(T) == 4) {
    memcpy(&v, &bits, 4);
  } else {
    const uint16_t b16 = static_cast<uint16_t>(bits);
    memcpy(&v, &b16, 2);
  }
  return v;
}
template <typename T>
__device__ __forceinline__ uint32_t to_bits(T v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
  } else {
    uint16_t b;
    memcpy(&b, &v, 2);
    return b;
  }
}

// Folds the elements packed in one 32-bit word from every rank, in rank order.
template <typename T, int R>
struct WordFold {
  static constexpr int kPer = 4 / static_cast<int>(sizeof(T));
  typename Elem<T>::Acc acc[kPer];
  __device__ void first(uint32_t word) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = Elem<T>::widen(bits_to<T>(word >> (16 * i)));
  }
  __device__ void next(uint32_t word) {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      acc[i] = combine<R>(acc[i], Elem<T>::widen(bits_to<T>(word >> (16 * i))));
  }
  __device__ uint32_t result() const {
    uint32_t out = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) out |= to_bits<T>(Elem<T>::narrow(acc[i])) << (16 * i);
    return out;
  }
};

// Block-wide copy; 16-byte vectors when both sides are aligned. Loads bypass L1 (`.cg`): the
// source may be scratch that peers rewrite between rounds.
__device__ void block_copy(uint8_t* dst, const uint8_t* src, uint64_t len) {
  uint64_t done = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    const uint64_t nvec = len / 16;
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (uint64_t i = threadIdx.x; i < nvec; i += blockDim.x) d[i] = __ldcg(s + i);
    done = nvec * 16;
  }
  for (uint64_t i = done + threadIdx.x; i < len; i += blockDim.x) dst[i] = __ldcg(src + i);
}

__device__ void block_zero(uint8_t* dst, uint64_t len) {
  for (uint64_t i = threadIdx.x; i < len; i += blockDim.x) dst[i] = 0;
}

// Stores one element with ONE store of its own width. Never memcpy a 16-bit float into a byte
// pointer: nvcc 13.0's ptxas (sm_80 and sm_90) turns `cvt.rn.{bf16,f16}.f32 %rs, %f` followed by
// `st.global.u8 [p], %rs` (the low byte of such a memcpy) into `F2I.U8.F16.TRUNC` - a float ->
// uint8 conversion of the value instead of its low byte. That wrote 0x00/0x01/0x02 over the low
// byte of every 16-bit all_reduce / reduce_scatter result that went through block_reduce's scalar
// tail (the H200 run of 2026-12-04). Elements are always aligned to their size here.
template <typename T>
__device__ __forceinline__ void store_elem(uint8_t* p, T v) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<unsigned int*>(p) = to_bits<T>(v);
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(to_bits<T>(v));
  }
}

template <typename T>
__device__ __forceinline__ T load_elem_cg(const uint8_t* p) {
  if constexpr (sizeof(T) == 4) {
    return bits_to<T>(__ldcg(reinterpret_cast<const unsigned int*>(p)));
  } else {
    return bits_to<T>(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
}

// Block-wide reduction of n same-sized pieces (src0 + j * stride) into dst, in rank order.
template <typename T, int R>
__device__ void block_reduce(uint8_t* dst, const uint8_t* src0, uint64_t stride, int n,
                             uint64_t len) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  uint64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {  // scratch pieces are always 16-aligned
    const uint64_t nvec = len / 16;
    for (uint64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      Acc acc[kVec];
      {
        const int4 v = __ldcg(reinterpret_cast<const int4*>(src0) + i);
        T e[kVec];
        memcpy(e, &v, 16);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = Elem<T>::widen(e[k]);
      }
      for (int j = 1; j < n; ++j) {
        const int4 v = __ldcg(reinterpret_cast<const int4*>(src0 + j * stride) + i);
        T e[kVec];
        memcpy(e, &v, 16);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = combine<R>(acc[k], Elem<T>::widen(e[k]));
      }
      T out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = Elem<T>::narrow(acc[k]);
      int4 o;
      memcpy(&o, out, 16);
      reinterpret_cast<int4*>(dst)[i] = o;
    }
    done = nvec * 16;
  }
  const uint64_t first = done / sizeof(T);
  const uint64_t count = len / sizeof(T);
  for (uint64_t i = first + threadIdx.x; i < count; i += blockDim.x) {
    Acc acc = Elem<T>::widen(load_elem_cg<T>(src0 + i * sizeof(T)));
    for (int j = 1; j < n; ++j)
      acc = combine<R>(acc, Elem<T>::widen(load_elem_cg<T>(src0 + j * stride + i * sizeof(T))));
    store_elem<T>(dst + i * sizeof(T), Elem<T>::narrow(acc));
  }
}

__device__ __forceinline__ uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
// Bytes of piece [off, off + piece) inside a message of `len` bytes.
__device__ __forceinline__ uint64_t piece_len(uint64_t len, uint64_t off, uint64_t piece) {
  return len > off ? min_u64(piece, len - off) : 0;
}

// ---- chunked protocol ----------------------------------------------------------------------
// Which block of its rank's grid this block is: the whole grid for a rank's own launch, a slice of
// it in the harness's group launch (rank = blockIdx.x / blocks_per_rank).
struct GridPos {
  uint32_t block;
  uint32_t blocks;
};

struct Round {
  uint32_t half;
  uint64_t epoch;
  uint32_t g = 0;  // round counter over the whole call (both all-reduce phases)
};

// Raises flag[me][block] = seq on every peer after the whole block's puts of this round: the
// barrier, then one release store per peer (signal_peer: no extra fence).
__device__ __forceinline__ void signal_all(const CommDevice& c, uint32_t block, uint64_t seq) {
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(c.n)) signal_peer(c, threadIdx.x, block, seq);
}

// Waits for flag[src][block] >= seq from every rank; false (on every thread) on failure.
__device__ __forceinline__ bool wait_all(const WaitContext& w, uint32_t block, uint64_t seq,
                                         int* s_failed) {
  if (threadIdx.x < static_cast<unsigned>(w.comm.n) &&
      !w.wait_flag(static_cast<int>(threadIdx.x), block, seq))
    *s_failed = 1;
  __syncthreads();
  return *s_failed == 0;
}

// One exchange phase: `rounds` rounds; in round k block b handles bytes [off, off + P) of every
// message, off = (k * blocks + b) * P. send(j) -> (pointer, length) of the message for rank j;
// consume(off, parity) reads what arrived.
template <typename SendFn, typename ConsumeFn>
__device__ bool run_phase(const WaitContext& w, const GridPos& g, Round& rd, uint64_t rounds,
                          SendFn send,
                          ConsumeFn consume, int* s_failed) {
  const CommDevice& c = w.comm;
  const uint64_t piece = c.piece_bytes;
  for (uint64_t k = 0; k < rounds; ++k, ++rd.g) {
    const uint64_t off = (k * g.blocks + g.block) * piece;
    const uint32_t parity = rd.g & 1u;
    for (int jj = 0; jj < c.n; ++jj) {
      const int j = (c.rank + jj) % c.n;  // staggered so ranks do not all hit one peer at once
      const uint8_t* src = nullptr;
      uint64_t len = 0;
      send(j, src, len);
      const uint64_t l = piece_len(len, off, piece);
      if (l > 0) block_copy(c.piece(c.peers[j], rd.half, parity, c.rank, g.block), src + off, l);
    }
    const uint64_t seq = round_seq(rd.epoch, rd.g);
    signal_all(c, g.block, seq);
    if (!wait_all(w, g.block, seq, s_failed)) return false;
    consume(off, parity);
  }
  return true;
}

template <typename T, int R>
__device__ bool chunked_call(const WaitContext& w, const GridPos& g, const CollectiveArgs& a,
                             const uint8_t* x, uint8_t* y, int* s_failed) {
  const CommDevice& c = w.comm;
  const int n = c.n;
  const int r = c.rank;
  const uint64_t m = a.block_bytes;
  const uint64_t piece = c.piece_bytes;
  const uint64_t per_round = piece * g.blocks;  // bytes of one message moved per round
  Round rd{static_cast<uint32_t>(w.epoch & 1u), w.epoch, 0};
  // My pieces of round parity p from every source: [src][block] layout, stride blocks * piece.
  const uint64_t src_stride = static_cast<uint64_t>(c.blocks) * piece;
  auto local_piece = [&](uint32_t parity, int src) {
    return c.piece(c.local, rd.half, parity, src, g.block);
  };

  if (a.op == kAllReduce) {
    // Shards of whole 16-byte vectors so every shard (and piece) starts 16-byte aligned.
    const uint64_t es = sizeof(T);
    const uint64_t count = m / es;
    const uint64_t vec = 16 / es;
    const uint64_t shard = ((count + n - 1) / n + vec - 1) / vec * vec;
    auto shard_off = [&](int j) { return min_u64(count, j * shard) * es; };
    auto shard_len = [&](int j) { return min_u64(count, (j + 1) * shard) * es - shard_off(j); };
    const uint64_t rounds = (shard_len(0) + per_round - 1) / per_round;
    // Phase 1, reduce-scatter: rank j receives shard j of everyone and reduces it into y.
    const bool ok = run_phase(
        w, g, rd, rounds,
        [&](int j, const uint8_t*& src, uint64_t& len) {
          src = x + shard_off(j);
          len = shard_len(j);
        },
        [&](uint64_t off, uint32_t parity) {
          const uint64_t l = piece_len(shard_len(r), off, piece);
          if (l > 0)
            block_reduce<T, R>(y + shard_off(r) + off, local_piece(parity, 0), src_stride, n, l);
        },
        s_failed);
    if (!ok) return false;
    // Phase 2, all-gather of the reduced shards (block b re-reads only what block b wrote).
    // Block b wrote its reduced pieces of y with block_reduce's thread mapping and now reads them
    // with block_copy's (the tails differ: per element vs per byte). With one round per phase
    // nothing else separates the last reduce from the first put: the barrier makes every
    // thread's y writes visible to the whole block before any thread sends them.
    __syncthreads();
    return run_phase(
        w, g, rd, rounds,
        [&](int j, const uint8_t*& src, uint64_t& len) {
          src = y + shard_off(r);
          len = j == r ? 0 : shard_len(r);  // my own shard is already in place
        },
        [&](uint64_t off, uint32_t parity) {
          for (int j = 0; j < n; ++j) {
            if (j == r) continue;
            const uint64_t l = piece_len(shard_len(j), off, piece);
            if (l > 0) block_copy(y + shard_off(j) + off, local_piece(parity, j), l);
          }
        },
        s_failed);
  }

  const uint64_t rounds = (m + per_round - 1) / per_round;
  switch (a.op) {
    case kReduceScatter:
      return run_phase(
          w, g, rd, rounds,
          [&](int j, const uint8_t*& src, uint64_t& len) {
            src = x + j * m;
            len = m;
          },
          [&](uint64_t off, uint32_t parity) {
            const uint64_t l = piece_len(m, off, piece);
            if (l > 0) block_reduce<T, R>(y + off, local_piece(parity, 0), src_stride, n, l);
          },
          s_failed);
    case kPermute:
      return run_phase(
          w, g, rd, rounds,
          [&](int j, const uint8_t*& src, uint64_t& len) {
            src = x;
            len = (a.send_to[r] == j) ? m : 0;
          },
          [&](uint64_t off, uint32_t parity) {
            const int from = a.recv_from[r];
            const uint64_t l = piece_len(m, off, piece);
            if (l == 0) return;
            if (from >= 0) block_copy(y + off, local_piece(parity, from), l);
            else block_zero(y + off, l);
          },
          s_failed);
    default: {  // all_gather, all_to_all
      const bool per_peer_block = a.op == kAllToAll;
      return run_phase(
          w, g, rd, rounds,
          [&](int j, const uint8_t*& src, uint64_t& len) {
            src = per_peer_block ? x + j * m : x;
            len = m;
          },
          [&](uint64_t off, uint32_t parity) {
            const uint64_t l = piece_len(m, off, piece);
            if (l == 0) return;
            for (int j = 0; j < n; ++j) block_copy(y + j * m + off, local_piece(parity, j), l);
          },
          s_failed);
    }
  }
}

// ---- the kernels ---------------------------------------------------------------------------
// One call of one rank, run by the `g.blocks` blocks of that rank.
template <typename T, int R>
__device__ __forceinline__ void collective_call(const CommDevice& comm, const CollectiveArgs& args,
                                                const void* x, void* y, const int32_t* rank_ptr,
                                                GridPos g, bool use_ll) {
  __shared__ uint64_t s_epoch;
  __shared__ int s_failed;
  __shared__ int s_poisoned;
  // Loaded early, checked at the end: the communicator already knows its rank (bootstrap), the
  // operand only guards against a mesh/rank mismatch, so it stays off the latency path.
  const int32_t rank_operand = rank_ptr != nullptr ? *rank_ptr : comm.rank;
  if (threadIdx.x == 0) {
    s_epoch = current_epoch(comm.control);
    s_failed = 0;
    s_poisoned = communicator_poisoned(comm.control) ? 1 : 0;
  }
  __syncthreads();
  const WaitContext wait = WaitContext::begin(comm, args.op, s_epoch, args.timeout_ns);
  const uint8_t* xb = static_cast<const uint8_t*>(x);
  uint8_t* yb = static_cast<uint8_t*>(y);

  bool ok = false;
  if (s_poisoned) {
    // An earlier call failed (its error record stays set): waiting for peers whose epochs are out
    // of step would only time out again. y is left as it is; jax_ark.check() reports the failure.
  } else if (use_ll) {
    const Lanes lanes{static_cast<uint64_t>(g.block) * blockDim.x + threadIdx.x,
                      static_cast<uint64_t>(g.blocks) * blockDim.x,
                      g.block == 0 ? static_cast<int32_t>(threadIdx.x) : -1,
                      static_cast<int32_t>(blockDim.x)};
    ok = ll_call<WordFold<T, R>>(wait, args, xb, yb, lanes);
  } else {
    ok = chunked_call<T, R>(wait, g, args, xb, yb, &s_failed);
  }
  (void)ok;  // failures are in the error record; the kernel still retires the call below
  if (g.block == 0 && threadIdx.x == 0 && rank_operand != comm.rank) wait.record_failure(-2);

  __syncthreads();
  if (threadIdx.x == 0) retire_block(comm.control, g.blocks, s_epoch);
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    collective_kernel(const __grid_constant__ CommDevice comm,
                      const __grid_constant__ CollectiveArgs args, int use_ll) {
  // __grid_constant__: the body takes references to both, which must not copy them to local memory.
  collective_call<T, R>(comm, args, args.x, args.y, args.rank_operand,
                        GridPos{blockIdx.x, gridDim.x}, use_ll != 0);
}

// Every rank of a single-GPU group in one cooperative launch: CUDA guarantees that all blocks of a
// cooperative grid are resident together, which N kernels on N streams do not (they may run one
// after the other, and then spin until the timeout).
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    collective_group_kernel(const __grid_constant__ GroupLaunch p, int use_ll) {
  const uint32_t rank = blockIdx.x / p.blocks_per_rank;
  if (static_cast<int32_t>(rank) == p.skip_rank) return;
  collective_call<T, R>(p.comm[rank], p.args, p.x[rank], p.y[rank], p.rank_operand[rank],
                        GridPos{blockIdx.x % p.blocks_per_rank, p.blocks_per_rank}, use_ll != 0);
}

// Blocks per rank of one call: as many as the LL packets need (LL has no per-block pairing
// between ranks), all of them for the chunked protocol.
bool use_ll_for(const CommDevice& comm, const CollectiveArgs& args, unsigned* grid) {
  const uint64_t ll_capacity = (static_cast<uint64_t>(comm.ll_slot_packets) - 1) * 4;
  const bool use_ll = args.block_bytes <= ll_capacity;
  *grid = static_cast<unsigned>(comm.blocks);
  if (use_ll) {
    const uint64_t items = static_cast<uint64_t>(comm.n) * ((args.block_bytes + 3) / 4);
    const uint64_t want = (items + kThreads - 1) / kThreads;
    *grid = static_cast<unsigned>(want < 1 ? 1 : (want > *grid ? *grid : want));
  }
  return use_ll;
}

// Launches `kernel<T, R>` for the call's dtype / reduction (non-reducing ops only move bytes: any
// instantiation does; they reuse the int32 sum one).
template <template <typename, int> class Launch, typename... A>
cudaError_t dispatch(const CollectiveArgs& args, A&&... a) {
  const bool reducing = args.op == kAllReduce || args.op == kReduceScatter;
  auto by_reduce = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (args.reduce) {
      case kMax: return Launch<T, kMax>::run(a...);
      case kMin: return Launch<T, kMin>::run(a...);
      default: return Launch<T, kSum>::run(a...);
    }
  };
  if (!reducing) return Launch<int32_t, kSum>::run(a...);
  switch (args.dtype) {
    case kF32: return by_reduce(float{});
    case kBF16: return by_reduce(__nv_bfloat16{});
    case kF16: return by_reduce(__half{});
    case kS32: return by_reduce(int32_t{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int R>
struct LaunchOne {
  static cudaError_t run(const CommDevice& comm, const CollectiveArgs& args, cudaStream_t stream,
                         bool use_ll, unsigned grid) {
    collective_kernel<T, R><<<grid, kThreads, 0, stream>>>(comm, args, use_ll ? 1 : 0);
    return cudaGetLastError();
  }
};

template <typename T, int R>
struct LaunchGroup {
  static cudaError_t run(const GroupLaunch& p, cudaStream_t stream, bool use_ll, unsigned grid) {
    return launch_cooperative(collective_group_kernel<T, R>, grid, kThreads, 0, stream, p,
                              use_ll ? 1 : 0);
  }
};

template <typename T, int R>
cudaError_t preload_one() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, collective_kernel<T, R>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, collective_group_kernel<T, R>);
  return err;
}

template <typename T>
cudaError_t preload_type() {
  cudaError_t err = preload_one<T, kSum>();
  if (err == cudaSuccess) err = preload_one<T, kMax>();
  if (err == cudaSuccess) err = preload_one<T, kMin>();
  return err;
}

}  // namespace

cudaError_t launch_collective(const CommDevice& comm, const CollectiveArgs& args,
                              cudaStream_t stream) {
  unsigned grid = 0;
  const bool use_ll = use_ll_for(comm, args, &grid);
  return dispatch<LaunchOne>(args, comm, args, stream, use_ll, grid);
}

cudaError_t launch_collective_group(const GroupLaunch& group, cudaStream_t stream,
                                    unsigned* blocks_per_rank) {
  if (group.n < 1 || group.n > kMaxGroupRanks) return cudaErrorInvalidValue;
  unsigned grid = 0;
  const bool use_ll = use_ll_for(group.comm[0], group.args, &grid);
  GroupLaunch p = group;
  p.blocks_per_rank = grid;
  if (blocks_per_rank != nullptr) *blocks_per_rank = grid;
  return dispatch<LaunchGroup>(p.args, p, stream, use_ll, grid * static_cast<unsigned>(p.n));
}

cudaError_t preload_kernels() {
  cudaError_t err = preload_type<float>();
  if (err == cudaSuccess) err = preload_type<__nv_bfloat16>();
  if (err == cudaSuccess) err = preload_type<__half>();
  if (err == cudaSuccess) err = preload_type<int32_t>();
  return err;
}

}  // namespace jax_ark::gpu
