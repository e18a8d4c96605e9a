"""Environment for the tests' worker subprocesses: they must import jax_ark from where the test
process did. In CI the package is installed and the checkout's jax_ark/ folder has no compiled
modules, so a checkout first on the path (PYTHONPATH, or the working directory of `python -c`)
would shadow the installed package."""

from __future__ import annotations

import os
from pathlib import Path

import jax_ark

TESTS_DIR = str(Path(__file__).resolve().parent)


def subprocess_env(**overrides: str) -> dict[str, str]:
    """os.environ with jax_ark's own parent folder, then tests/, first on PYTHONPATH. Run
    `python -c` children with cwd=TESTS_DIR: their working directory comes first on sys.path."""
    package_parent = str(Path(jax_ark.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, TESTS_DIR, env.get("PYTHONPATH")) if p
    )
    env.update(overrides)
    return env
