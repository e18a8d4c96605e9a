// Device twin of the communicator: a plain struct copied by value into kernels, with the small
// inline put / signal / wait primitives and the LL protocol the collective kernels are built from.
// Everything here is `__host__ __device__` (protocol.hpp): tests/protocol_host_test.cc runs this
// same code with host threads as ranks.
//
// Scratch layout of every rank (identical offsets on all ranks, see CommConfig):
//   [flags]  uint64 flag[src rank][kMaxBlocks]   written by peers (release), polled by me
//   [ll]     uint64 packet[half 2][src rank][ll_slot_packets]   LL packets {data word, flag}
//   [chunk]  bytes  piece[half 2][round parity 2][src rank][block][piece_bytes]
// `half` is the call's epoch parity, `round parity` the parity of the round inside a call.
// Peers only ever WRITE into my scratch and I only READ my own (push model), so every remote
// access is a store and every load is local.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "jax_ark/gpu/common.hpp"
#include "jax_ark/gpu/protocol.hpp"

namespace jax_ark::gpu {

struct ScratchLayout {
  uint64_t flags_offset = 0;
  uint64_t ll_offset = 0;
  uint64_t chunk_offset = 0;
  uint64_t extra_offset = 0;     // CommConfig::extra_bytes, after the chunk pieces
  uint64_t total_bytes = 0;
  uint32_t ll_slot_packets = 0;  // header packet + data packets, per source rank

  ARK_PROTO_HD static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

  static ScratchLayout of(const CommConfig& c) {
    ScratchLayout l;
    const uint64_t n = static_cast<uint64_t>(c.n_ranks);
    l.flags_offset = 0;
    l.ll_offset = round_up(n * kMaxBlocks * sizeof(uint64_t), 256);
    l.ll_slot_packets = static_cast<uint32_t>(round_up(1 + (c.ll_bytes + 3) / 4, 32));
    l.chunk_offset = round_up(l.ll_offset + 2 * n * l.ll_slot_packets * 8ull, 256);
    l.extra_offset = round_up(
        l.chunk_offset + 2ull * 2ull * n * static_cast<uint64_t>(c.blocks) * c.piece_bytes, 4096);
    l.total_bytes = round_up(l.extra_offset + c.extra_bytes, 4096);
    return l;
  }
};

struct CommDevice {
  uint8_t* const* peers = nullptr;  // device array [n]: every rank's scratch (mine included)
  uint8_t* local = nullptr;         // my scratch (== peers[rank])
  RankControl* control = nullptr;   // device memory, private to this rank
  ErrorRecord* error = nullptr;     // device pointer to host-mapped memory
  int64_t comm_id = 0;
  int32_t n = 1;
  int32_t rank = 0;
  int32_t device = 0;
  int32_t blocks = 1;
  uint32_t piece_bytes = 0;
  uint32_t ll_slot_packets = 0;
  uint64_t flags_offset = 0;
  uint64_t ll_offset = 0;
  uint64_t chunk_offset = 0;

