#!/usr/bin/env bash
# One-shot check on a GPU machine (offline): build with CUDA, show the GPU, run the GPU tests and
# the benchmarks. Every step runs under `timeout` and appends to $OUT/gpu_check.log; a failing step
# does not stop the next; a summary comes at the end. The step limits add up to 735 s, over one
# device call's 600 s: the steps take less than their limits (the build took 97 s of its 150 on the
# first H200 run), and a run cut at 600 s still brings back gpu_check.log up to that point.
# Usage: tools/gpu_check.sh [OUT]   (OUT defaults to $OUT, else ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-./gpu_out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
# The harness now runs its N ranks as ONE cooperative launch; kept for any test that still has
# several spinning streams in one process (streams aliasing one hardware queue serialize).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
# The pytest process and the two worker processes of the multi-process test share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
PY=${PYTHON:-python3}
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  # One log for all steps: the device tool brings back at most 8 files from $OUT.
  echo "===== $name: $*" >>"$OUT/gpu_check.log"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/step.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0))
  cat "$OUT/step.log" >>"$OUT/gpu_check.log"
  tail -n 25 "$OUT/step.log"
  rm -f "$OUT/step.log"
  if [ $rc -eq 0 ]; then
    SUMMARY+=("PASS  $name (${took}s)")
  else
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && SUMMARY+=("TIME  $name (rc=$rc, ${took}s)") || SUMMARY+=("FAIL  $name (rc=$rc, ${took}s)")
    FAILED=1
  fi
}

step env 20 bash -c "nvidia-smi; nvcc --version | tail -2; $PY -c 'import jax; print(jax.__version__, jax.devices())'"
# The build compiles the kernels for sm_80 and sm_90.
# sm_90 only here (the machine is an H100/H200): half the compile time of the sm_80+sm_90 default.
step build 150 env JAX_ARK_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 \
  SKBUILD_CMAKE_DEFINE="CMAKE_CUDA_ARCHITECTURES=90" \
  $PY -m pip install --no-build-isolation --no-deps -v -e .
step import 30 $PY -c "import jax_ark, jax, sys; print('has_cuda', jax_ark.has_cuda(), jax.devices()); sys.exit(0 if jax_ark.has_cuda() else 1)"
if ! $PY -c "import jax_ark, sys; sys.exit(0 if jax_ark.has_cuda() else 1)" >/dev/null 2>&1; then
  # Fallback: plain CMake build with the modules copied next to the sources.
  step build_inplace 200 env ARK_BUILD_JOBS=16 tools/dev_build.sh -DJAX_ARK_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The built kernels read back as SASS: no float -> byte conversion (the ptxas miscompile behind the
# first run's wrong 16-bit reductions). Runs without the GPU; needs cuobjdump (CUDA toolkit).
step sass 15 $PY -m pytest -v -rs tests/test_cuda_sass.py
# One step per GPU test file, cheapest bring-up first, so one hang cannot starve the others;
# --maxfail stops a systematic failure (every call timing out) early.
step pytest_gpu_runtime 100 $PY -m pytest -m gpu -v -rs --maxfail=20 --durations=10 \
  tests/test_gpu_xla_path.py tests/test_gpu_runtime.py
step pytest_gpu_persistent 90 $PY -m pytest -m gpu -v -rs --durations=10 tests/test_gpu_persistent.py \
  tests/test_persistent_int.py tests/test_persistent_loops.py tests/test_persistent_generate.py
# Put tasks of the persistent kernel: every rank of a group in one cooperative launch (group_run);
# ~20 s of planning and CPU references (measured without a GPU, under load), small kernels.
step pytest_gpu_persistent_comm 60 $PY -m pytest -m gpu -v -rs --maxfail=5 --durations=10 \
  tests/test_gpu_persistent_comm.py
step pytest_gpu_multiprocess 100 $PY -m pytest -m gpu -v -rs -s tests/test_gpu_multiprocess.py
if $PY -c "import jax_ark.bench" >/dev/null 2>&1; then
  # Put tasks overlapping matmul tiles: every rank on this one GPU, overlap efficiency per layer.
  step bench_overlap_gpu 60 $PY -m jax_ark.bench overlap --gpu --ranks 8 --iters 20 \
    --sizes 64x1024x4096 --out "$OUT"
  step bench_collectives 50 $PY -m jax_ark.bench collectives --out "$OUT"
  step bench_persistent 60 $PY -m jax_ark.bench persistent --out "$OUT"
else
  SUMMARY+=("SKIP  bench (no jax_ark.bench module)")
fi
# The KV-cache decode step benchmark (ARK_GPU_DECODE=1; its limit adds 90 s to the 600): ark's
# tokens checked against jax.jit's, then tokens/s of both and the weight-bytes floor.
if [ "${ARK_GPU_DECODE:-0}" = 1 ]; then
  step bench_decode 90 $PY -m jax_ark.bench decode --repeats 3 --out "$OUT"
fi
# Diagnostics of wrong collective results (ARK_GPU_DIAG=1; their limits add 150 s to the 600):
# every reduction of every dtype at counts 12340..12350 (odd and even) and 777/778, 2/4/8 ranks,
# three scratch shapes, compared bit for bit; each wrong one prints the indices, where they sit in
# the chunked protocol and the bits; then the memory checker on one case.
if [ "${ARK_GPU_DIAG:-0}" = 1 ]; then
  step collective_stress 60 $PY tools/collective_stress.py --reps 1
  SANITIZER=$(command -v compute-sanitizer || echo "$(dirname "$(command -v nvcc)")/compute-sanitizer")
  if [ -x "$SANITIZER" ]; then
    step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 9 \
      $PY tools/collective_stress.py --reps 1 --only "reduce_scatter bfloat16 n=2 count=12345"
  fi
fi

echo
echo "== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
