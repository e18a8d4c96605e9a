"""JAX's own scatter, indexed-update and segment-reduction tests (tests/lax_test.py `Scatter*`,
tests/lax_numpy_indexing_test.py `IndexedUpdate*` / `Segment*`) with each checked function run by
ark.persistent and compared with jax.jit (tests/jax_scatter_plugin.py): once as planned (up to
16 points unrolled, more as a scatter fold) and once with every scatter forced through the fold.

jax's test code is read from a jax source tree at run time (JAX_SOURCE_DIR, as for
tests/test_lax_suite.py; tools/fetch_jax_tests.sh fetches one); without one this test skips.
Refused, and skipped with the reason: complex dtypes and lax.scatter_apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = ("tests/lax_test.py", "tests/lax_numpy_indexing_test.py")


@pytest.mark.slow
@pytest.mark.parametrize("force_fold", [False, True], ids=["as_planned", "all_folds"])
def test_jax_scatter_tests_under_ark(force_fold):
    raw = os.environ.get("JAX_SOURCE_DIR")
    if not raw:
        pytest.skip("JAX_SOURCE_DIR is not set (`JAX_SOURCE_DIR=$(tools/fetch_jax_tests.sh)`)")
    root = Path(raw)
    root = root.parent if (root / "lax_test.py").is_file() else root
    if not all((root / f).is_file() for f in FILES):
        pytest.skip(f"JAX_SOURCE_DIR={raw} has no {' / '.join(FILES)}")
    import jax_ark

    env = dict(os.environ, JAX_NUM_GENERATED_CASES="40")
    env.pop("JAX_ARK_FORCE_FOLD", None)
    if force_fold:
        env["JAX_ARK_FORCE_FOLD"] = "1"
    paths = [str(HERE), str(Path(jax_ark.__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "jax_scatter_plugin",
        "-p",
        "no:cacheprovider",
    ]
    cmd += [*FILES, "-k", "Scatter or IndexedUpdate or Segment"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ARK_SCATTER_SUITE "))
    checked = json.loads(line.split(" ", 1)[1])
    # jax 0.10.2 with 40 generated cases: 420 checks through ark, 369 of them folds when forced
    assert checked["ark"] >= 300, proc.stdout[-2000:]
    if force_fold:
        assert checked["folds"] >= 300, checked