  ARK_PROTO_HD uint64_t* flag(uint8_t* base, int src, int block) const {
    return reinterpret_cast<uint64_t*>(base + flags_offset) + static_cast<size_t>(src) * kMaxBlocks +
           block;
  }
  // Packet 0 of a slot is the arrival header, data packets follow.
  ARK_PROTO_HD uint64_t* ll_slot(uint8_t* base, uint32_t half, int src) const {
    return reinterpret_cast<uint64_t*>(base + ll_offset) +
           (static_cast<size_t>(half) * n + src) * ll_slot_packets;
  }
  ARK_PROTO_HD uint8_t* piece(uint8_t* base, uint32_t half, uint32_t parity, int src,
                              int block) const {
    const size_t index = ((static_cast<size_t>(half) * 2 + parity) * n + src) * blocks + block;
    return base + chunk_offset + index * piece_bytes;
  }
};

using proto::ll_flag_of;

// Chunked flags: 64-bit epoch in the high bits, round + 1 in the low kRoundBits, so flags only
// grow and `>=` waits never pass on a value of an older call or round.
// g + 1 < 2^kRoundBits: validate_call bounds the rounds of a call (kMaxRoundsPerCall).
ARK_PROTO_HD uint64_t round_seq(uint64_t epoch, uint32_t g) {
  return (epoch << kRoundBits) | (static_cast<uint64_t>(g) + 1);
}

// Raises flag[my rank][block] = seq on `peer`. Called by one thread per peer after a barrier over
// the block's puts: the release is cumulative over the stores that the barrier ordered before it
// (CTA-scope barrier, then a sys-scope release), so it is the only fence a signal needs.
ARK_PROTO_HD void signal_peer(const CommDevice& c, int peer, int block, uint64_t seq) {
  proto::AtomicRef<uint64_t, proto::Scope::kSystem>(c.flag(c.peers[peer], c.rank, block))
      .store_release(seq);
}

// The epoch of the call about to run (set by the previous call's retire_block).
ARK_PROTO_HD uint64_t current_epoch(const RankControl* control) {
  return proto::AtomicRef<uint64_t, proto::Scope::kGpu>(&control->epoch).load_acquire();
}

// True once a call of this rank recorded a failure (WaitContext::record_failure claims the record
// first): the epochs of the communicator's ranks are out of step from then on, so a later call
// must not wait for peers. The FFI handler refuses such calls on the host; a call replayed from a
// CUDA graph (no host code runs) checks it here and returns at once.
ARK_PROTO_HD bool communicator_poisoned(const RankControl* control) {
  return proto::AtomicRef<uint32_t, proto::Scope::kGpu>(&control->error_claim).load_relaxed() != 0u;
}

// Called once per block at the end of a call, after every thread of the block is done with it.
// The last of `blocks` blocks advances the epoch. Every block read the epoch before counting itself
// done, so no block of this call can see the new value; the next call (a later kernel on the same
// stream, or the same host thread) does.
ARK_PROTO_HD void retire_block(RankControl* control, uint32_t blocks, uint64_t epoch) {
  const proto::AtomicRef<uint32_t, proto::Scope::kGpu> done(&control->blocks_done);
  if (done.fetch_add_acq_rel(1u) == blocks - 1u) {
    done.store_relaxed(0u);
    proto::AtomicRef<uint64_t, proto::Scope::kGpu>(&control->epoch).store_release(epoch + 1u);
  }
}

// ---- bounded waits -------------------------------------------------------------------------
// A wait spins on a local word; every 256 polls it checks the clock against the call's deadline
// and the rank's abort word. On failure the first failing thread writes the error record.
struct WaitContext {
  // A reference: kernels keep the communicator in their parameter space (constant bank) rather
  // than in ~22 registers per thread.
  const CommDevice& comm;
  uint64_t start_ns;
  uint64_t deadline_ns;
  int32_t op;
  uint64_t epoch;
  uint32_t ll_flag;  // ll_flag_of(epoch)

  ARK_PROTO_HD static WaitContext begin(const CommDevice& comm, int32_t op, uint64_t epoch,
                                        uint64_t timeout_ns) {
    const uint64_t now = proto::now_ns();
    return WaitContext{comm, now, now + timeout_ns, op, epoch, ll_flag_of(epoch)};
  }

