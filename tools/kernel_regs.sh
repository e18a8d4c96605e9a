#!/usr/bin/env bash
# Offline resource report of the persistent kernel (docs/cuda_executor.md, "Resources"): compiles
# cuda/src/gpu/persistent_kernel.cu alone with the build's flags, per architecture, and prints from
# `ptxas -v` the kernel's registers, stack frame and spills, the spills of the device functions it
# calls (the GEMV variants), and from the SASS (cuobjdump) the instruction count and the local-memory
# accesses (LDL / STL: spills and the epilogue's register file). No GPU needed; ~3 min per
# architecture on 2 loaded cores. Usage: [ARCHS="80 90"] tools/kernel_regs.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/kernel_regs}
mkdir -p "$out"
# cuobjdump: the CUDA toolkit's, else the nvidia-cuda-cuobjdump wheel's.
cuobjdump=$(command -v cuobjdump ||
  python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "cuobjdump"))')
nvcc --version | tail -1
for arch in ${ARCHS:-80 90}; do
  nvcc -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr -lineinfo -Xcompiler=-fPIC \
    -I cuda/include -I xla_ffi -I "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
    --generate-code=arch=compute_$arch,code=sm_$arch -Xptxas -v -c cuda/src/gpu/persistent_kernel.cu \
    -o "$out/persistent_kernel_sm$arch.o" 2> "$out/ptxas_sm$arch.txt"
  "$cuobjdump" -sass "$out/persistent_kernel_sm$arch.o" > "$out/sass_sm$arch.txt"
  echo "sm_$arch:"
  python tools/kernel_regs_summary.py "$out/ptxas_sm$arch.txt" "$out/sass_sm$arch.txt"
done
