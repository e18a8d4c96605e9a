"""The GPU runtime's device-side protocol, run on host threads (no GPU needed).

tests/protocol_host_test.cc includes the very headers the CUDA kernels use
(cuda/include/jax_ark/gpu/protocol.hpp, communicator_device.hpp, persistent_sync_device.cuh,
persistent_comm_device.hpp), compiled by the host C++ compiler: threads play the ranks (and a
rank's blocks) of LL calls and of the chunked protocol's signal/wait rounds, the workers of a
persistent plan, and ranks x workers of the persistent kernel's put protocol. The binary
checks every output word against a reference computed without the protocol; a second build under
ThreadSanitizer checks that the protocol's acquire/release pairs order the plain-memory payload.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from persistent_models import attention, mlp_chain, random_args

import jax_ark as ark

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "protocol_host_test.cc"


CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compile(source: pathlib.Path, out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pthread", *flags]
    cmd += [f"-I{ROOT / 'cuda' / 'include'}", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("protocol")
    built = {}
    for name, flags in (("plain", ["-O2"]), ("tsan", ["-O1", "-g", "-fsanitize=thread"])):
        if name == "tsan":
            # A toolchain without the TSan runtime skips that build only; with it, the protocol
            # code must compile under TSan like anywhere else.
            probe = tmp / "probe.cc"
            probe.write_text("int main() { return 0; }\n")
            if _compile(probe, tmp / "probe", *flags).returncode != 0:
                built[name] = None
                continue
        done = _compile(SOURCE, tmp / f"protocol_{name}", *flags)
        assert done.returncode == 0, done.stderr
        built[name] = tmp / f"protocol_{name}"
    # The same source through nvcc: the protocol then takes its libcu++ branch (cuda::atomic_ref,
    # the kernels' own atomics), run here by host threads.
    built["nvcc"] = None
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        cmd = [nvcc, "-std=c++17", "-O2", "-x", "cu", "-Xcompiler", "-pthread,-Wall,-Wextra"]
        cmd += [f"-I{ROOT / 'cuda' / 'include'}", str(SOURCE), "-o", str(tmp / "protocol_nvcc")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        built["nvcc"] = tmp / "protocol_nvcc"
    return built


def _run(exe: pathlib.Path, *args, expect_rc: int = 0, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    out = done.stdout + done.stderr
    assert done.returncode == expect_rc, f"{exe.name} {args}: rc={done.returncode}\n{out}"
    assert "ThreadSanitizer" not in out, out
    return done.stdout


def _fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def _summary(out: str, mode: str) -> dict[str, str]:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"mode={mode} ")]
    assert len(lines) == 1, out
    return _fields(lines[0])


@pytest.mark.parametrize(("ranks", "calls", "lanes", "seed"), [(2, 300, 1, 1), (8, 120, 2, 2)])
def test_ll_calls_back_to_back(binaries, ranks, calls, lanes, seed):
    """Random LL calls of all five ops (sizes up to 4 KiB with byte tails, int32 and float32
    sums), back to back with skewed rank starts: every output equals the reference, and the
    epoch advanced once per call."""
    s = _summary(_run(binaries["plain"], "ll", ranks, calls, lanes, seed), "ll")
    assert (s["mismatches"], s["wait_failures"], s["epochs_ok"]) == ("0", "0", "1")


@pytest.mark.parametrize(("ranks", "calls", "blocks", "seed"), [(2, 400, 1, 4), (6, 100, 3, 5)])
def test_signal_wait_rounds_back_to_back(binaries, ranks, calls, blocks, seed):
    """The chunked protocol's rounds: puts into the (half, parity) piece slots, a release signal
    per peer, waits on round_seq(epoch, round); 1-6 rounds per call, so slots are reused at every
    parity and half: a piece overwritten too early or read too late fails the check."""
    s = _summary(_run(binaries["plain"], "pingpong", ranks, calls, blocks, seed), "pingpong")
    assert (s["mismatches"], s["wait_failures"], s["epochs_ok"]) == ("0", "0", "1")
    assert int(s["rounds"]) >= calls * ranks * blocks


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_seeded_stress(binaries, seed):
    """More ranks than cores, several lanes per rank, a different call mix per seed."""
    rng = np.random.default_rng(seed)
    ranks = int(rng.integers(3, 9))
    s = _summary(_run(binaries["plain"], "ll", ranks, 80, int(rng.integers(1, 4)), seed), "ll")
    assert (s["mismatches"], s["wait_failures"]) == ("0", "0")
    s = _summary(
        _run(binaries["plain"], "pingpong", ranks, 80, int(rng.integers(1, 4)), seed), "pingpong"
    )
    assert (s["mismatches"], s["wait_failures"]) == ("0", "0")


def test_missing_signal_times_out_naming_op_rank_and_peer(binaries):
    """Rank 2 never starts its all-reduce: every other rank gives up after its 200 ms bound, and
    each one's error record names the op, itself and rank 2."""
    out = _run(binaries["plain"], "timeout", 4, 2)
    records = {
        int(f["rank"]): f
        for f in (_fields(ln) for ln in out.splitlines() if ln.startswith("record "))
    }
    assert sorted(records) == [0, 1, 2, 3]
    assert records[2]["state"] == "0"  # it never ran
    for r in (0, 1, 3):
        f = records[r]
        assert (f["state"], f["op"], f["rec_rank"], f["peer"], f["epoch"]) == (
            "1",
            "all_reduce",
            str(r),
            "2",
            "1",
        ), out
        assert 200.0 <= float(f["waited_ms"]) < 5000.0, out
    assert float(_summary(out, "timeout")["worst_ms"]) < 5000.0


