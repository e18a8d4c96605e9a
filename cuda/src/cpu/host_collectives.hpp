// The data-moving half of the CPU collectives: the work a group does once every rank has posted
// its buffers (host_communicator.hpp runs the rendezvous around it).
//
// All ranks live in one process, so the work reads peers' inputs and writes peers' outputs
// directly. It is cut into work units that the ranks of the group claim dynamically from a shared
// counter: on a machine with fewer cores than ranks (8 devices on 2 cores) the threads the
// scheduler happens to run do the work, instead of every rank waiting for its static 1/n share to
// get a core. Which rank computes a unit never changes the result: every element's reduction is
// the same left fold over ranks 0..n-1.
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

// What one call is (docs/internals.md, "Collectives", for the shapes).
struct CollectiveWork {
  CollectiveOp op;
  ReduceKind reduce;
  ElementType type;
  size_t block_elems;        // element count of S (x's shape without any leading n)
  const int64_t* recv_from;  // permute: n entries, -1 = none; the same table on every rank
};

// How the work of one call is cut; a pure function of the call's signature, so every rank derives
// the same plan.
struct WorkPlan {
  size_t num_units;
  size_t unit_elems;  // all_reduce / reduce_scatter: elements per unit
  bool streaming;     // large all-reduce: copy the result to outputs 1..n-1 non-temporally
};

WorkPlan plan_work(const CollectiveWork& work, int group_size);

// Runs work unit `unit` (0 <= unit < plan.num_units):
// - all_reduce: reduces one range of the n inputs and writes it into every rank's output;
// - reduce_scatter: reduces one range of block r for one destination rank r;
// - all_gather / all_to_all: one (destination, source) block copy; permute: one destination.
void run_work_unit(const CollectiveWork& work, const WorkPlan& plan, size_t unit,
                   const GroupBuffers& group);

// Computes rank `rank`'s output alone (group.outputs[rank]; the other outputs are not touched),
// reading every rank's input: the same result, element for element, as the work units give it.
// The small-message path runs this on every rank on inputs staged in the communicator.
void run_rank_output(const CollectiveWork& work, const WorkPlan& plan, int rank,
                     const GroupBuffers& group);

// Makes this thread's streaming stores visible before it signals that it is done.
void finish_work(const WorkPlan& plan);

}  // namespace jax_ark::cpu
