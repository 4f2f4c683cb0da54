"""pykeops 2.3's own tutorials and examples, run unmodified on kred through the drop-in (issue 21).

    python -m benchmarks.pykeops_programs [--sdist pykeops-2.3.tar.gz] [--jobs 2] [--timeout 600] [--server URL]

They are not in pykeops's wheel, only in its source distribution: without `--sdist` it is fetched with
`pip download pykeops==2.3 --no-binary :all: --no-deps`. Each script runs in its own process, from its own folder,
after `kred.compat.install_as_pykeops()` (matplotlib on the Agg backend, so `plt.show()` returns); most check
themselves (they print or assert their error against a torch/numpy computation). With `--server`, the drop-in is
bound to that kred server (`install_as_pykeops(client=...)`: LazyTensor and Genred compute there). The JSON
records, per script, its exit status, seconds and the last line of its error; results/pykeops-programs-<host
kind>.json (-served- with `--server`), with the machine.
pykeops's test files are run in CI instead (tests/test_pykeops_suite.py: they ship in the wheel).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import runpy
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .run import machine_info, results_path, save_results


def run_one(path: str) -> None:
    """The child: the drop-in, then the script as __main__ from its folder."""
    import matplotlib
    matplotlib.use("Agg")
    import kred.compat
    kred.compat.install_from_environment()      # KRED_PYKEOPS: "1", or the server's URL (set by `measure`)
    os.chdir(os.path.dirname(path))
    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")


def fetch(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "pykeops==2.3", "--no-binary", ":all:",
                    "--no-deps", "-d", str(folder)], check=True, timeout=600)
    return next(folder.glob("pykeops-2.3.tar.gz"))


def scripts(root: Path) -> list[Path]:
    found = [*root.glob("pykeops/tutorials/**/*.py"), *root.glob("pykeops/examples/**/*.py")]
    return sorted(p for p in found if p.name != "__init__.py")


def measure(path: Path, root: Path, timeout: float, server: str | None = None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.pykeops_programs", "--run", str(path)],
                              capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent,
                              env={**os.environ, "MPLBACKEND": "Agg", "KRED_PYKEOPS": server or "1"})
        rc, tail = done.returncode, (done.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        rc, tail = None, f"timed out after {timeout:.0f} s"
    return {"script": str(path.relative_to(root / "pykeops")), "ok": rc == 0, "returncode": rc,
            "seconds": round(time.perf_counter() - start, 2), "error": None if rc == 0 else tail[:300]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="pykeops-2.3.tar.gz (default: pip download it)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--name", help="results name (default pykeops-programs, pykeops-programs-served)")
    parser.add_argument("--server", help="a kred server's URL: the drop-in computes there")
    parser.add_argument("--run", help=argparse.SUPPRESS)            # the child's entry
    args = parser.parse_args(argv)
    args.name = args.name or ("pykeops-programs-served" if args.server else "pykeops-programs")
    if args.run:
        run_one(args.run)
        return 0
    work = Path(tempfile.mkdtemp(prefix="kred-pykeops-programs-"))
    sdist = args.sdist or fetch(work)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    root = work / "pykeops-2.3"
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda p: measure(p, root, args.timeout, args.server), scripts(root)))
    info = machine_info()
    passed = sum(r["ok"] for r in rows)
    print(f"{'script':62} {'ok':>3} {'s':>6}  error")
    for r in rows:
        print(f"{r['script']:62} {'yes' if r['ok'] else 'no':>3} {r['seconds']:6.1f}  {r['error'] or ''}")
    print(f"{passed} of {len(rows)} ran")
    save_results(results_path(args.name, info), {"settings": {k: str(v) for k, v in vars(args).items()},
                                                 "machine": info, "passed": passed, "total": len(rows),
                                                 "scripts": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