def test_stale_epoch_is_not_taken_for_the_current_one(binaries):
    """A packet of call e-2 (same scratch half) and a flag of call e-1 must not satisfy call e's
    waits (each times out with a record naming the peer), while call e's own values do; LL flags
    of epochs sharing a half stay distinct across the 32-bit boundaries; the recorded failure
    poisons the communicator (what a call replayed from a CUDA graph checks on the device)."""
    out = _run(binaries["plain"], "stale")
    checks = dict(re.findall(r"^check (\w+)=(\d)$", out, re.M))
    assert len(checks) == 10 and set(checks.values()) == {"1"}, out


# ---- the persistent kernel's PUT protocol (cuda/include/jax_ark/gpu/persistent_comm_device.hpp)


def _put_ok(s: dict[str, str]) -> None:
    assert (s["bad_tiles"], s["bad_signals"], s["gave_up"], s["bad_epochs"]) == ("0",) * 4, s
    assert int(s["tiles"]) == int(s["want_tiles"]) > 0, s  # every tile was checked, twice


@pytest.mark.parametrize(
    ("ranks", "workers", "calls", "tasks", "runs", "seed", "routes"),
    [
        (2, 1, 300, 3, 2, 1, "mixed"),
        (4, 2, 150, 6, 3, 2, "mixed"),
        (8, 3, 60, 5, 4, 3, "all"),
        (8, 2, 150, 4, 3, 4, "ring"),
    ],
)
def test_put_protocol_back_to_back(binaries, ranks, workers, calls, tasks, runs, seed, routes):
    """Ranks x workers run back-to-back calls of a plan of put tasks over their symmetric regions:
    entry announced once per call, one entry wait per (worker, peer, call), plain tile stores,
    (epoch, runs) signals; default routing, ppermute rings and partial perms (zero-filled slots),
    tasks in a loop writing slice k of a stacked inbox. Every tile is checked after its wait and
    again at the call's end (nothing of the next call landed early), every signal at the end."""
    out = _run(binaries["plain"], "put", ranks, workers, calls, tasks, runs, seed, routes)
    s = _summary(out, "put")
    _put_ok(s)
    assert int(s["loop_tasks"]) >= 1
    if routes == "mixed":
        assert min(int(s["default"]), int(s["ring"]), int(s["partial"])) >= 1, s
        assert int(s["zero_filled_slots"]) >= 1, s
    if routes == "ring":
        # Neighbour-only routing and a stalled rank: some rank entered call e while another had
        # not yet entered call e - 1, i.e. it ran two calls ahead (the entry wait let it).
        assert int(s["max_lead"]) >= 2, s


@pytest.mark.parametrize(
    ("ranks", "workers", "calls", "seed", "routes"),
    [(4, 2, 150, 7, "mixed"), (8, 3, 60, 8, "ring"), (3, 1, 300, 9, "all")],
)
def test_put_with_epochs_in_device_memory(binaries, ranks, workers, calls, seed, routes):
    """XLA's path on a GPU: no launch carries its epoch; every worker reads its rank's control word
    when the call starts (current_epoch) and the rank's last worker done advances it
    (retire_block), as persistent_kernel does, so calls replayed from a CUDA graph are new calls.
    Every worker must read call k's epoch as k, and the protocol must stay exact."""
    out = _run(
        binaries["plain"], "put", ranks, workers, calls, 5, 3, seed, routes, "none", "device"
    )
    s = _summary(out, "put")
    assert "epochs=device" in out, out
    _put_ok(s)


