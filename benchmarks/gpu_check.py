"""One GPU check for a lent machine: a prioritised test selection, the benchmark, the full GPU tests, the SASS
summary and nvidia-smi samples, each result written as it completes.

    make gpu-carry                                    # here, once: the wheels the lent machine lacks, in .carry/
    python3 -m benchmarks.gpu_check --out "$OUT"      # there, from the source tree (no network, no install)
    python -m benchmarks.gpu_check --dry-run --out /tmp/check     # here, end to end on the CPU emulation

The lent machine (see the device tool's notes) has Python 3.12, torch with CUDA 13, cupy-cuda13x, cuda-bindings,
NVRTC, nvcc, cuobjdump, pybind11 and nvidia-smi, but no network and no Ray, FastAPI, uvicorn, platformdirs,
cachetools, pykeops or keopscore. kred's engine needs only numpy, filelock, platformdirs and cachetools; the
benchmark's KeOps column needs pykeops and keopscore (pure Python; keopscore compiles its kernels with the CUDA
toolkit there). They travel as wheels in the ignored folder `.carry/` (`make gpu-carry`; the device call must name
`.carry` in `carry`), unpacked into a scratch folder on the path (a pure-Python wheel unpacked is installed). A
missing one stops the check at once with exit code 2 and says which: without them every step would fail on import.

Steps, in order, each in a subprocess under one time budget (default 7.5 minutes; each step gets what is left, less
what the steps after it reserve):
  priority  tests/test_gpu_priority.py: one case per kernel family, dtype and scheme (a few dozen NVRTC modules), so
            that even a short lease says whether every kernel is right;
  bench     benchmarks.bench_gpu (kred, torch and KeOps in the same run), one JSON line per case as it is measured;
  tests     the `gpu`-marked tests of `GPU_TEST_FILES` (~600, of which whatever fits), modules needing Ray or
            FastAPI never collected;
  sass      benchmarks.gpu_static.

Written under --out (at most 8 files, as the device tool brings back), each as soon as it is known, so a run killed
at any point still returns what it had: summary.json (rewritten after every step: command, exit code, seconds,
output tail), environment.json, tests.jsonl (one line per test of the two test steps, as pytest reports it, flushed),
bench.jsonl (one line per benchmark case) and bench.json (the whole table, at the end of that step), sass.json,
smi.json (the samples).

--dry-run runs the same steps here: CuPy is replaced by tests/cuda_emulation.py's emulation (kernels compiled by NVRTC
and run on the CPU) and tests see an emulated GPU (KRED_GPU_EMULATED=1), so the priority selection really runs; torch
tensors stay on the CPU, benchmark sizes are tiny, the full test step only collects, and the modules absent on the
lent machine are made unimportable, so a step that would need one fails here as it would there.
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
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
CARRIED = ("platformdirs", "cachetools", "pykeops", "keopscore")   # wheels the lent machine needs (make gpu-carry)
PRIORITY_TESTS = ("tests/test_gpu_priority.py",)

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


def missing_wheels(carry: Path) -> list[str]:
    """The carried wheels (CARRIED) not in `carry`."""
    present = {wheel.name.split("-")[0].lower().replace("_", "-") for wheel in carry.glob("*.whl")}
    return [name for name in CARRIED if name not in present]


def environment(dry_run: bool, scratch: Path, carry: Path = CARRY) -> dict:
    """The subprocesses' environment: the source tree and the carried wheels on the path, a fresh kernel cache."""
    # carried wheels unpacked (a pure-Python wheel is its installed form): keopscore reads its C++ sources as files
    site = scratch / "site"
    for wheel in sorted(carry.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    paths = [str(ROOT)] + ([str(site)] if site.exists() else [])
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
    if dry_run:
        env["KRED_GPU_EMULATED"] = "1"
    return env


def steps(out: Path, scratch: Path, dry_run: bool, env: dict) -> list[tuple[str, list[str], float]]:
    """(name, command, seconds reserved for it) in order."""
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check", "-m", "gpu",
              "--timeout", "120"]
    priority = pytest + [*PRIORITY_TESTS]
    tests = pytest + [*GPU_TEST_FILES] + (["--collect-only"] if dry_run else [])
    bench = [python, "-m", "benchmarks.bench_gpu", "--out", str(out / "bench.json"), "--jsonl", str(out / "bench.jsonl"),
             "--reps", "5", "--budget-s", "3", "--max-seconds", "20"]
    if dry_run:
        bench += ["--sizes", "48", "--tensors", "cpu", "--reps", "1"]
    sass = [python, "-m", "benchmarks.gpu_static", "--json"]
    if not _importable("keopscore", env):
        sass.append("--no-keops")
    return [("priority", priority, 120), ("bench", bench, 150), ("tests", tests, 30), ("sass", sass, 30)]


