"""pykeops 2.3's own test files, run unmodified on kred through the drop-in (issue 21: nothing left that they need).

The files ship in pykeops's wheel (`pykeops/test/`, installed here by the `bench` extra as the benchmark peer). They
are copied into a temporary folder beside a conftest.py that calls `kred.compat.install_as_pykeops()` and run by
pytest in a child process, so every `import pykeops` in them is kred. Each compares kred's results with its own dense
numpy or torch computation. The only tests that may skip are pykeops's GPU-only ones (its own `skipif` on
`torch.cuda.is_available()`); there is no GPU here.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from foreign_suite import broken, passed, run_suite, skipped


def pykeops_tests() -> Path:
    spec = importlib.util.find_spec("pykeops")         # found without importing it (its import probes CUDA)
    assert spec is not None and spec.origin, "pykeops is a development dependency (the 'bench' extra)"
    folder = Path(spec.origin).parent / "test"
    assert folder.is_dir(), f"pykeops's wheel has no test folder at {folder}"
    return folder


def test_pykeops_own_test_files_pass_on_kred(tmp_path):
    suite = tmp_path / "pykeops_tests"
    shutil.copytree(pykeops_tests(), suite, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    outcome, run = run_suite(suite, [str(suite)], tmp_path)
    assert not broken(outcome), f"pykeops tests failing on kred: {broken(outcome)}\n{run.stdout[-3000:]}"
    assert all("GPU" in why for why in skipped(outcome).values()), \
        f"skipped for another reason than a GPU: {skipped(outcome)}"
    # every file of the suite ran (a collection error would have shown above; this catches a silently empty one)
    files = {p.stem for p in suite.glob("test_*.py")}
    ran = {part for name in passed(outcome) for part in name.split("::")[0].split(".") if part in files}
    assert files - ran <= {"test_float16"}, f"files with no passing test: {sorted(files - ran)}"   # GPU-only file
    assert len(passed(outcome)) >= 70, f"only {len(passed(outcome))} pykeops tests passed"
    assert run.returncode == 0, run.stdout[-3000:]