def test_put_with_a_device_epoch_never_advanced_fails(binaries):
    """The negative control: a kernel that reads its epoch from the control word but never
    advances it runs every call as call 1; the checker must see the wrong epochs."""
    out = _run(
        binaries["plain"],
        "put",
        4,
        2,
        20,
        3,
        2,
        10,
        "mixed",
        "none",
        "device_unretired",
        expect_rc=1,
    )
    s = _summary(out, "put")
    assert int(s["bad_epochs"]) > 0, out
    assert re.search(r"^bad epoch: call=2 rank=\d+ worker=\d+ read=1$", out, re.M), out


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_put_seeded_stress(binaries, seed):
    """A different group, worker count, plan, loop length and routing mix per seed."""
    rng = np.random.default_rng(seed)
    ranks, workers = int(rng.integers(2, 9)), int(rng.integers(1, 4))
    tasks, runs = int(rng.integers(3, 8)), int(rng.integers(1, 5))
    routes = ("mixed", "ring", "all")[seed % 3]
    out = _run(binaries["plain"], "put", ranks, workers, 100, tasks, runs, seed, routes)
    _put_ok(_summary(out, "put"))


_BAD_TILE = re.compile(
    r"^bad tile \((after its wait|at the call's end)\): call=(\d+) rank=(\d+) peer=(-?\d+) "
    r"task=(\d+) \((default|ring|partial)\) slot=(\d+) run=(\d+) word=(\d+) "
    r"got=0x[0-9a-f]{8} want=0x[0-9a-f]{8}: (.*)$",
    re.M,
)


@pytest.mark.parametrize("brk", ["no_entry_wait", "entry_epoch_minus_1"])
@pytest.mark.parametrize(
    ("ranks", "workers", "seed", "routes"),
    [(2, 1, 1, "mixed"), (4, 2, 2, "mixed"), (6, 2, 3, "ring")],
)
def test_put_without_the_entry_wait_overwrites_tiles_early(
    binaries, brk, ranks, workers, seed, routes
):
    """The negative control: a sender that does not wait for the peer's entry into this call (or
    waits for the previous call's) stores call e+1's tile while the receiver still reads call
    e's. The checker must catch it and name call, rank, peer, task, slot and word."""
    out = _run(binaries["plain"], "put", ranks, workers, 40, 3, 2, seed, routes, brk, expect_rc=1)
    s = _summary(out, "put")
    assert int(s["bad_tiles"]) > 0 and int(s["early"]) > 0, out
    bad = _BAD_TILE.findall(out)
    assert bad, out
    early = [b for b in bad if b[-1].startswith("early overwrite: the value of call ")]
    assert early, out
    for b in early:
        call, rank, peer = int(b[1]), int(b[2]), int(b[3])
        assert int(b[-1].rsplit(" ", 1)[1]) > call and 0 <= rank < ranks and 0 <= peer < ranks


@pytest.mark.parametrize(("ranks", "workers", "seed"), [(2, 1, 4), (5, 2, 5)])
def test_put_without_the_put_wait_reads_stale_tiles(binaries, ranks, workers, seed):
    """The other direction: a receiver that does not wait for the signal reads its slot before the
    tile arrived, and the checker names the older call whose value (or the zeros) it holds. A
    read that races the tile's own write may hold part of each call ("matches no call"; seen
    once in a loaded full-suite run), but most bad tiles are whole stale values."""
    args = (ranks, workers, 40, 3, 2, seed, "mixed", "no_put_wait")
    out = _run(binaries["plain"], "put", *args, expect_rc=1)
    s = _summary(out, "put")
    assert int(s["stale"]) > 0 and s["early"] == "0", out
    holds = [b[-1] for b in _BAD_TILE.findall(out)]
    named = [h for h in holds if h.startswith(("stale: the value of call ", "zero: never written"))]
    torn = [h for h in holds if h == "matches no call"]
    assert holds and len(named) + len(torn) == len(holds) and len(torn) < len(named), out


