#!/usr/bin/env bash
# Fetches JAX's own test files (tests/ of the jax release that the pinned lax-suite ids belong to)
# for tests/test_lax_suite.py, and prints the directory to pass as JAX_SOURCE_DIR.
# The jax sdist on PyPI carries no tests/, so they come from the release tag on GitHub.
# Usage: JAX_SOURCE_DIR=$(tools/fetch_jax_tests.sh [DEST]) pytest tests/test_lax_suite.py
set -euo pipefail
tag=${JAX_TESTS_TAG:-jax-v0.10.2}
dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/jax_ark/jax-src-${tag}}
if [ ! -f "$dest/tests/shard_map_test.py" ]; then
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  git clone -q --depth 1 --branch "$tag" --filter=blob:none --sparse \
    https://github.com/jax-ml/jax.git "$dest" >&2
  git -C "$dest" sparse-checkout set tests >&2
fi
echo "$dest"
