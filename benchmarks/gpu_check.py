"""One GPU check for a lent machine: the GPU tests, the benchmark, the SASS summary and nvidia-smi samples, as JSON.

    make gpu-carry                                    # here, once: pure-Python wheels the lent machine lacks
    python3 -m benchmarks.gpu_check --out "$OUT"      # there, from the source tree (no network, no install)
    python -m benchmarks.gpu_check --dry-run --out /tmp/check     # here, end to end on the CPU emulation

The lent machine (see the device tool's notes) has Python 3.12, torch with CUDA 13, cupy-cuda13x, cuda-bindings,
NVRTC, cuobjdump and nvidia-smi, but no network and no Ray, FastAPI, uvicorn, platformdirs, cachetools, pykeops or
keopscore. kred's engine needs only numpy, filelock, platformdirs and cachetools: the last two travel as wheels in
the ignored folder `.carry/` (`make gpu-carry`), put on the path as they are (pure-Python wheels import from the zip).
The GPU tests are the files listed in `GPU_TEST_FILES`, run with `-m gpu`, so modules that need Ray or FastAPI are
never collected. Everything runs in subprocesses under one time budget (default 7.5 minutes; each step gets what is
left, less what the steps after it reserve), while `nvidia-smi` samples clocks, power and load in the background.

Written under --out (at most 8 files, as the device tool brings back): summary.json (each step: command, exit code,
seconds, output tail), environment.json, tests.json (pytest's outcome per test), bench.json (benchmarks.bench_gpu),
sass.json (benchmarks.gpu_static), smi.json (the samples).

--dry-run runs the same steps here: CuPy is replaced by tests/cuda_emulation.py's emulation (kernels compiled by NVRTC
and run on the CPU), torch tensors stay on the CPU, sizes are tiny, and the modules absent on the lent machine are
made unimportable, so a step that would need one fails here as it would there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"

# The test files whose `gpu`-marked tests run there: the CUDA backend's own, and the shared suites parametrized over
# every backend present (their "cuda" parameter is marked gpu). None of them imports Ray, FastAPI or httpx.
GPU_TEST_FILES = ("tests/test_cuda_gpu.py", "tests/test_ops.py", "tests/test_reductions.py",
                  "tests/test_genred_numpy.py", "tests/test_torch_genred.py", "tests/test_lazytensor.py",
                  "tests/test_ranges.py", "tests/test_batch.py", "tests/test_kernel_solve.py",
                  "tests/test_autodiff.py")
ABSENT_THERE = ("ray", "fastapi", "uvicorn", "pykeops", "keopscore")     # hidden in the dry run
SMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used"

# A stand-in `cupy` package for the dry run: the emulation's FakeCupy as a module, and a visible "GPU".
_FAKE_CUPY = '''
import sys
sys.path.insert(0, {tests!r})
import cuda_emulation
_fake = cuda_emulation.FakeCupy(sm_count=4)
_fake.cuda.runtime.getDeviceProperties = lambda device: {{"name": b"CPU emulation", "major": 9, "minor": 0,
                                                          "multiProcessorCount": 4, "totalGlobalMem": 0}}
globals().update({{k: v for k, v in vars(_fake).items() if not k.startswith("_")}})
__version__ = "emulated"
import kred.engine.backends.cuda as _backend
_backend.gpu_count = lambda: 1
'''


def environment(dry_run: bool, scratch: Path) -> dict:
    """The subprocesses' environment: the source tree and the carried wheels on the path, a fresh kernel cache."""
    paths = [str(ROOT)] + sorted(str(wheel) for wheel in CARRY.glob("*.whl"))
    if dry_run:
        stubs = scratch / "stubs"
        for name in ABSENT_THERE:
            (stubs / name).mkdir(parents=True, exist_ok=True)
            (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on the lent machine')\n")
        (stubs / "cupy").mkdir(exist_ok=True)
        (stubs / "cupy" / "__init__.py").write_text(_FAKE_CUPY.format(tests=str(ROOT / "tests")))
        paths.insert(0, str(stubs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
               KRED_CACHE_DIR=str(scratch / "kernels"), RAY_AUTH_MODE="disabled")
    return env


def steps(out: Path, scratch: Path, dry_run: bool, env: dict) -> list[tuple[str, list[str], float]]:
    """(name, command, seconds reserved for it) in order."""
    python = sys.executable
    tests = [python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-m", "gpu", "--timeout", "300",
             f"--junitxml={scratch / 'tests.xml'}", *GPU_TEST_FILES]
    bench = [python, "-m", "benchmarks.bench_gpu", "--out", str(out / "bench.json"), "--reps", "5",
             "--budget-s", "3", "--max-seconds", "20"]
    if dry_run:
        bench += ["--sizes", "48", "--tensors", "cpu", "--reps", "1"]
    sass = [python, "-m", "benchmarks.gpu_static", "--json"]
    if not _importable("keopscore", env):
        sass.append("--no-keops")
    return [("tests", tests, 200), ("bench", bench, 180), ("sass", sass, 40)]


def _importable(name: str, env: dict) -> bool:
    """Whether the steps' Python imports `name` (in the dry run, the modules absent there are not)."""
    return subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0


class Sampler:
    """`nvidia-smi` queried every `period_s` in the background (when there is one), parsed into records."""

    def __init__(self, path: Path, period_s: float = 1.0):
        self.path, self.process = path, None
        tool = shutil.which("nvidia-smi")
        if tool:
            self.file = open(path, "w")
            self.process = subprocess.Popen([tool, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
                                             f"-lms={int(period_s * 1000)}"], stdout=self.file,
                                            stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        if self.process is None:
            return {"available": False, "samples": []}
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.file.close()
        names = SMI_FIELDS.split(",")
        samples = [dict(zip(names, (v.strip() for v in line.split(","))))
                   for line in self.path.read_text().splitlines() if line.count(",") == len(names) - 1]
        return {"available": True, "fields": names, "samples": samples}


def run_step(name: str, command: list[str], env: dict, timeout_s: float) -> tuple[dict, str]:
    """Run one step within `timeout_s`: its record for summary.json, and its standard output."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
        rc, stdout, output = done.returncode, done.stdout, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, output = 124, stdout + f"\n(timed out after {timeout_s:.0f} s)"
    seconds = round(time.monotonic() - start, 1)
    print(f"# {name}: exit {rc} in {seconds} s", flush=True)
    return {"step": name, "command": command, "rc": rc, "seconds": seconds, "output_tail": output[-4000:]}, stdout


def test_outcomes(junit: Path) -> dict:
    """pytest's junit XML as {"counts": {...}, "tests": [{"id", "outcome", "seconds", "message"}]}."""
    if not junit.exists():
        return {"counts": {}, "tests": []}
    tests = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:500]
        tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def versions(env: dict) -> dict:
    """Versions as the subprocesses see them (the carried wheels included) and the GPU as nvidia-smi names it."""
    probe = ("import json, importlib.metadata as m, sys\n"
             "out = {'python': sys.version.split()[0]}\n"
             "for name in ('numpy', 'torch', 'cupy-cuda13x', 'cupy-cuda12x', 'cuda-bindings', 'nvidia-cuda-nvrtc',\n"
             "             'nvidia-cuda-nvrtc-cu12', 'platformdirs', 'cachetools', 'filelock', 'pykeops', 'keopscore'):\n"
             "    try: out[name] = m.version(name)\n"
             "    except m.PackageNotFoundError: out[name] = None\n"
             "try:\n"
             "    from kred.engine.backends import nvrtc; out['nvrtc'] = '%d.%d' % nvrtc.version()\n"
             "except Exception as e: out['nvrtc'] = repr(e)\n"
             "import torch; out['torch_cuda'] = torch.version.cuda; out['torch_gpu'] = torch.cuda.is_available()\n"
             "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    info = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    tool = shutil.which("nvidia-smi")
    if tool:
        query = subprocess.run([tool, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = query.stdout.strip().splitlines()
    info["carried_wheels"] = sorted(wheel.name for wheel in CARRY.glob("*.whl"))
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu-check"))
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall time for everything (default 7.5 min)")
    parser.add_argument("--dry-run", action="store_true", help="here, on the CPU emulation, tiny sizes")
    parser.add_argument("--steps", default="tests,bench,sass", help="comma-separated subset of the steps")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kred-gpu-check-") as scratch_dir:
        scratch = Path(scratch_dir)
        env = environment(args.dry_run, scratch)
        sampler = Sampler(scratch / "smi.csv")
        (out / "environment.json").write_text(json.dumps(versions(env), indent=1))
        planned = [step for step in steps(out, scratch, args.dry_run, env) if step[0] in args.steps.split(",")]
        results = []
        for k, (name, command, _) in enumerate(planned):
            later = sum(reserve for _, _, reserve in planned[k + 1:])
            record, stdout = run_step(name, command, env, deadline - time.monotonic() - later)
            results.append(record)
            if name == "sass" and record["rc"] == 0:
                (out / "sass.json").write_text(stdout)
        (out / "tests.json").write_text(json.dumps(test_outcomes(scratch / "tests.xml"), indent=1))
        (out / "smi.json").write_text(json.dumps(sampler.stop(), indent=1))
    ok = all(result["rc"] == 0 for result in results)
    (out / "summary.json").write_text(json.dumps({"dry_run": args.dry_run, "ok": ok, "steps": results,
                                                  "budget_s": args.budget_s}, indent=1))
    print(f"# {'ok' if ok else 'FAILED'}: wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