def test_put_entry_wait_times_out_naming_rank_and_peer(binaries):
    """Rank 2 never starts its call: every other rank's entry wait for it gives up at the 200 ms
    deadline, each saying which rank waited for which peer, and the run ends soon after."""
    t0 = time.monotonic()
    out = _run(binaries["plain"], "put_timeout", 4, 2, timeout=30)
    wall = time.monotonic() - t0
    lines = [_fields(ln) for ln in out.splitlines() if ln.startswith("gave_up ")]
    assert {f["rank"] for f in lines} == {"0", "1", "3"}, out
    for f in lines:
        assert (f["wait"], f["peer"], f["call"], f["seen_epoch"]) == ("entry", "2", "1", "0"), out
        assert float(f["waited_ms"]) < 5000.0, out
    for r in ("0", "1", "3"):  # a rank's first give-up is its deadline, not its abort word
        assert any(f["rank"] == r and f["reason"] == "deadline" for f in lines), out
    s = _summary(out, "put_timeout")
    assert (s["bad_tiles"], s["bad_signals"]) == ("0", "0"), out
    elapsed = float(
        next(ln for ln in out.splitlines() if ln.startswith("elapsed_ms=")).split("=")[1]
    )
    assert 200.0 <= elapsed < 3000.0 and wall < 10.0, out


def _plans():
    rng = np.random.default_rng(0)
    x = random_args(rng, [(4, 32)])[0]
    ws = random_args(rng, [(32, 32)] * 6)
    yield "mlp_chain", ark.plan(mlp_chain, x, ws, num_workers=3, tile_n=8)
    args = random_args(rng, [(8, 32), (32, 32), (32, 32), (32, 32)])
    yield "attention", ark.plan(attention, *args, num_workers=4, tile_n=8)


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    files = {}
    for name, plan in _plans():
        path = tmp / f"{name}.bin"
        path.write_bytes(np.asarray(plan.to_binary(), np.int32).tobytes())
        files[name] = (plan, path)
    return files


@pytest.mark.parametrize("name", ["mlp_chain", "attention"])
@pytest.mark.parametrize("seed", [1, 2])
def test_persistent_workers_run_a_real_plan(binaries, plan_files, name, seed):
    """One thread per worker walks its queue with the kernel's dependency wait and release, with
    random pauses before tasks: every task runs once, after everything it depends on."""
    plan, path = plan_files[name]
    s = _summary(_run(binaries["plain"], "persistent", path, seed), "persistent")
    assert int(s["tasks"]) == len(plan.tasks) and int(s["edges"]) > 0
    assert (s["wrong"], s["not_run_once"], s["aborted"]) == ("0", "0", "0")


def test_persistent_missing_release_times_out_naming_the_dependency(binaries, plan_files):
    """A task that never releases its counter: a worker waiting on it (or on a task stuck behind
    it) gives up after the 300 ms bound, and the record names the waiting task, the dependency and
    both ops; the other workers stop on the abort word instead of waiting out their own bounds."""
    plan, path = plan_files["mlp_chain"]
    drop = next(t for t, task in enumerate(plan.tasks) if task.deps)
    drop = plan.tasks[drop].deps[0]
    blocked = {drop}
    for t, task in enumerate(plan.tasks):  # tasks are numbered in dependency order
        if any(d in blocked for d in task.deps):
            blocked.add(t)
    out = _run(binaries["plain"], "persistent", path, 1, drop, expect_rc=0, timeout=60)
    rec = _fields(next(ln for ln in out.splitlines() if ln.startswith("record ")))
    assert rec["status"] == "1", out
    task, dep = int(rec["task"]), int(rec["dep_task"])
    assert dep in blocked and dep in plan.tasks[task].deps, out
    assert rec["counter_seen"] == "0" and float(rec["waited_ms"]) >= 300.0, out
    assert rec["op_name"] == plan.ops[plan.tasks[task].op].name, out
    assert rec["dep_op_name"] == plan.ops[plan.tasks[dep].op].name, out
    assert _summary(out, "persistent")["aborted"] == "1"


def test_thread_sanitizer_finds_no_race(binaries, plan_files):
    """The payloads (LL outputs, chunk pieces, persistent tiles) are plain memory: TSan reports a
    race unless the protocol's release/acquire pairs order every write before its read."""
    if binaries["tsan"] is None:
        pytest.skip("no ThreadSanitizer runtime for the host compiler")
    exe = binaries["tsan"]
    assert _summary(_run(exe, "ll", 4, 40, 2, 21), "ll")["mismatches"] == "0"
    assert _summary(_run(exe, "pingpong", 4, 40, 2, 22), "pingpong")["mismatches"] == "0"
    s = _summary(_run(exe, "persistent", plan_files["attention"][1], 23), "persistent")
    assert (s["wrong"], s["not_run_once"]) == ("0", "0")
    _put_ok(_summary(_run(exe, "put", 6, 2, 40, 5, 3, 24, "mixed"), "put"))
    _put_ok(_summary(_run(exe, "put", 8, 2, 40, 4, 3, 25, "ring"), "put"))


