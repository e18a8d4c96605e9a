#!/usr/bin/env bash
# Developer build: compile the extension modules with plain CMake and copy them into jax_ark/,
# so `PYTHONPATH=$PWD pytest` runs against this checkout without reinstalling.
# Usage: tools/dev_build.sh [extra cmake -D options], e.g. -DJAX_ARK_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${ARK_BUILD_DIR:-build/dev}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v python)" -DJAX_ARK_DEV_INPLACE=ON "$@"
cmake --build "$build_dir" -j "${ARK_BUILD_JOBS:-2}"
