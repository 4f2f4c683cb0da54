"""Run another project's own pytest files unmodified on kred: a conftest.py at the suite's root installs the pykeops
drop-in (kred.compat.install_as_pykeops) before the files import anything, pytest runs in a child process, and its
JUnit report gives each case's outcome. Used by test_pykeops_suite.py and test_client_suites.py."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the drop-in, and a record of which pykeops the suite imported (to prove it ran on kred, not on a real pykeops)
CONFTEST = """import sys

import kred.compat

# KRED_PYKEOPS (set by run_suite): "1" in process, or a kred server's URL for the drop-in to compute on
assert kred.compat.install_from_environment()


def pytest_sessionfinish(session):
    module = sys.modules.get("pykeops")
    with open({record!r}, "w") as f:
        f.write("never imported" if module is None else "kred" if getattr(module, "__kred__", False) else "not kred")
"""


def run_suite(root: Path, targets: list[str], report_dir: Path, extra: list[str] = (), timeout: int = 540,
              pythonpath: Path | None = None, server: str | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Run pytest on `targets` (paths under `root`) with the drop-in: {test id: (outcome, message)} where outcome is
    passed, failure, error or skipped, and the finished process. `pythonpath` goes first on the path (a source
    distribution whose tests import their package); with `server` (a URL) the drop-in computes there."""
    record = report_dir / "pykeops-module.txt"
    (root / "conftest.py").write_text(CONFTEST.format(record=str(record)))
    report = report_dir / "junit.xml"
    env = {**os.environ, "MPLBACKEND": "Agg", "KRED_PYKEOPS": server or "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "-o", "addopts=",
         "--rootdir", str(root), *extra, *targets],
        cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    assert record.exists() and record.read_text() == "kred", \
        f"the suite did not run on kred's pykeops: {record.read_text() if record.exists() else 'no record'}"
    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[name] = (kinds[0].tag, kinds[0].get("message", "")[:300]) if kinds else ("passed", "")
    return outcome, run


def broken(outcome: dict) -> dict:
    return {name: message for name, (kind, message) in outcome.items() if kind in ("failure", "error")}


def skipped(outcome: dict) -> dict:
    return {name: message for name, (kind, message) in outcome.items() if kind == "skipped"}


def passed(outcome: dict) -> list[str]:
    return [name for name, (kind, _) in outcome.items() if kind == "passed"]
