// Single-GPU test harness: N ranks of one communicator (each its own scratch and semaphores) on the
// current GPU of one process, used by the GPU tests and the collectives benchmark. Each call of all
// N ranks is ONE cooperative launch (rank = blockIdx / blocks_per_rank), so every rank's blocks are
// resident at once: N kernels on N streams carry no such promise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace jax_ark::gpu {

struct HarnessOptions {
  int32_t blocks = 0;            // 0: as many as keep all ranks' blocks co-resident (max 16)
  uint32_t piece_bytes = 32768;  // chunk piece per (source, block): small values force many rounds
  uint32_t ll_bytes = 65536;     // largest per-peer message sent with the LL protocol
  int64_t timeout_ms = 10000;
  int32_t skip_rank = -1;        // a rank whose blocks return at once (forced timeouts)
  int32_t iters = 1;             // back-to-back calls; outputs are those of the last call
  // harness_run only: each rank's input holds `input_sets` x's back to back; call i reads set
  // i % input_sets. With all_outputs, call i writes its own y and every call's y is returned
  // (rank r's output = iters y's back to back), so a call that read stale scratch is caught
  // even when its inputs equal an earlier call's.
  int32_t input_sets = 1;
  bool all_outputs = false;
};

// Runs `iters` calls of one collective on n ranks; inputs[r] holds rank r's x as raw bytes
// (options.input_sets of them). Returns each rank's y as raw bytes (every call's with
// options.all_outputs). Throws std::runtime_error with the device's error record
// (op, rank, peer) when a wait timed out.
std::vector<std::string> harness_run(int32_t op, int32_t reduce, int32_t dtype, int32_t n,
                                     const std::vector<std::string>& inputs,
                                     const std::vector<int32_t>& send_to,
                                     const std::vector<int32_t>& recv_from,
                                     const HarnessOptions& options);

// Microseconds per call of `iters` back-to-back calls (x_bytes per rank), timed with cudaEvents.
// graph=true captures the `iters` group launches in one CUDA graph (launch overhead of a graph
// node, the way XLA command buffers would run it); false launches from the host one by one.
double harness_time(int32_t op, int32_t reduce, int32_t dtype, int32_t n, uint64_t x_bytes,
                    int32_t iters, bool graph, const HarnessOptions& options);

// Device-to-device cudaMemcpyAsync bandwidth in GB/s, counting bytes read + bytes written.
double copy_bandwidth(uint64_t nbytes, int32_t iters);

}  // namespace jax_ark::gpu
