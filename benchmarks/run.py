"""Benchmark harness: time every impl on every case, one subprocess per measurement.

    python -m benchmarks.run [--quick] [--cases gaussian_sum,argkmin] [--backends reference,cpu,torch] [--dims 3]
    python -m benchmarks.run --memory-check        # Gaussian Sum, N = M = 200,000, D = 3, reference: peak RSS < 1 GB

Each (case, size, D, impl) runs in a fresh Python process (`--worker`), so its peak resident memory (ru_maxrss) is
its own and compiled-kernel or allocator state does not leak between measurements. A worker makes the data, calls
the impl once to warm up (compilation happens there), times `--reps` calls and reports the median, then checks the
result against the case's float64 reference on a subset of rows. Sizes whose predicted time (from the previous size
of the same impl) exceeds `--max-seconds` are skipped and reported as such.

The table is printed as results arrive; the JSON (settings, machine, one record per measurement) goes to
benchmarks/results/<name>-<host kind>.json.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .cases import CASES
from .peers import IMPLS

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_MB = 1024


# Worker: one measurement in this process ------------------------------------------------------------------------

def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    ru_maxrss (KiB on Linux) survives fork + exec, so a child starts with its parent's peak; the harness keeps the
    parent small, and prefers the kernel's VmHWM (peak of this process's own address space) where /proc has it.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: dict) -> dict:
    """Run one (case, impl, n, m, d) measurement in this process and return its record."""
    for module in spec.get("plugins", []):
        importlib.import_module(module)
    case, impl = CASES[spec["case"]], IMPLS[spec["impl"]]
    n, m, d, dtype = spec["n"], spec["m"], spec["d"], np.dtype(spec["dtype"])
    rng = np.random.default_rng(spec.get("seed", 0))
    arrays = [a.astype(dtype) for a in case.data(rng, n, m, d)]
    record = {"rss_data_mb": round(_rss_mb(), 1)}

    call = impl.build(case, arrays)
    times = []
    start = time.perf_counter()
    for _ in range(spec.get("warmup", 1)):
        result = call()
    record["first_call_s"] = time.perf_counter() - start if spec.get("warmup", 1) else None
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    record["peak_rss_mb"] = round(_rss_mb(), 1)          # before the reference below allocates anything
    record["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if "torch" in sys.modules:
        record["torch_threads"] = sys.modules["torch"].get_num_threads()
    record["times_s"] = times
    record["seconds"] = statistics.median(times)
    record["pairs_per_s"] = n * m / record["seconds"]

    rows = np.unique(np.linspace(0, n - 1, min(n, spec.get("check_rows", 256))).astype(int))
    exact = [a.astype(np.float64) for a in arrays]
    row_args = [a[rows] if category == 0 else a for a, category in zip(exact, _categories(case, d))]
    record["error"] = case.error(np.asarray(result)[rows], case.reference(*row_args))
    record["error_kind"] = case.error_kind
    return record


def _categories(case, d) -> list[int]:
    """Category of each alias (0 = i, 1 = j, 2 = parameter), read by the engine's own alias parser."""
    from kred.engine.formula import parse_aliases
    return [node.params[2] for node in parse_aliases(case.aliases(d)).values()]


# Parent: run workers, print, save ---------------------------------------------------------------------------------

def run_worker(spec: dict, timeout: float | None) -> dict:
    """Run one measurement in a fresh process; its peak memory is also watched from here (/proc), so a worker that
    times out or dies still reports how much memory it had reached. The watched peak covers the worker's whole life,
    the float64 accuracy check after the timed calls included, so it can exceed the measured `peak_rss_mb`."""
    command = [sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(spec)]
    # A fixed mmap threshold: with glibc's default (one that grows after large frees) the torch peer's per-block
    # temporaries stop being returned and its resident memory grows like N x M (24 GB at N = M = 1e5, then the OOM
    # killer); fixed, every impl's large blocks are mmapped and freed.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    start, watched = time.monotonic(), None
    while True:
        try:
            stdout, stderr = process.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            watched = _peak_of(process.pid) or watched
            if timeout and time.monotonic() - start > timeout:
                process.kill()
                process.communicate()
                return {"status": f"timeout after {timeout:.0f} s", "peak_rss_mb_watched": watched}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT "):]), "peak_rss_mb_watched": watched}
    tail = (stderr or stdout).strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
    return {"status": f"failed: {tail[0][:200]}", "peak_rss_mb_watched": watched}


