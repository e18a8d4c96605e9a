"""Host check of the CUDA executor's tensor-core GEMM index math (cuda/include/jax_ark/gpu/
gemm_layout.hpp, used by gemm_tile in tile_ops_device.cuh).

The header is compiled with the host C++ compiler and its tables are fed to a numpy emulation of
the 64x64x32 sub-tile: staging into shared memory (zero fill past M/N/K), every lane's
`mma.sync.m16n8k16.row.col` registers, the instruction's math, and the accumulator write-back.
What the instruction expects in which register comes from the PTX ISA tables ("Matrix Fragments
for mma.m16n8k16 with floating point type"), transcribed below independently of the header. A wrong
index gives silently wrong numbers on a GPU; here it fails on any machine with a C++ compiler.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("gemm_layout") / "dump"
    src = ROOT / "tests" / "gemm_layout_dump.cc"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'cuda' / 'include'}", str(src), "-o", str(exe)],
        check=True,
        timeout=120,
    )
    rows: dict[str, list[list[int]]] = {"P": [], "S": [], "A": [], "B": [], "C": []}
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        tag, *vals = line.split()
        rows[tag].append([int(v) for v in vals])
    return {k: np.array(v, dtype=np.int64) for k, v in rows.items()}


# PTX ISA, mma.m16n8k16 .f16/.bf16 (groupID = lane / 4, threadID_in_group = lane % 4). Element j of
# a fragment is half (j % 2) of register j // 2, the lower element in the low 16 bits.
def ptx_a(lane, j):  # A (16 x 16, .row): a0..a7 -> (row, k)
    g, t = lane // 4, lane % 4
    row = g + 8 * ((j // 2) % 2)
    k = 2 * t + (j % 2) + 8 * (j // 4)
    return row, k


def ptx_b(lane, j):  # B (16 x 8, .col): b0..b3 -> (k, n)
    g, t = lane // 4, lane % 4
    return 2 * t + (j % 2) + 8 * (j // 2), g


def ptx_c(lane, j):  # C/D (16 x 8): c0..c3 -> (row, n)
    g, t = lane // 4, lane % 4
    return g + 8 * (j // 2), 2 * t + (j % 2)


def _emulate(t, a, b, k_contig_a, k_contig_b):
    """gemm_tile's tensor-core path for one sub-tile: A (m <= 64, K) times B (K, n <= 64)."""
    bm, bn, bk, pad = (int(v) for v in t["P"][0])
    m, kdim = a.shape
    n = b.shape[1]
    stage = {kc: t["S"][t["S"][:, 0] == kc] for kc in (0, 1)}
    a_idx = {(w, ln, f, ks, r): i for w, ln, f, ks, r, i in t["A"]}
    b_idx = {(w, ln, f, ks, r): i for w, ln, f, ks, r, i in t["B"]}
    acc = np.zeros((8, 32, 2, 2, 4))
    for k0 in range(0, kdim, bk):
        # NaN everywhere first: a fragment that reads an element staging did not write shows up.
        a_s = np.full(bm * pad, np.nan)
        b_s = np.full(bn * pad, np.nan)
        for s_rows, src, kc, smem, outer_n in (
            (stage[k_contig_a], a, k_contig_a, a_s, m),
            (stage[k_contig_b], b.T, k_contig_b, b_s, n),
        ):
            written = np.zeros(len(smem), dtype=int)
            for _, _, o, k, idx in s_rows:
                gk = k0 + k
                smem[idx] = src[o, gk] if (o < outer_n and gk < kdim) else 0.0
                written[idx] += 1
            assert written.max() == 1 and written.sum() == bm * bk, f"staging (k_contig={kc})"
        for w in range(8):
            for ks in range(0, bk, 16):
                a16 = np.full((2, 16, 16), np.nan)
                b16 = np.full((2, 16, 8), np.nan)
                for lane in range(32):
                    for f in range(2):
                        for r in range(4):
                            i = a_idx[(w, lane, f, ks, r)]
                            assert i % 2 == 0, "32-bit fragment load must be 4-byte aligned"
                            for h in range(2):
                                row, k = ptx_a(lane, 2 * r + h)
                                a16[f, row, k] = a_s[i + h]
                        for r in range(2):
                            i = b_idx[(w, lane, f, ks, r)]
                            assert i % 2 == 0, "32-bit fragment load must be 4-byte aligned"
                            for h in range(2):
                                k, col = ptx_b(lane, 2 * r + h)
                                b16[f, k, col] = b_s[i + h]
                assert not np.isnan(a16).any() and not np.isnan(b16).any(), "read unstaged smem"
                for mf in range(2):
                    for nf in range(2):
                        d = a16[mf] @ b16[nf]
                        for lane in range(32):
                            for j in range(4):
                                acc[w, lane, mf, nf, j] += d[ptx_c(lane, j)]
    cs = np.full((bm, bn), np.nan)
    hits = np.zeros((bm, bn), dtype=int)
    for w, lane, mf, nf, j, row, col in t["C"]:
        cs[row, col] = acc[w, lane, mf, nf, j]
        hits[row, col] += 1
    assert (hits == 1).all(), "every output element written by exactly one lane register"
    return cs[:m, :n]


@pytest.mark.parametrize(
    "m,n,k,k_contig_a,k_contig_b",
    [
        (64, 64, 32, True, True),  # one full sub-tile, one k step
        (37, 23, 45, True, False),  # edge tile in M and N, k tail (45 = 32 + 13), B transposed
        (64, 9, 80, False, True),  # A transposed, narrow N, three k steps
    ],
)
def test_mma_tile_matches_matmul(tables, m, n, k, k_contig_a, k_contig_b):
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    # Small integers: every product and sum is exact, so the comparison is exact.
    a = rng.integers(-4, 5, size=(m, k)).astype(np.float64)
    b = rng.integers(-4, 5, size=(k, n)).astype(np.float64)
    np.testing.assert_array_equal(_emulate(tables, a, b, k_contig_a, k_contig_b), a @ b)


def test_ptx_tables_are_permutations():
    """The transcribed PTX tables give each (row, col) of a fragment to exactly one lane slot."""
    for fn, shape, per_lane in ((ptx_a, (16, 16), 8), (ptx_b, (16, 8), 4), (ptx_c, (16, 8), 4)):
        seen = {fn(lane, j) for lane in range(32) for j in range(per_lane)}
        assert len(seen) == shape[0] * shape[1]
        assert all(0 <= r < shape[0] and 0 <= c < shape[1] for r, c in seen)
