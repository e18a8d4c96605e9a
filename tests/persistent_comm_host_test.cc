// The CPU executor's put tasks when a peer never puts (tests/test_persistent_comm.py builds and
// runs this): rank 0 of a group runs a real comm plan (argv[1]: its int32 words) while the other
// ranks' regions exist but nobody works on them. Every signal wait must end, naming this rank, the
// peer, the task and its op: by the timeout, or at once when the process-wide cancel flag is set.
// Prints one line per case; exits non-zero on any surprise.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "host_communicator.hpp"
#include "jax_ark/plan_format.hpp"
#include "jax_ark/plan_check.hpp"
#include "persistent_executor.hpp"
#include "persistent_region.hpp"

using namespace jax_ark;
using jax_ark::cpu::PersistentStatus;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++failures;
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::ifstream in(argv[1], std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<int64_t> storage((bytes.size() + 7) / 8);  // 8-byte aligned words
  std::memcpy(storage.data(), bytes.data(), bytes.size());
  const auto* words = reinterpret_cast<const int32_t*>(storage.data());
  const plan::PlanView p{words};
  const plan::Header& h = p.header();
  if (h.group_size < 2) return 3;

  // Buffers of every tensor record (zeros), and the other ranks' workspaces and counters.
  cpu::PersistentBuffers buf;
  std::vector<std::vector<char>> args(h.num_args), results(h.num_outputs);
  for (int t = 0; t < h.num_tensors; ++t) {
    const plan::TensorRecord& r = p.tensor(t);
    const size_t n = static_cast<size_t>(r.num_elements) * plan::dtype_size(r.dtype);
    if (r.storage == plan::kStorageArg) args[r.storage_index].assign(n, 0);
    if (r.storage == plan::kStorageResult) results[r.storage_index].assign(n, 0);
  }
  for (auto& a : args) buf.args.push_back(a.data()), buf.arg_bytes.push_back(a.size());
  for (auto& r : results) buf.results.push_back(r.data()), buf.result_bytes.push_back(r.size());
  const size_t ws_bytes = static_cast<size_t>(h.workspace_bytes > 0 ? h.workspace_bytes : 1);
  std::vector<uint8_t> workspace(ws_bytes);
  std::vector<int32_t> counters(h.num_counters);
  buf.workspace = workspace.data();
  buf.workspace_bytes = ws_bytes;
  buf.counters = counters.data();

  // The group's regions, made here rather than through the process-wide cache.
  int64_t inbox_end = 0;
  if (!plan::inbox_end_of(p, &inbox_end).empty()) return 4;
  const cpu::CommunicatorKey key{1, 0, h.group_size, 1};
  const int64_t num_words = h.total_words;
  cpu::PersistentComm comm;
  comm.rank = 0;
  comm.size = h.group_size;
  comm.run_id = 7;
  comm.region = std::make_shared<cpu::PersistentRegion>(key, words, num_words, inbox_end);
  cpu::PersistentOptions options;
  options.comm = &comm;

  // 1. a peer that never puts: the wait times out, naming rank, peer, task and op
  options.timeout_ms = 300;
  auto t0 = std::chrono::steady_clock::now();
  cpu::PersistentResult r = cpu::run_plan(words, buf, options);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  expect(r.status == PersistentStatus::kDeadlineExceeded, "timeout status: " + r.message);
  expect(contains(r.message, "rank 0") && contains(r.message, "peer rank ") &&
             !contains(r.message, "peer rank 0 ") &&
             contains(r.message, "task ") && contains(r.message, "'put"),
         "timeout names rank, peer, task and op");
  expect(secs < 5.0, "timeout is bounded (" + std::to_string(secs) + " s)");
  // rank 0 did put its own tile into every peer's inbox and signalled them (call 1, run 1)
  const gpu::PersistentSymLayout layout = gpu::PersistentSymLayout::of(h.num_tasks, h.group_size, inbox_end);
  bool signalled = true;
  for (int peer = 0; peer < h.group_size; ++peer) {
    const auto* signals = reinterpret_cast<const uint64_t*>(comm.region->bytes(peer) + layout.signals_offset);
    bool any = false;
    for (int t = 0; t < h.num_tasks; ++t)
      any |= signals[static_cast<size_t>(t) * h.group_size + 0] == gpu::put_signal_value(1, 1);
    signalled &= any;
  }
  expect(signalled, "rank 0 signalled every rank of its put");
  expect(comm.region->broken(), "the timeout broke the group's region (peers fail fast)");

  // 2. cancellation (interpreter exit): a long wait ends at once (in a fresh region)
  comm.region = std::make_shared<cpu::PersistentRegion>(key, words, num_words, inbox_end);
  options.timeout_ms = 60000;
  std::thread cancel([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    cpu::HostCommunicator::cancel_all("the test cancels");
  });
  t0 = std::chrono::steady_clock::now();
  r = cpu::run_plan(words, buf, options);
  secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  cancel.join();
  expect(r.status == PersistentStatus::kAborted && contains(r.message, "cancelled") &&
             contains(r.message, "rank 0"),
         "cancel status: " + r.message);
  expect(secs < 5.0, "cancel ends the wait (" + std::to_string(secs) + " s)");
  return failures == 0 ? 0 : 1;
}