def _peak_of(pid: int) -> float | None:
    """VmHWM of another process in MB, or None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": None,
        "memory_gb": None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),       # threads: unset means one per usable CPU
        "kred_num_threads": os.environ.get("KRED_NUM_THREADS"),
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,   # other work on the box
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": None,
        "pykeops": None,
        "gpu": _gpu_name(),
        "kred_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    for package in ("torch", "pykeops"):     # versions without importing: the parent stays small (see _rss_mb)
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    return info


def host_kind(info: dict) -> str:
    """A short name for the kind of machine, e.g. 'cpu-2c' or 'h100-16c'."""
    gpu = info.get("gpu")
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", gpu or "")
    prefix = model.group(1).lower() if model else ("gpu" if gpu else "cpu")
    return f"{prefix}-{info['usable_cpus']}c"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return ", ".join(names) or None


def results_path(name: str, info: dict) -> Path:
    """benchmarks/results/<name>-<host kind>.json: where a benchmark keeps its figures for this kind of machine."""
    return RESULTS / f"{name}-{host_kind(info)}.json"


def save_results(path: Path, payload: dict) -> Path:
    """Write a benchmark's results (with the commit measured, unless the payload names one) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"commit": _git_commit(), **payload}, indent=1) + "\n")
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


COLUMNS = [("case", 13, "s"), ("N", 8, "d"), ("M", 8, "d"), ("D", 4, "d"), ("impl", 12, "s"), ("seconds", 10, ".4g"),
           ("pairs/s", 10, ".3g"), ("peak MB", 8, ".0f"), ("error", 9, ".2g")]


def _row(record: dict) -> str:
    values = {"case": record["case"], "N": record["n"], "M": record["m"], "D": record["d"], "impl": record["impl"]}
    if record["status"] != "ok":
        head = "  ".join(f"{values[name]:>{width}{fmt}}" if fmt == "d" else f"{values[name]:<{width}}"
                         for name, width, fmt in COLUMNS[:5])
        watched = record.get("peak_rss_mb_watched")
        return f"{head}  {record['status']}" + (f" (peak {watched:.0f} MB so far)" if watched else "")
    values.update({"seconds": record["seconds"], "pairs/s": record["pairs_per_s"], "peak MB": record["peak_rss_mb"],
                   "error": record["error"]})
    return "  ".join(f"{values[name]:<{width}{fmt}}" if fmt == "s" else f"{values[name]:>{width}{fmt}}"
                     for name, width, fmt in COLUMNS)