# A pytest plugin (`-p benchmarks.gpu_check`): each test's outcome appended to $KRED_GPU_CHECK_JSONL as it is known.
def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("KRED_GPU_CHECK_JSONL")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return                          # one line per test: its call, or the setup/teardown that failed or skipped
    message = ""
    if report.outcome != "passed":
        message = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)[-500:]
    record = {"step": os.environ.get("KRED_GPU_CHECK_STEP"), "id": report.nodeid, "when": report.when,
              "outcome": report.outcome, "seconds": round(report.duration, 3), "message": message}
    append_line(Path(path), record)


def append_line(path: Path, record: dict) -> None:
    """One JSON line, flushed to the disk: a run killed right after still has it."""
    with open(path, "a") as file:
        file.write(json.dumps(record, default=str) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_json(path: Path, value) -> None:
    """Replace `path` atomically: a reader (or a kill) never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str))
    os.replace(partial, path)


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
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu-check"))
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall time for everything (default 7.5 min)")
    parser.add_argument("--dry-run", action="store_true", help="here, on the CPU emulation, tiny sizes")
    parser.add_argument("--steps", default="priority,bench,tests,sass", help="comma-separated subset of the steps")
    parser.add_argument("--carry", default=str(CARRY), help="the folder of carried wheels (default .carry)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out, carry = Path(args.out), Path(args.carry)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dry_run": args.dry_run, "ok": None, "status": "running", "budget_s": args.budget_s,
               "carried_wheels": sorted(wheel.name for wheel in carry.glob("*.whl")), "steps": []}
    missing = [] if args.dry_run else missing_wheels(carry)
    if missing:
        summary.update(ok=False, status=f"missing carried wheels: {', '.join(missing)} (run `make gpu-carry` here "
                                        f"and name .carry in the device call's carry)")
        write_json(out / "summary.json", summary)
        print(f"# FAILED: {summary['status']}", file=sys.stderr)
        return 2
    write_json(out / "summary.json", summary)
    with tempfile.TemporaryDirectory(prefix="kred-gpu-check-") as scratch_dir:
        scratch = Path(scratch_dir)
        env = environment(args.dry_run, scratch, carry)
        env["KRED_GPU_CHECK_JSONL"] = str(out / "tests.jsonl")
        sampler = Sampler(scratch / "smi.csv")
        write_json(out / "environment.json", versions(env) | {"carried_wheels": summary["carried_wheels"]})
        planned = [step for step in steps(out, scratch, args.dry_run, env) if step[0] in args.steps.split(",")]
        for k, (name, command, _) in enumerate(planned):
            later = sum(reserve for _, _, reserve in planned[k + 1:])
            record, stdout = run_step(name, command, env | {"KRED_GPU_CHECK_STEP": name},
                                      deadline - time.monotonic() - later)
            summary["steps"].append(record)
            if name == "sass" and record["rc"] == 0:
                (out / "sass.json").write_text(stdout)
            write_json(out / "summary.json", summary)
        write_json(out / "smi.json", sampler.stop())
    ok = all(result["rc"] == 0 for result in summary["steps"])
    summary.update(ok=ok, status="done")
    write_json(out / "summary.json", summary)
    print(f"# {'ok' if ok else 'FAILED'}: wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