def test_libcudacxx_branch_passes_the_same_checks(binaries, plan_files):
    """Built by nvcc, the shim maps onto libcu++'s cuda::atomic_ref (what the kernels use) instead
    of the __atomic builtins: the same calls, rounds, timeouts and plan run must pass."""
    if binaries["nvcc"] is None:
        pytest.skip("no nvcc")
    exe = binaries["nvcc"]
    assert _summary(_run(exe, "ll", 4, 60, 2, 31), "ll")["mismatches"] == "0"
    assert _summary(_run(exe, "pingpong", 4, 60, 2, 32), "pingpong")["mismatches"] == "0"
    assert _summary(_run(exe, "timeout", 3, 1), "timeout")["all_failed"] == "1"
    assert "failures=0" in _run(exe, "stale")
    s = _summary(_run(exe, "persistent", plan_files["mlp_chain"][1], 33), "persistent")
    assert (s["wrong"], s["not_run_once"]) == ("0", "0")
    _put_ok(_summary(_run(exe, "put", 4, 2, 60, 5, 3, 34, "mixed"), "put"))
    _put_ok(_summary(_run(exe, "put", 8, 2, 60, 4, 3, 35, "ring"), "put"))
    assert _summary(_run(exe, "put_timeout", 3, 1), "put_timeout")["gave_up"] != "0"


def _mutant(tmp: pathlib.Path, name: str, header: str, old: str, new: str, *flags: str):
    """The test binary built against a copy of the headers with one line changed."""
    inc = tmp / name
    shutil.copytree(ROOT / "cuda" / "include", inc)
    path = inc / "jax_ark" / "gpu" / header
    text = path.read_text()
    assert text.count(old) == 1, f"mutation target not found once in {header}: {old}"
    path.write_text(text.replace(old, new))
    exe = tmp / f"{name}.exe"
    cmd = [CXX, "-std=c++17", "-pthread", *flags, f"-I{inc}", str(SOURCE), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return exe


def test_the_checks_catch_a_broken_protocol(binaries, tmp_path):
    """The checks above can fail: an LL flag that ignores the epoch lets a stale packet through,
    and a signal without release ordering is a race that ThreadSanitizer reports."""
    exe = _mutant(
        tmp_path,
        "flag_ignores_epoch",
        "protocol.hpp",
        "return static_cast<uint32_t>(epoch % 0xFFFFFFFFull) + 1u;",
        "return 1u;",
        "-O1",
    )
    out = _run(exe, "stale", expect_rc=1)
    assert "check stale_packet_rejected=0" in out
    if binaries["tsan"] is None:
        return
    exe = _mutant(
        tmp_path,
        "relaxed_signal",
        "communicator_device.hpp",
        "      .store_release(seq);",
        "      .store_relaxed(seq);",
        "-O1",
        "-g",
        "-fsanitize=thread",
    )
    done = subprocess.run(
        [str(exe), "pingpong", "3", "20", "1", "41"], capture_output=True, text=True, timeout=120
    )
    assert "ThreadSanitizer: data race" in done.stderr


def test_put_checks_catch_a_broken_header(binaries, tmp_path):
    """The put checks can fail on a broken persistent_comm_device.hpp: a signal without the epoch
    lets the previous call's signal pass (stale tiles), and an entry announce or a put signal
    without release ordering is a race that ThreadSanitizer reports (the payload is plain memory:
    the receiver's reads of call e against the sender's stores of call e + 1, or of the tile)."""
    exe = _mutant(
        tmp_path,
        "signal_without_epoch",
        "persistent_comm_device.hpp",
        "  return (epoch << 32) | runs;",
        "  return runs;",
        "-O1",
    )
    s = _summary(_run(exe, "put", 4, 2, 60, 4, 2, 51, "mixed", expect_rc=1), "put")
    assert int(s["stale"]) > 0, s
    if binaries["tsan"] is None:
        return
    for name, old, new in (
        ("relaxed_announce", ".store_release(c.epoch);", ".store_relaxed(c.epoch);"),
        (
            "relaxed_put_signal",
            ".store_release(put_signal_value(c.epoch, runs));",
            ".store_relaxed(put_signal_value(c.epoch, runs));",
        ),
    ):
        exe = _mutant(
            tmp_path, name, "persistent_comm_device.hpp", old, new, "-O1", "-g", "-fsanitize=thread"
        )
        done = subprocess.run(
            [str(exe), "put", "4", "2", "40", "4", "2", "52", "mixed"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "ThreadSanitizer: data race" in done.stderr, name
