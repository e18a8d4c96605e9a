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

// ---- byte helpers (tails and misaligned buffers) -------------------------------------------
// Reads 32-bit word `w` of an M-byte buffer; bytes past the end read as 0.
__device__ __forceinline__ uint32_t load_word(const uint8_t* p, uint64_t m, uint64_t w) {
  const uint64_t at = w * 4;
  if (at + 4 <= m && (reinterpret_cast<uintptr_t>(p + at) & 3) == 0)
    return *reinterpret_cast<const uint32_t*>(p + at);
  uint32_t v = 0;
  for (int i = 0; i < 4 && at + i < m; ++i) v |= static_cast<uint32_t>(p[at + i]) << (8 * i);
  return v;
}
__device__ __forceinline__ void store_word(uint8_t* p, uint64_t m, uint64_t w, uint32_t v) {
  const uint64_t at = w * 4;
  if (at + 4 <= m && (reinterpret_cast<uintptr_t>(p + at) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(p + at) = v;
    return;
  }
  for (int i = 0; i < 4 && at + i < m; ++i) p[at + i] = static_cast<uint8_t>(v >> (8 * i));
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
    const T out = Elem<T>::narrow(acc);
    memcpy(dst + i * sizeof(T), &out, sizeof(T));
  }
}

__device__ __forceinline__ uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
// Bytes of piece [off, off + piece) inside a message of `len` bytes.
__device__ __forceinline__ uint64_t piece_len(uint64_t len, uint64_t off, uint64_t piece) {
  return len > off ? min_u64(piece, len - off) : 0;
}

// ---- LL protocol ---------------------------------------------------------------------------
template <typename T, int R>
__device__ bool ll_call(const WaitContext& w, const CollectiveArgs& a) {
  const CommDevice& c = w.comm;
  const int n = c.n;
  const int r = c.rank;
  const uint32_t e = w.ll_flag;
  const uint32_t half = static_cast<uint32_t>(w.epoch & 1u);
  const uint64_t m = a.block_bytes;
  const uint64_t words = (m + 3) / 4;
  const uint8_t* x = static_cast<const uint8_t*>(a.x);
  uint8_t* y = static_cast<uint8_t*>(a.y);
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t nthreads = static_cast<uint64_t>(gridDim.x) * blockDim.x;

  // Send. Packet 0 of each slot is the arrival header, data packets follow.
  if (blockIdx.x == 0 && threadIdx.x < static_cast<unsigned>(n))
    store_packet(c.ll_slot(c.peers[threadIdx.x], half, r), 0u, e);
  if (a.op == kPermute) {
    const int dst = a.send_to[r];
    if (dst >= 0) {
      uint2* slot = c.ll_slot(c.peers[dst], half, r) + 1;
      for (uint64_t i = tid; i < words; i += nthreads) store_packet(slot + i, load_word(x, m, i), e);
    }
  } else {
    const bool per_peer_block = a.op == kReduceScatter || a.op == kAllToAll;
    for (uint64_t i = tid; i < n * words; i += nthreads) {
      const int j = static_cast<int>(i / words);
      const uint64_t wd = i % words;
      const uint8_t* src = per_peer_block ? x + j * m : x;
      store_packet(c.ll_slot(c.peers[j], half, r) + 1 + wd, load_word(src, m, wd), e);
    }
  }

  // Receive.
  bool ok = true;
  uint32_t data = 0;
  if (blockIdx.x == 0 && threadIdx.x < static_cast<unsigned>(n))
    ok = w.wait_packet(c.ll_slot(c.local, half, threadIdx.x), threadIdx.x, data);
  if (a.op == kAllReduce || a.op == kReduceScatter) {
    for (uint64_t i = tid; ok && i < words; i += nthreads) {
      WordFold<T, R> fold;
      for (int j = 0; ok && j < n; ++j) {
        ok = w.wait_packet(c.ll_slot(c.local, half, j) + 1 + i, j, data);
        if (j == 0) fold.first(data); else fold.next(data);
      }
      if (ok) store_word(y, m, i, fold.result());
    }
  } else if (a.op == kPermute) {
    const int src = a.recv_from[r];
    for (uint64_t i = tid; ok && i < words; i += nthreads) {
      if (src >= 0) ok = w.wait_packet(c.ll_slot(c.local, half, src) + 1 + i, src, data);
      if (ok) store_word(y, m, i, src >= 0 ? data : 0u);
    }
  } else {  // all_gather, all_to_all: y[j] = what rank j sent me
    for (uint64_t i = tid; ok && i < n * words; i += nthreads) {
      const int j = static_cast<int>(i / words);
      const uint64_t wd = i % words;
      ok = w.wait_packet(c.ll_slot(c.local, half, j) + 1 + wd, j, data);
      if (ok) store_word(y + j * m, m, wd, data);
    }
  }
  return ok;
}

