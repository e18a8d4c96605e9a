"""JAX's own collective tests, run with jax.lax's collectives replaced by jax_ark's.

The pinned ids (lax_suite_ids.txt) are the tests of jax 0.10.2's tests/ (shard_map_test.py,
pmap_test.py, batching_test.py, roofline_test.py and twelve more) that call at least one of psum,
pmax, pmin, pmean, all_gather, psum_scatter, ppermute, all_to_all and pass under jax.lax on 8 CPU
devices. Under vmap axis names ark has no fast path, so those calls exercise the fallback to
jax.lax; shard_map (and pmap, which runs on shard_map) tests run ark's own collectives (the
summary line says how many tests traced one).

jax's test code is not part of this project: it is read from a jax source tree at run time,
JAX_SOURCE_DIR (tools/fetch_jax_tests.sh fetches one; the PyPI sdist has no tests/), and this test
skips when there is none.

tests/lax_suite_plugin.py does the replacing (for the duration of each test) and logs, per test,
the outcome, how many ark collectives it traced and how many calls fell back to jax.lax.
docs/lax_compat.md lists the tests that fail under ark, with reasons (KNOWN_FAILURES below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

HERE = Path(__file__).resolve().parent
PINNED_JAX = "0.10.2"
DEADLINE_S = 900

# id -> why it fails under ark (also in docs/lax_compat.md).
_JAXPR_SHAPE = "asserts the primitives of jax.lax's psum transpose in the jaxpr"
KNOWN_FAILURES: dict[str, str] = {
    "tests/shard_map_test.py::ShardMapTest::test_fanin_psum_transposes_to_fanout": _JAXPR_SHAPE,
    "tests/shard_map_test.py::ShardMapTest::test_psum_with_implicit_fanout_self_transposes": (
        _JAXPR_SHAPE
    ),
    "tests/shard_map_test.py::ShardMapTest::test_rewrite_scan": _JAXPR_SHAPE,
    "tests/roofline_test.py::RooflineTest::test_one_sized_axis_collectives": (
        "traces a ppermute whose perm is out of range for its axis of size 1: jax.lax rejects it "
        "only when lowering (roofline never lowers), ark when tracing"
    ),
}
_NO_EXPORT = (
    "jax.export refuses custom calls without a compatibility guarantee; ark's collective is one"
)
for _poly in ("2*b1_", "2*b1_b2", "None", "b2"):
    KNOWN_FAILURES[
        f"tests/export_test.py::JaxExportTest::test_shard_map_collective_permute_poly_{_poly}"
    ] = _NO_EXPORT
_NO_ROOFLINE = "roofline has cost rules for jax.lax's collective primitives only, not ark's"
for _name in (
    "all_to_all",
    "grad_matmuls",
    "matmul_psum",
    "ppermute",
    "remat",
    "scalar_collectives",
):
    KNOWN_FAILURES[f"tests/roofline_test.py::RooflineTest::test_{_name}"] = _NO_ROOFLINE


def _pinned_ids() -> list[str]:
    lines = (HERE / "lax_suite_ids.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _test_files() -> list[str]:
    return sorted({i.split("::")[0] for i in _pinned_ids()})


def _source_dir() -> Path:
    raw = os.environ.get("JAX_SOURCE_DIR")
    if not raw:
        pytest.skip(
            "JAX_SOURCE_DIR is not set: point it at a jax source tree of the pinned release "
            f"(jax-v{PINNED_JAX}; `JAX_SOURCE_DIR=$(tools/fetch_jax_tests.sh)`)"
        )
    root = Path(raw)
    if (root / "shard_map_test.py").is_file():
        root = root.parent  # JAX_SOURCE_DIR named the tests/ folder itself
    missing = [f for f in _test_files() if not (root / f).is_file()]
    if missing:
        pytest.skip(f"JAX_SOURCE_DIR={raw} has no {', '.join(missing)}")
    return root


def test_jax_shard_map_suite_under_ark(tmp_path):
    root = _source_dir()
    if jax.__version__ != PINNED_JAX:
        pytest.skip(f"the pinned test ids are jax {PINNED_JAX}'s; this is jax {jax.__version__}")
    ids = _pinned_ids()
    log = tmp_path / "suite.jsonl"
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_ARK_LAX_SUITE_MODE="ark",
        JAX_ARK_LAX_SUITE_LOG=str(log),
        JAX_ARK_TIMEOUT_S="30",
    )
    env.pop("JAX_ARK_STRICT", None)
    # The plugin comes from this folder; jax_ark from wherever this process imports it.
    import jax_ark

    paths = [str(HERE), str(Path(jax_ark.__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "lax_suite_plugin", "-p", "no:cacheprovider"]
    cmd += ids
    proc = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )
    results = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            results[entry["id"]] = entry
    missing = [i for i in ids if i not in results]
    assert not missing, (
        f"{len(missing)} pinned tests did not run: {missing[:10]}\n{proc.stdout[-3000:]}"
    )
    passed = [i for i in ids if results[i]["outcome"] == "passed"]
    failed = {i: results[i].get("error", results[i]["outcome"]) for i in ids if i not in passed}
    on_ark = [i for i in passed if results[i]["ark_binds"] > 0]
    fell_back = [i for i in passed if results[i]["fallbacks"] > 0]
    print(
        f"jax {jax.__version__} ({len(_test_files())} test files): "
        f"{len(passed)}/{len(ids)} pinned tests "
        f"pass with jax_ark's collectives ({len(on_ark)} traced ark collectives; "
        f"{len(fell_back)} had a call fall back to jax.lax)"
    )
    unexpected = {i: e for i, e in failed.items() if i not in KNOWN_FAILURES}
    assert not unexpected, "failures not listed in docs/lax_compat.md:\n" + "\n".join(
        f"{i}: {e}" for i, e in unexpected.items()
    )
    assert len(passed) >= len(ids) - len(KNOWN_FAILURES)
