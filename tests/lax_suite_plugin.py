"""pytest plugin for test_lax_suite.py: runs JAX's own tests with jax.lax's collectives replaced.

Loaded into a pytest run over JAX's test files (`-p lax_suite_plugin`). Environment:
- JAX_ARK_LAX_SUITE_MODE: "ark" replaces jax.lax.psum/pmax/pmin/pmean/all_gather/psum_scatter/
  ppermute/all_to_all by jax_ark's for the duration of each test; "lax" keeps jax.lax's (the
  baseline run), wrapped only to record which of them a test calls.
- JAX_ARK_LAX_SUITE_LOG: a file that receives one JSON line per test: its id, outcome, the
  collectives it called, how many ark collectives it traced and how many calls fell back to jax.lax.
"""

from __future__ import annotations

import json
import os

import jax
import pytest

COLLECTIVES = (
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
)

_MODE = os.environ.get("JAX_ARK_LAX_SUITE_MODE", "ark")
_LOG = os.environ.get("JAX_ARK_LAX_SUITE_LOG")
_current: dict = {}


@pytest.fixture(autouse=True)
def _substitute_collectives(monkeypatch):
    import jax_ark
    from jax_ark import _collective_primitive as prim
    from jax_ark import collectives

    _current.update(called=set(), ark_binds=0, fallbacks=0)
    monkeypatch.setattr(collectives, "_warned", set())
    for name in COLLECTIVES:
        impl = getattr(jax_ark if _MODE == "ark" else jax.lax, name)

        def wrapper(*args, _impl=impl, _name=name, **kwargs):
            _current["called"].add(_name)
            return _impl(*args, **kwargs)

        monkeypatch.setattr(jax.lax, name, wrapper)

    real_bind, real_fallback = prim.bind, collectives._fallback

    def counting_bind(*args, **kwargs):
        _current["ark_binds"] += 1
        return real_bind(*args, **kwargs)

    def counting_fallback(*args, **kwargs):
        _current["fallbacks"] += 1
        return real_fallback(*args, **kwargs)

    monkeypatch.setattr(prim, "bind", counting_bind)
    monkeypatch.setattr(collectives, "_fallback", counting_fallback)
    yield


def pytest_runtest_logreport(report):
    if _LOG is None:
        return
    # One line per test: the call phase's outcome, or the setup's when setup failed or skipped.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        entry = {
            "id": report.nodeid,
            "outcome": report.outcome,
            "called": sorted(_current.get("called", ())),
            "ark_binds": _current.get("ark_binds", 0),
            "fallbacks": _current.get("fallbacks", 0),
        }
        if report.outcome == "failed":
            entry["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
        with open(_LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