// ---- chunked protocol ----------------------------------------------------------------------
struct Round {
  uint32_t half;
  uint64_t epoch;
  uint32_t g = 0;  // round counter over the whole call (both all-reduce phases)
};

// Raises flag[me][block] = seq on every peer after the whole block's puts of this round.
__device__ __forceinline__ void signal_all(const CommDevice& c, uint64_t seq) {
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(c.n)) {
    __threadfence_system();
    store_release_sys(c.flag(c.peers[threadIdx.x], c.rank, blockIdx.x), seq);
  }
}

// Waits for flag[src][block] >= seq from every rank; false (on every thread) on failure.
__device__ __forceinline__ bool wait_all(const WaitContext& w, uint64_t seq, int* s_failed) {
  if (threadIdx.x < static_cast<unsigned>(w.comm.n) &&
      !w.wait_flag(static_cast<int>(threadIdx.x), blockIdx.x, seq))
    *s_failed = 1;
  __syncthreads();
  return *s_failed == 0;
}

// g + 1 < 2^kRoundBits: validate_call bounds the rounds of a call (kMaxRoundsPerCall).
__device__ __forceinline__ uint64_t round_seq(uint64_t epoch, uint32_t g) {
  return (epoch << kRoundBits) | (static_cast<uint64_t>(g) + 1);
}

// One exchange phase: `rounds` rounds; in round k block b handles bytes [off, off + P) of every
// message, off = (k * blocks + b) * P. send(j) -> (pointer, length) of the message for rank j;
// consume(off, parity) reads what arrived.
template <typename SendFn, typename ConsumeFn>
__device__ bool run_phase(const WaitContext& w, Round& rd, uint64_t rounds, SendFn send,
                          ConsumeFn consume, int* s_failed) {
  const CommDevice& c = w.comm;
  const uint64_t piece = c.piece_bytes;
  for (uint64_t k = 0; k < rounds; ++k, ++rd.g) {
    const uint64_t off = (k * gridDim.x + blockIdx.x) * piece;
    const uint32_t parity = rd.g & 1u;
    for (int jj = 0; jj < c.n; ++jj) {
      const int j = (c.rank + jj) % c.n;  // staggered so ranks do not all hit one peer at once
      const uint8_t* src = nullptr;
      uint64_t len = 0;
      send(j, src, len);
      const uint64_t l = piece_len(len, off, piece);
      if (l > 0) block_copy(c.piece(c.peers[j], rd.half, parity, c.rank, blockIdx.x), src + off, l);
    }
    const uint64_t seq = round_seq(rd.epoch, rd.g);
    signal_all(c, seq);
    if (!wait_all(w, seq, s_failed)) return false;
    consume(off, parity);
  }
  return true;
}

