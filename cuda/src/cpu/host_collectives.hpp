// The data-moving half of the CPU collectives: what one rank does once every rank of its group has
// posted its buffers (host_communicator.hpp runs the rendezvous around it).
//
// Every function here reads peers' inputs and writes outputs directly (all ranks live in one
// process) and does only this rank's share of the work, so the group as a whole touches each byte
// once and the ranks work in parallel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "jax_ark/collective_types.hpp"

namespace jax_ark::cpu {

// The buffers every rank of the group posted for the current call, indexed by rank.
struct GroupBuffers {
  const void* const* inputs;
  void* const* outputs;
  int size;  // n, the group size
};

// One rank's share of a collective (docs/internals.md, "Collectives", for the shapes):
// - all_reduce: reduces chunk `rank` of the n inputs (left fold over ranks 0..n-1) and writes it
//   into chunk `rank` of every output; the n chunks together cover the whole array.
// - all_gather, reduce_scatter, permute, all_to_all: fill this rank's own output by reading peers.
// `block_elems` is the element count of S (x's shape without the leading n where it has one).
// `recv_from` (n entries, -1 = none) is read for permute only.
void run_collective_share(CollectiveOp op, ReduceKind reduce, ElementType type, size_t block_elems,
                          int rank, const GroupBuffers& group, const int64_t* recv_from);

}  // namespace jax_ark::cpu
