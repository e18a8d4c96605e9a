"""Running jax_ark from a source checkout without compiled modules says what to do.

From the checkout root Python imports the source folder `jax_ark/` ahead of any installed copy, and
that folder has no `_ark_cpu` module unless `tools/dev_build.sh` put one there. Each entry point a
newcomer tries there must fail with an error that names the fix, not a bare ModuleNotFoundError.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENTRY_POINTS = {
    "import": [sys.executable, "-c", "import jax_ark"],
    "demo": [sys.executable, "-m", "jax_ark", "demo"],
    "bench": [sys.executable, "-m", "jax_ark.bench", "collectives"],
}


@pytest.fixture(scope="module")
def bare_checkout(tmp_path_factory) -> Path:
    """A copy of the checkout's Python sources and pyproject.toml, without compiled modules."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / "pyproject.toml", root)
    shutil.copytree(
        ROOT / "jax_ark", root / "jax_ark", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    return root


def _run(cmd: list[str], cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_missing_backend_error_says_what_to_do(bare_checkout: Path, entry: str):
    result = _run(ENTRY_POINTS[entry], cwd=bare_checkout)
    assert result.returncode != 0, result.stdout
    err = result.stderr
    assert "No module named 'jax_ark._ark_cpu'" not in err, err
    assert "ImportError: jax_ark's compiled backend (jax_ark._ark_cpu) is not in" in err, err
    assert "source checkout" in err, err
    assert f"cd {bare_checkout} && tools/dev_build.sh -DJAX_ARK_CUDA=OFF" in err, err
    assert "from another directory" in err, err


def test_missing_backend_error_points_at_the_installed_copy(bare_checkout: Path, tmp_path: Path):
    # A pip-installed jax_ark elsewhere (its metadata is all the message reads), shadowed by the
    # checkout because the checkout is the working directory.
    site = tmp_path / "site-packages"
    info = site / "jax_ark-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax_ark\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("jax_ark/__init__.py,,\njax_ark-0.1.0.dist-info/METADATA,,\n")
    result = _run(ENTRY_POINTS["import"], cwd=bare_checkout, pythonpath=str(site))
    assert result.returncode != 0
    assert f"jax_ark is installed in {(site / 'jax_ark').resolve()}" in result.stderr, result.stderr