template <typename T, int R>
__device__ bool chunked_call(const WaitContext& w, const CollectiveArgs& a, int* s_failed) {
  const CommDevice& c = w.comm;
  const int n = c.n;
  const int r = c.rank;
  const uint64_t m = a.block_bytes;
  const uint64_t piece = c.piece_bytes;
  const uint64_t per_round = piece * gridDim.x;  // bytes of one message moved per round
  const uint8_t* x = static_cast<const uint8_t*>(a.x);
  uint8_t* y = static_cast<uint8_t*>(a.y);
  Round rd{static_cast<uint32_t>(w.epoch & 1u), w.epoch, 0};
  // My pieces of round parity p from every source: [src][block] layout, stride blocks * piece.
  const uint64_t src_stride = static_cast<uint64_t>(c.blocks) * piece;
  auto local_piece = [&](uint32_t parity, int src) {
    return c.piece(c.local, rd.half, parity, src, blockIdx.x);
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
        w, rd, rounds,
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
        w, rd, rounds,
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
          w, rd, rounds,
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
          w, rd, rounds,
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
          w, rd, rounds,
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

// ---- the kernel ----------------------------------------------------------------------------
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    collective_kernel(CommDevice comm, CollectiveArgs args, int use_ll) {
  __shared__ uint64_t s_epoch;
  __shared__ int s_failed;
  // Loaded early, checked at the end: the communicator already knows its rank (bootstrap), the
  // operand only guards against a mesh/rank mismatch, so it stays off the latency path.
  const int32_t rank_operand = args.rank_operand != nullptr ? *args.rank_operand : comm.rank;
  if (threadIdx.x == 0) {
    s_epoch = *reinterpret_cast<volatile uint64_t*>(&comm.control->epoch);
    s_failed = 0;
  }
  __syncthreads();
  const uint64_t now = global_timer_ns();
  const WaitContext wait{comm, now, now + args.timeout_ns, args.op, s_epoch, ll_flag_of(s_epoch)};

  bool ok = use_ll ? ll_call<T, R>(wait, args) : chunked_call<T, R>(wait, args, &s_failed);
  (void)ok;  // failures are in the error record; the kernel still retires the call below
  if (blockIdx.x == 0 && threadIdx.x == 0 && rank_operand != comm.rank) wait.record_failure(-2);

  // The last block to finish advances the epoch. Every block read s_epoch before counting itself
  // done, so no block of this call can see the new value; the next call (a later kernel on the
  // same stream) does.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&comm.control->blocks_done, 1u) == gridDim.x - 1) {
      atomicExch(&comm.control->blocks_done, 0u);
      __threadfence();
      atomicExch(reinterpret_cast<unsigned long long*>(&comm.control->epoch),
                 static_cast<unsigned long long>(s_epoch + 1u));
    }
  }
}

template <typename T, int R>
cudaError_t launch_typed(const CommDevice& comm, const CollectiveArgs& args, cudaStream_t stream,
                         bool use_ll, unsigned grid) {
  collective_kernel<T, R><<<grid, kThreads, 0, stream>>>(comm, args, use_ll ? 1 : 0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reduce(const CommDevice& comm, const CollectiveArgs& args, cudaStream_t stream,
                          bool use_ll, unsigned grid) {
  switch (args.reduce) {
    case kMax: return launch_typed<T, kMax>(comm, args, stream, use_ll, grid);
    case kMin: return launch_typed<T, kMin>(comm, args, stream, use_ll, grid);
    default: return launch_typed<T, kSum>(comm, args, stream, use_ll, grid);
  }
}

template <typename T, int R>
cudaError_t preload_one() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, collective_kernel<T, R>);
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
  const uint64_t ll_capacity = (static_cast<uint64_t>(comm.ll_slot_packets) - 1) * 4;
  const bool use_ll = args.block_bytes <= ll_capacity;
  unsigned grid = static_cast<unsigned>(comm.blocks);
  if (use_ll) {
    // Only as many blocks as the packets need; LL has no per-block pairing between ranks.
    const uint64_t items = static_cast<uint64_t>(comm.n) * ((args.block_bytes + 3) / 4);
    const uint64_t want = (items + kThreads - 1) / kThreads;
    grid = static_cast<unsigned>(want < 1 ? 1 : (want > grid ? grid : want));
  }
  const bool reducing = args.op == kAllReduce || args.op == kReduceScatter;
  // Non-reducing ops only move bytes: any instantiation does; reuse the int32 sum one.
  if (!reducing) return launch_typed<int32_t, kSum>(comm, args, stream, use_ll, grid);
  switch (args.dtype) {
    case kF32: return launch_reduce<float>(comm, args, stream, use_ll, grid);
    case kBF16: return launch_reduce<__nv_bfloat16>(comm, args, stream, use_ll, grid);
    case kF16: return launch_reduce<__half>(comm, args, stream, use_ll, grid);
    case kS32: return launch_reduce<int32_t>(comm, args, stream, use_ll, grid);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t preload_kernels() {
  cudaError_t err = preload_type<float>();
  if (err == cudaSuccess) err = preload_type<__nv_bfloat16>();
  if (err == cudaSuccess) err = preload_type<__half>();
  if (err == cudaSuccess) err = preload_type<int32_t>();
  return err;
}

}  // namespace jax_ark::gpu
