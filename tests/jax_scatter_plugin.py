"""pytest plugin for tests/test_jax_scatter_suite.py: inside JAX's own test files, every
`_CompileAndCheck(fun, args_maker)` checks `ark.persistent(fun)` against `jax.jit(fun)` on the
test's own inputs, with the test's own tolerances. A function ark refuses (UnsupportedError)
skips with the reason. JAX_ARK_FORCE_FOLD=1 sends every scatter through the scatter fold (the
planner's limit of 16 unrolled points set to 0). At the end, one line of JSON: how many checks
went through ark and how many of their plans held a scatter fold."""

from __future__ import annotations

import json
import os

import jax
import pytest
from jax._src import test_util as jtu

import jax_ark as ark
from jax_ark._persistent import _trace
from jax_ark._persistent._trace import UnsupportedError

CHECKED = {"ark": 0, "folds": 0}
if os.environ.get("JAX_ARK_FORCE_FOLD"):
    _trace._SCATTER_MAX_POINTS = 0


def _compile_and_check(self, fun, args_maker, *, check_dtypes=True, tol=None, rtol=None,
                       atol=None, **_):  # fmt: skip
    args = args_maker()
    want = jax.jit(fun)(*args)
    try:
        plan = ark.plan(fun, *args)
        got = ark.persistent(fun)(*args)
    except UnsupportedError as e:
        pytest.skip(f"ark refused: {str(e).splitlines()[0][:200]}")
    CHECKED["ark"] += 1
    CHECKED["folds"] += any(op.scatter_fold for op in plan.ops)
    self.assertAllClose(got, want, check_dtypes=check_dtypes, atol=atol or tol, rtol=rtol or tol)


jtu.JaxTestCase._CompileAndCheck = _compile_and_check


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("ARK_SCATTER_SUITE " + json.dumps(CHECKED))
