"""pykeops 2.3's own test files, run unmodified on kred through the drop-in (issue 21: nothing left that they need).

The files ship in pykeops's wheel (`pykeops/test/`, installed here by the `bench` extra as the benchmark peer). They
are copied into a temporary folder beside a conftest.py that calls `kred.compat.install_as_pykeops()` and run by
pytest in a child process, so every `import pykeops` in them is kred. Each compares kred's results with its own dense
numpy or torch computation. The only tests that may skip are pykeops's GPU-only ones (its own `skipif` on
`torch.cuda.is_available()`); there is no GPU here.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

CONFTEST = "import kred.compat\n\nkred.compat.install_as_pykeops()\n"


def pykeops_tests() -> Path:
    spec = importlib.util.find_spec("pykeops")         # found without importing it (its import probes CUDA)
    assert spec is not None and spec.origin, "pykeops is a development dependency (the 'bench' extra)"
    folder = Path(spec.origin).parent / "test"
    assert folder.is_dir(), f"pykeops's wheel has no test folder at {folder}"
    return folder


def test_pykeops_own_test_files_pass_on_kred(tmp_path):
    suite = tmp_path / "pykeops_tests"
    shutil.copytree(pykeops_tests(), suite, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (suite / "conftest.py").write_text(CONFTEST)
    report = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "-o",
         "addopts=", "--rootdir", str(suite), str(suite)],
        cwd=suite, capture_output=True, text=True, timeout=540, env={**os.environ, "MPLBACKEND": "Agg"})
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    cases = list(ET.parse(report).getroot().iter("testcase"))
    outcome = {}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[name] = (kinds[0] if kinds else "passed", case)
    broken = {name: case.find(kind).get("message", "")[:300] for name, (kind, case) in outcome.items()
              if kind in ("failure", "error")}
    assert not broken, f"pykeops tests failing on kred: {broken}\n{run.stdout[-3000:]}"
    skipped = {name: case.find("skipped").get("message", "") for name, (kind, case) in outcome.items()
               if kind == "skipped"}
    assert all("GPU" in why for why in skipped.values()), f"skipped for another reason than a GPU: {skipped}"
    passed = [name for name, (kind, _) in outcome.items() if kind == "passed"]
    # every file of the suite ran (a collection error would have shown above; this catches a silently empty one)
    files = {p.stem for p in suite.glob("test_*.py")}
    ran = {part for name in passed for part in name.split("::")[0].split(".") if part in files}
    assert files - ran <= {"test_float16"}, f"files with no passing test: {sorted(files - ran)}"   # GPU-only file
    assert len(passed) >= 70, f"only {len(passed)} pykeops tests passed"
    assert run.returncode == 0, run.stdout[-3000:]