  // Claims the record BEFORE raising `abort`: a thread that stops because it saw `abort` must not
  // record its own (innocent) peer as the culprit.
  ARK_PROTO_HD void record_failure(int peer) const {
    if (proto::AtomicRef<uint32_t, proto::Scope::kGpu>(&comm.control->error_claim)
            .compare_exchange(0u, 1u)) {
      volatile ErrorRecord* r = comm.error;
      r->op = op;
      r->rank = comm.rank;
      r->peer = peer;
      r->epoch = epoch;
      r->device = comm.device;
      r->comm_id = comm.comm_id;
      r->waited_ns = proto::now_ns() - start_ns;
      // The host reads the fields once it sees `state`, without synchronizing any stream.
      proto::AtomicRef<int32_t, proto::Scope::kSystem>(&comm.error->state).store_release(1);
      proto::push_out_system();
    }
    proto::AtomicRef<uint32_t, proto::Scope::kGpu>(&comm.control->abort).store_relaxed(1u);
  }
  ARK_PROTO_HD bool aborted() const {
    return proto::AtomicRef<uint32_t, proto::Scope::kGpu>(&comm.control->abort).load_relaxed() != 0u;
  }
  // True when the caller must stop: deadline passed or another thread of this rank failed.
  ARK_PROTO_HD bool give_up(int peer) const {
    if (aborted() || proto::now_ns() > deadline_ns) {
      record_failure(peer);
      return true;
    }
    return false;
  }
  // Waits until my flag[src][block] >= target (proto::wait_at_least: relaxed polls, one acquire).
  // Returns false on timeout/abort.
  ARK_PROTO_HD bool wait_flag(int src, int block, uint64_t target) const {
    const proto::AtomicRef<uint64_t, proto::Scope::kSystem> f(comm.flag(comm.local, src, block));
    uint64_t seen = 0;
    return proto::wait_at_least(f, target, [&] { return give_up(src); }, 256u, &seen);
  }
  // Waits until an LL packet carries this call's flag; returns its data word through `data`.
  // The data travels in the polled word itself, so no acquire is needed.
  ARK_PROTO_HD bool wait_packet(const uint64_t* p, int src, uint32_t& data) const {
    return proto::spin_until(
        [&] {
          const proto::Packet v = proto::load_packet(p);
          data = v.data;
          return v.flag == ll_flag;
        },
        [&] { return give_up(src); }, 256u);
  }
};

// ---- LL protocol ---------------------------------------------------------------------------
// Reads 32-bit word `w` of an M-byte buffer; bytes past the end read as 0.
ARK_PROTO_HD uint32_t load_word(const uint8_t* p, uint64_t m, uint64_t w) {
  const uint64_t at = w * 4;
  if (at + 4 <= m && (reinterpret_cast<uintptr_t>(p + at) & 3) == 0)
    return *reinterpret_cast<const uint32_t*>(p + at);
  uint32_t v = 0;
  for (int i = 0; i < 4 && at + i < m; ++i) v |= static_cast<uint32_t>(p[at + i]) << (8 * i);
  return v;
}
ARK_PROTO_HD void store_word(uint8_t* p, uint64_t m, uint64_t w, uint32_t v) {
  const uint64_t at = w * 4;
  if (at + 4 <= m && (reinterpret_cast<uintptr_t>(p + at) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(p + at) = v;
    return;
  }
  for (int i = 0; i < 4 && at + i < m; ++i) p[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

// The share of an LL call one thread runs. Work item i of a loop belongs to the thread with
// tid == i mod nthreads; header packet j (one per peer) to header lane j mod header_lanes, and
// header_lane < 0 sends/polls no headers. On the device: tid over the whole grid, header lanes =
// the threads of block 0. On the host: one thread per rank does everything.
struct Lanes {
  uint64_t tid;
  uint64_t nthreads;
  int32_t header_lane;
  int32_t header_lanes;
};

// One LL call of any op, for one thread. Every rank pushes 8-byte packets {4 data bytes,
// ll_flag_of(epoch)} straight into slot [my rank] of every destination's LL area; readers poll
// the packets, so data and "signal" arrive together. The header packet goes to EVERY rank (data
// or not) and every rank polls every header: each call thereby depends on every peer having
// started it (the buffer-reuse argument in collective_kernels.cu, and permute).
// Fold: first(word) / next(word) / result() folds the elements packed in a 32-bit word, in rank
// order (WordFold<T, R> in the kernels). Returns false on timeout/abort (error recorded).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// x / y are this rank's buffers (a.x / a.y are not read: one CollectiveArgs serves every rank of
// the single-GPU harness's group launch).
template <typename Fold>
ARK_PROTO_HD bool ll_call(const WaitContext& w, const CollectiveArgs& a, const uint8_t* x,
                          uint8_t* y, const Lanes& lanes) {
  const CommDevice& c = w.comm;
  const int n = c.n;
  const int r = c.rank;
  const uint32_t e = w.ll_flag;
  const uint32_t half = static_cast<uint32_t>(w.epoch & 1u);
  const uint64_t m = a.block_bytes;
  const uint64_t words = (m + 3) / 4;
  const uint64_t tid = lanes.tid;
  const uint64_t nthreads = lanes.nthreads;

  // Send.
  if (lanes.header_lane >= 0)
    for (int j = lanes.header_lane; j < n; j += lanes.header_lanes)
      proto::store_packet(c.ll_slot(c.peers[j], half, r), 0u, e);
  if (a.op == kPermute) {
    const int dst = a.send_to[r];
    if (dst >= 0) {
      uint64_t* slot = c.ll_slot(c.peers[dst], half, r) + 1;
      for (uint64_t i = tid; i < words; i += nthreads)
        proto::store_packet(slot + i, load_word(x, m, i), e);
    }
  } else {
    const bool per_peer_block = a.op == kReduceScatter || a.op == kAllToAll;
    for (uint64_t i = tid; i < n * words; i += nthreads) {
      const int j = static_cast<int>(i / words);
      const uint64_t wd = i % words;
      const uint8_t* src = per_peer_block ? x + j * m : x;
      proto::store_packet(c.ll_slot(c.peers[j], half, r) + 1 + wd, load_word(src, m, wd), e);
    }
  }

  // Receive.
  bool ok = true;
  uint32_t data = 0;
  if (lanes.header_lane >= 0)
    for (int j = lanes.header_lane; ok && j < n; j += lanes.header_lanes)
      ok = w.wait_packet(c.ll_slot(c.local, half, j), j, data);
  if (a.op == kAllReduce || a.op == kReduceScatter) {
    for (uint64_t i = tid; ok && i < words; i += nthreads) {
      Fold fold;
      for (int j = 0; ok && j < n; ++j) {
        ok = w.wait_packet(c.ll_slot(c.local, half, j) + 1 + i, j, data);
        if (j == 0) fold.first(data);
        else fold.next(data);
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

}  // namespace jax_ark::gpu
