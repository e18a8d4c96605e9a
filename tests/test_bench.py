"""The benchmark CLI documents its options and runs end to end on a tiny case."""

from __future__ import annotations

import json

import pytest

from jax_ark.bench.__main__ import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["collectives", "persistent", "decode", "overlap", "cnn", "--repeats", "IQR"]),
        (["cnn"], ["--batches", "SGD training step", "max_pool"]),
        (["overlap"], ["--layers", "--sizes", "RxDxH", "max(compute, comm)"]),
        (["collectives"], ["--ops", "--sizes", "float32 elements per device", "4 KiB"]),
        (["persistent"], ["--configs", "DxLxB", "weight-bytes floor", "cache"]),
        (["decode"], ["--configs", "--vocab", "--cache-len", "tokens/s", "weight-bytes floor"]),
    ],
)
def test_help_documents_options(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, (text, out)


def test_collectives_cpu_bench_runs(tmp_path, capsys):
    argv = ["collectives", "--ops", "psum,ppermute", "--sizes", "256", "--repeats", "3"]
    assert main([*argv, "--budget", "0.01", "--platform", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "collectives_cpu.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["psum", "ppermute"]
    for r in rows:
        assert r["ratio_p25"] <= r["ratio"] <= r["ratio_p75"]
        assert r["repeats"] == 3
    assert (tmp_path / "collectives_cpu.png").stat().st_size > 0
    assert "IQR lo" in capsys.readouterr().out


def test_persistent_cpu_bench_has_no_floor_columns(tmp_path, capsys):
    argv = ["persistent", "--configs", "64x2x1", "--repeats", "2", "--budget", "0.01"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ark/jit" in out and "%floor" not in out
    assert (tmp_path / "persistent_cpu.png").stat().st_size > 0


def test_decode_cpu_bench_checks_tokens_and_runs(tmp_path, capsys):
    argv = ["decode", "--configs", "64x2x1,64x2x2", "--vocab", "50", "--cache-len", "16"]
    assert main([*argv, "--repeats", "2", "--budget", "0.01", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_cpu.json").read_text())["rows"]
    assert [(r["form"], r["d"], r["layers"], r["batch"], r["tokens_per_call"]) for r in rows] == [
        ("generate", 64, 2, 1, 8),  # 16 tokens do not fit after position 8 of 16: 8
        ("step", 64, 2, 1, 1),
        ("generate", 64, 2, 2, 8),
        ("step", 64, 2, 2, 1),
    ]
    for r in rows:
        assert r["ratio_p25"] <= r["ratio"] <= r["ratio_p75"]
        assert r["ark_tok_s"] > 0 and r["xla_tok_s"] > 0
    out = capsys.readouterr().out
    assert "ark tok/s" in out and "%floor" not in out
    assert (tmp_path / "decode_cpu.png").stat().st_size > 0


def test_overlap_cpu_bench_runs(tmp_path, capsys):
    argv = ["overlap", "--sizes", "16x32x64", "--repeats", "2", "--budget", "0.01"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "overlap_cpu.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["tp", "sp", "moe", "dptp", "ring", "ring_loop", "decode"]
    for r in rows:
        assert r["ratio_p25"] <= r["ratio"] <= r["ratio_p75"]
        assert r["max_rel_err"] < 1e-4
        assert r["overlap_eff"] > 0
    assert "ark/lax" in capsys.readouterr().out


class _HarnessStandIn:
    """A `_ark_cuda` whose group harness runs the reference interpreter (no GPU here) and whose
    timer answers the plan's task count in microseconds, so that the bench's plumbing (GPU plans
    over an abstract mesh, the check against the reference, the efficiency column) is tested."""

    def __init__(self):
        self.timed: list[tuple[int, int]] = []

    def persistent_max_workers(self, device):
        return 132

    def persistent_group_run(self, words, n_ranks, inputs, timeout_ms, chaos_seed, skip_rank):
        import numpy as np

        from jax_ark._persistent._format import np_dtype
        from jax_ark._persistent._reference import interpret_group

        plan = self.current
        out = []
        for call in inputs:
            per_rank = [
                [
                    np.frombuffer(b, np_dtype(plan.tensors[t].dtype)).reshape(plan.tensors[t].shape)
                    for b, t in zip(blobs[: plan.num_inputs], plan.args, strict=False)
                ]
                for blobs in call
            ]
            outs = interpret_group(plan, per_rank)
            out.append([[np.ascontiguousarray(o).tobytes() for o in rank] for rank in outs])
        return out

    def persistent_group_time(self, words, n_ranks, inputs, iters, timeout_ms):
        self.timed.append((n_ranks, iters))
        return float(len(words) % 1000 + 1)


def test_overlap_gpu_bench_plumbing_with_a_stand_in_harness(tmp_path, capsys, monkeypatch):
    from jax_ark import _ffi
    from jax_ark._persistent import _gpu_group

    stand_in = _HarnessStandIn()
    real_run = _gpu_group.group_run

    def group_run(plan, calls, **kw):
        stand_in.current = plan
        return real_run(plan, calls, **kw)

    monkeypatch.setattr(_ffi, "cuda_module", lambda: stand_in)
    monkeypatch.setattr(_gpu_group, "group_run", group_run)
    argv = ["overlap", "--gpu", "--layers", "tp,sp", "--sizes", "16x32x64", "--ranks", "4"]
    assert main([*argv, "--iters", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "overlap_gpu.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["tp", "sp"]
    # Three timed plans per layer, each on the 4 ranks (compute-only as 4 independent copies).
    assert stand_in.timed == [(4, 3)] * 6
    for r in rows:
        assert r["workers"] == min(16, 132 // 4)
        assert r["overlap_eff"] == pytest.approx(r["ark_us"] / max(r["compute_us"], r["comm_us"]))
        assert r["max_rel_err"] < 1e-3
    assert "eff" in capsys.readouterr().out


def test_kv_scatter_script_runs():
    """benchmarks/kv_scatter.py (docs/benchmarks.md's KV-cache table) checks ark against jax.jit
    and prints a ratio per function, on a tiny number of calls."""
    import subprocess
    import sys
    from pathlib import Path

    from subprocess_env import TESTS_DIR, subprocess_env

    script = Path(TESTS_DIR).parent / "benchmarks" / "kv_scatter.py"
    out = subprocess.run(
        [sys.executable, str(script), "--calls", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        cwd=TESTS_DIR,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "ark/jit" in line]
    assert len(lines) == 7, out.stdout
    assert any("cache donated" in line for line in lines)


def test_rendezvous_floor_script_runs():
    """benchmarks/rendezvous_floor.py (docs/benchmarks.md, "What a meeting of 8 devices costs")
    builds its three no-op rendezvous targets with the C++ compiler, checks every case's result
    (ark's psum and tp layer against jax.lax) and prints one line of times per round."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from subprocess_env import TESTS_DIR, subprocess_env

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    script = Path(TESTS_DIR).parent / "benchmarks" / "rendezvous_floor.py"
    out = subprocess.run(
        [sys.executable, str(script), "--calls", "3", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        cwd=TESTS_DIR,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name in (
        "rendezvous (block)",
        "rendezvous (spin)",
        "rendezvous (async)",
        "psum 2 KiB, ark",
    ):
        assert f"{name} " in out.stdout, out.stdout
    assert "tp ark/lax" in out.stdout, out.stdout


def test_cnn_cpu_bench_runs(tmp_path, capsys):
    argv = ["cnn", "--batches", "2", "--repeats", "2", "--budget", "0.01"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cnn_cpu.json").read_text())["rows"]
    assert [(r["case"], r["batch"]) for r in rows] == [("forward", 2), ("sgd step", 2)]
    for r in rows:
        assert r["ratio_p25"] <= r["ratio"] <= r["ratio_p75"]
        assert r["max_rel_err"] < 1e-4
    assert "ark/jit" in capsys.readouterr().out
