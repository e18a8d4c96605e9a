"""The benchmark CLI documents its options and runs end to end on a tiny case."""

from __future__ import annotations

import json

import pytest

from jax_ark.bench.__main__ import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["collectives", "persistent", "decode", "overlap", "--repeats", "IQR"]),
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
    assert [r["layer"] for r in rows] == ["tp", "sp", "moe"]
    for r in rows:
        assert r["ratio_p25"] <= r["ratio"] <= r["ratio_p75"]
        assert r["max_rel_err"] < 1e-4
        assert r["overlap_eff"] > 0
    assert "ark/lax" in capsys.readouterr().out