def _select(names: str | None, known: dict, what: str, prefix: str = "") -> list[str]:
    if not names:
        return list(known)
    chosen = []
    for name in names.split(","):
        name = name.strip()
        match = name if name in known else f"{prefix}{name}" if f"{prefix}{name}" in known else None
        if match is None:
            raise SystemExit(f"unknown {what} {name!r}; known: {', '.join(known)}")
        chosen.append(match)
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (each case's quick_sizes)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--backends", "--impls", dest="impls",
                        help="comma-separated impls: reference, cpu, cuda (engine backends), pykeops-cpu, torch, numpy")
    parser.add_argument("--sizes", help="comma-separated N = M values, overriding the cases' size lists")
    parser.add_argument("--dims", help="comma-separated D values, overriding the cases' dims")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--reps", type=int, help="timed repetitions (default 3, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation happens there)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="skip a size when the previous size predicts a longer call")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a worker is killed (0: never)")
    parser.add_argument("--name", help="results file name (default core or core-quick)")
    parser.add_argument("--plugin", action="append", default=[],
                        help="module that registers more cases / impls (repeatable)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--memory-check", action="store_true",
                        help=f"Gaussian Sum, N = M = 200,000, D = 3 on the reference backend: peak RSS < "
                             f"{MEMORY_LIMIT_MB} MB")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    for module in args.plugin:
        importlib.import_module(module)
    if args.memory_check:
        args.cases, args.impls, args.sizes, args.dims = "gaussian_sum", "reference", "200000", "3"
        args.reps, args.warmup, args.max_seconds, args.name = 1, 0, float("inf"), args.name or "memcheck"
        args.timeout = 0        # the reference backend needs about an hour of one core for 4e10 pairs

    cases = _select(args.cases, CASES, "case")
    impls = _select(args.impls, IMPLS, "impl", prefix="kred-")
    reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    info = machine_info()
    name = args.name or ("core-quick" if args.quick else "core")
    path = results_path(name, info)
    print(f"# {info['cpu_model']} ({info['usable_cpus']} usable CPUs), GPU: {info['gpu'] or 'none'}; "
          f"{args.dtype}, median of {reps}" + ("" if args.no_save else f"; saving to {path.relative_to(ROOT)}"))
    print("  ".join(f"{title:<{width}}" if fmt == "s" else f"{title:>{width}}" for title, width, fmt in COLUMNS))

    records = []
    for case_name in cases:
        case = CASES[case_name]
        sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else \
            list(case.quick_sizes if args.quick else case.sizes)
        dims = [int(s) for s in args.dims.split(",")] if args.dims else list(case.dims)
        for d in dims:
            for impl_name in impls:
                impl = IMPLS[impl_name]
                why_not = impl.available() or ("" if impl.supports(case) else f"does not implement {case_name}")
                last = None
                for size in sorted(sizes):
                    record = {"case": case_name, "impl": impl_name, "n": size, "m": size, "d": d,
                              "dtype": args.dtype, "reduction": case.reduction, "formula": case.formula}
                    if why_not:
                        record["status"] = f"unavailable: {why_not}"
                    elif last is not None and last[1] * (size / last[0]) ** 2 > args.max_seconds:
                        record["status"] = f"skipped: predicted {last[1] * (size / last[0]) ** 2:.0f} s " \
                                           f"> --max-seconds {args.max_seconds:.0f}"
                    else:
                        spec = {**record, "reps": reps, "warmup": args.warmup, "plugins": args.plugin}
                        record.update(run_worker(spec, args.timeout))
                        if record["status"] == "ok":
                            last = (size, record["seconds"])
                    records.append(record)
                    print(_row(record), flush=True)
                    if why_not:
                        break               # one line says it for every size

    status = 0
    if args.memory_check:
        peak = next((r.get("peak_rss_mb") for r in records if r["status"] == "ok"), None)
        watched = next((r.get("peak_rss_mb_watched") for r in records), None)
        verdict = peak is not None and peak < MEMORY_LIMIT_MB
        print(f"memory check: peak RSS {peak} MB (whole worker, accuracy check included: {watched} MB), limit "
              f"{MEMORY_LIMIT_MB} MB: "
              f"{'PASS' if verdict else 'FAIL'}")
        status = 0 if verdict else 1
    if not args.no_save:
        settings = {"dtype": args.dtype, "reps": reps, "warmup": args.warmup, "quick": args.quick,
                    "max_seconds": args.max_seconds, "argv": sys.argv[1:],
                    "memory_limit_mb": MEMORY_LIMIT_MB if args.memory_check else None}
        save_results(path, {"settings": settings, "machine": info, "results": records})
    return status


if __name__ == "__main__":
    sys.exit(main())
