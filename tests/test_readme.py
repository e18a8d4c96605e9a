"""Every ```python block of README.md runs as pasted, each in a fresh interpreter.

The environment is stripped of the virtual-device setup this test session made (conftest.py), so
a snippet that needs 8 devices must set them up itself, as a newcomer pasting it would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _snippets() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def test_readme_has_python_snippets():
    assert len(_snippets()) >= 2, "README.md lost its ```python examples"


@pytest.mark.parametrize(
    ("line", "code"), _snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_snippet_runs(line: int, code: str, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code)
    # The working directory is a scratch folder: files the snippet writes land there, and the
    # checkout's source folder is not what `import jax_ark` finds unless PYTHONPATH says so.
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, (
        f"README.md snippet at line {line} failed:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
