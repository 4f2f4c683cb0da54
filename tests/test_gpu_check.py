"""`python -m benchmarks.gpu_check --dry-run`: the lent-GPU check end to end here, on the CPU emulation, with the
modules the lent machine lacks (Ray, FastAPI, uvicorn, pykeops, keopscore) made unimportable. Its benchmark errors
are measured against the benchmark's own float64 matmul-form reference, computed independently of kred."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0 and summary["ok"], done.stdout + done.stderr
    assert [step["step"] for step in summary["steps"]] == ["tests", "bench", "sass"]
    assert len(list(tmp_path.iterdir())) <= 8            # what the device tool brings back

    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["counts"].get("skipped", 0) > 0 and not tests["counts"].get("failed") \
        and not tests["counts"].get("error")             # collected without Ray/FastAPI; no GPU here

    bench = json.loads((tmp_path / "bench.json").read_text())
    records = {(r["case"], r["dtype"], r["d"], r["impl"]): r for r in bench["records"]}
    assert all(r["status"].startswith("absent") for key, r in records.items() if key[3] == "pykeops")
    tolerance = {"float16": 5e-3, "float32": 1e-5, "float64": 1e-12}
    kred = [r for key, r in records.items() if key[3] == "kred"]
    assert {(r["case"], r["dtype"]) for r in kred} >= {("gaussian_sum", "float32"), ("gaussian_sum", "float16"),
                                                       ("gaussian_sum", "float64"), ("logsumexp", "float32"),
                                                       ("argkmin", "float32"), ("gaussian_sum_grad", "float32")}
    for r in kred:
        assert r["status"] == "ok" and r["error"] <= tolerance[r["dtype"]], r
    assert bench["machine"]["gpu_device"]["clock_khz"] is None         # no clockRate: recorded as unknown

    sass = json.loads((tmp_path / "sass.json").read_text())
    assert sass and all(row["kred_sass_per_pair"] > 0 and row["keops_sass_per_pair"] is None for row in sass)
    assert json.loads((tmp_path / "smi.json").read_text())["available"] is False
