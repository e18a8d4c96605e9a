"""The compiled CUDA module read back as SASS, on CPU (no GPU needed; CI builds the module).

ptxas (nvcc 13.0, sm_80 and sm_90) compiled the byte stores of a memcpy'd bf16/f16 value, i.e.
`cvt.rn.bf16.f32 %rs, %f; st.global.u8 [p], %rs`, into `F2I.U8.F16.TRUNC`: a float -> uint8
CONVERSION of the value instead of its low byte. Every 16-bit all_reduce / reduce_scatter result
that went through the chunked path's scalar tail got 0x00 / 0x01 / 0x02 as its low byte (the H200
run of 2026-12-04). No kernel of the module converts a float to an 8-bit integer on purpose (plan
bools come from comparisons, not conversions), so any such instruction is this miscompile again.

Needs `cuobjdump` and `nvdisasm` (CUDA toolkit, or NVIDIA's wheels in the test extras).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import jax_ark
from jax_ark import _ffi

# F2I with an 8-bit integer destination, e.g. F2I.U8.F16.TRUNC.NTZ, F2I.S8.BF16...
FLOAT_TO_BYTE = re.compile(r"\bF2I(?:\.[A-Z0-9]+)*\.[US]8\b[^;]*;")


def _cuda_tool(name: str) -> str | None:
    """`name` on PATH (a CUDA toolkit) or from NVIDIA's CUDA wheels (nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(base).glob(f"*/bin/{name}")):
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def sass() -> str:
    if not jax_ark.has_cuda():
        pytest.skip("jax_ark built without the CUDA runtime")
    cuobjdump, nvdisasm = _cuda_tool("cuobjdump"), _cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("no cuobjdump/nvdisasm (test extras: nvidia-cuda-cuobjdump, -nvdisasm)")
    module = Path(_ffi.cuda_module().__file__)
    env = dict(os.environ, NVDISASM_PATH=str(Path(nvdisasm).parent))  # cuobjdump -sass runs it
    done = subprocess.run(
        [cuobjdump, "-sass", str(module)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _functions(sass: str) -> list[tuple[str, str, str]]:
    """(arch, function name, body) of every kernel in cuobjdump's listing."""
    out = []
    arch = "?"
    for piece in re.split(r"^\s*(?=Function : |code for sm_)", sass, flags=re.M):
        if piece.startswith("code for sm_"):
            arch = piece.split()[2]
        elif piece.startswith("Function : "):
            name = piece.split("\n", 1)[0][len("Function : ") :].strip()
            out.append((arch, name, piece))
    return out


def test_no_kernel_converts_a_float_to_a_byte(sass):
    functions = _functions(sass)
    archs = {arch for arch, _, _ in functions}
    collective = [f for f in functions if "collective" in f[1]]
    # The scan must have seen what it guards: the 16-bit collective kernels of every architecture
    # in the module (CI builds sm_80 and sm_90; tools/gpu_check.sh sm_90 only).
    assert archs, sass[:2000]
    for arch in archs:
        names = [name for a, name, _ in collective if a == arch]
        assert any("bfloat16" in n for n in names), (arch, [n for _, n, _ in functions])
    found = [
        f"{arch} {name}: {m.group(0)}"
        for arch, name, body in functions
        for m in FLOAT_TO_BYTE.finditer(body)
    ]
    assert not found, "float -> 8-bit conversions in the CUDA module:\n" + "\n".join(found[:20])
