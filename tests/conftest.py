"""Test-wide settings, and the Triton interpreter's child process.

The tests' populations are tiny: a second torch thread costs more in
synchronisation than it gains, and on a shared 2-core machine it can stall
behind another process (a 1 ms step measured at up to 260 ms).

Tests that need the Triton interpreter (tests/kernels/, tests/test_conformance.py)
run in one child process.

Tests that take the ``interpreted`` fixture execute the Triton kernels on CPU
tensors with TRITON_INTERPRET=1. Triton fixes, when it decorates a function
(its own standard library included, at ``import triton``), whether the
function is compiled or interpreted, so the variable must be set before
Triton is first imported, and a process that has imported Triton normally
(the AOT compile test, other tests) cannot interpret. So the first such test
runs all of them in a fresh ``python -m pytest`` with the variable set (one
process start, a few seconds), and each test reports its own result from
that run. The variable never reaches this process or other tests.

Inside that child process (TRITON_INTERPRET=1 already set) the tests simply
run, and ``interpreted`` is a namespace of the modules under test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_results: dict[str, tuple[str, str]] | None = None


def _uses_interpreter(item) -> bool:
    return "interpreted" in getattr(item, "fixturenames", ())


def _run_in_interpreter(items, rootdir: str) -> dict[str, tuple[str, str]]:
    """nodeid -> (passed / failed / skipped, the failure text or skip reason) of ``items``
    run in a child pytest with TRITON_INTERPRET=1."""
    nodeids = [item.nodeid for item in items]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", *nodeids],
            cwd=rootdir, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
        if not os.path.exists(report):
            raise RuntimeError(f"the interpreter test process wrote no report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        cases = {}
        for case in ET.parse(report).iter("testcase"):
            path = case.get("classname").replace(".", "/") + ".py"
            problems = [el for el in case if el.tag in ("failure", "error")]
            skipped = [el.get("message") for el in case if el.tag == "skipped"]
            text = "\n".join(f"{el.tag}: {el.get('message')}\n{el.text or ''}" for el in problems)
            cases[f"{path}::{case.get('name')}"] = ("failed" if problems else "skipped" if skipped else "passed",
                                                    text or "; ".join(skipped))
    return cases


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if INTERPRETING or not _uses_interpreter(pyfuncitem):
        return None
    global _results
    if _results is None:
        items = [item for item in pyfuncitem.session.items if _uses_interpreter(item)]
        _results = _run_in_interpreter(items, str(pyfuncitem.config.rootpath))
    outcome, text = _results.get(pyfuncitem.nodeid, ("failed", "the interpreter test process did not report this test"))
    if outcome == "skipped":
        pytest.skip(text)
    if outcome == "failed":
        pytest.fail(f"in the TRITON_INTERPRET=1 process:\n{text}", pytrace=False)
    return True


@pytest.fixture
def interpreted():
    """The modules under test, run by the Triton interpreter (None outside the child process)."""
    if not INTERPRETING:
        return None
    import fastgrok.backends.triton_engine
    import fastgrok.kernels.adamw
    import fastgrok.kernels.examples
    import fastgrok.kernels.layout
    import fastgrok.kernels.reduce
    import fastgrok.kernels.tables_backward
    import fastgrok.kernels.tables_forward

    k = fastgrok.kernels
    return SimpleNamespace(engine=fastgrok.backends.triton_engine, layout=k.layout, tables_forward=k.tables_forward,
                           tables_backward=k.tables_backward, examples=k.examples, adamw=k.adamw, reduce=k.reduce)


torch.set_num_threads(1)
