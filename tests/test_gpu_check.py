"""`python -m benchmarks.gpu_check --dry-run`: the lent-GPU check end to end here, on the CPU emulation, with the
modules the lent machine lacks (Ray, FastAPI, uvicorn, pykeops, keopscore) made unimportable: the prioritised GPU
selection really runs (through FakeCupy), results are written as they complete, a killed run keeps them, and a
missing carried wheel stops the check at once. Benchmark errors are measured against the benchmark's own float64
matmul-form reference, computed independently of kred."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0 and summary["ok"] and summary["status"] == "done", done.stdout + done.stderr
    assert [step["step"] for step in summary["steps"]] == ["priority", "bench", "tests", "sass"]
    assert len(list(tmp_path.iterdir())) <= 8            # what the device tool brings back

    tests = lines(tmp_path / "tests.jsonl")
    priority = [t for t in tests if t["step"] == "priority"]
    assert len(priority) >= 15 and all(t["outcome"] == "passed" for t in priority), priority
    assert {t["id"].split("::")[0] for t in priority} == {"tests/test_gpu_priority.py"}

    bench = json.loads((tmp_path / "bench.json").read_text())
    assert lines(tmp_path / "bench.jsonl") == json.loads(json.dumps(bench["records"], default=str))
    records = {(r["case"], r["dtype"], r["d"], r["impl"]): r for r in bench["records"]}
    assert all(r["status"].startswith("absent") for key, r in records.items() if key[3] == "pykeops")
    tolerance = {"float16": 5e-3, "float32": 1e-4, "float64": 1e-12}      # float32: the fast path's FAST_RTOL
    kred = [r for key, r in records.items() if key[3] == "kred"]
    assert {(r["case"], r["dtype"]) for r in kred} >= {("gaussian_sum", "float32"), ("gaussian_sum", "float16"),
                                                       ("gaussian_sum", "float64"), ("logsumexp", "float32"),
                                                       ("argkmin", "float32"), ("gaussian_sum_grad", "float32")}
    for r in kred:
        assert r["status"] == "ok" and r["error"] <= tolerance[r["dtype"]], r

    sass = json.loads((tmp_path / "sass.json").read_text())
    assert sass and all(row["kred_sass_per_pair"] > 0 and row["keops_sass_per_pair"] is None for row in sass)
    assert json.loads((tmp_path / "smi.json").read_text())["available"] is False


@pytest.mark.slow
def test_a_killed_run_keeps_what_it_had(tmp_path):
    """Killed (SIGKILL, the whole process group, as a device call past its limit is) after its first test result:
    tests.jsonl holds whole lines and summary.json is whole JSON saying the run had not finished."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--steps", "priority",
                                "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "tests.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (results.exists() and results.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            assert process.poll() is None, "the dry run ended before it was killed"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    tests = lines(results)
    assert len(tests) >= 2 and all(t["outcome"] == "passed" and t["step"] == "priority" for t in tests)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "running" and summary["ok"] is None


def test_a_missing_carried_wheel_stops_the_check(tmp_path, capsys):
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "platformdirs-4.3.6-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--carry", str(carry)]) == 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] is False and summary["steps"] == []
    assert "cachetools, pykeops, keopscore" in summary["status"] and "platformdirs" not in summary["status"]
    assert "missing carried wheels" in capsys.readouterr().err

