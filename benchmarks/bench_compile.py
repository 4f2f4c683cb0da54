"""The C compiler's optimisation level: compile seconds against kernel speed, in the same run.

    python -m benchmarks.bench_compile [--n 20000] [--threads 2] [--reps 5] [--level="-O3" --level="-O2" ...]

A first call that compiles is what a short program (or a service seeing a new formula shape) waits for, so the
optimisation flags of the CPU backend are a trade between the compile and the kernel. For each level (each in a child
process with an empty kernel cache, `engine.backends.cpu.OPTIMISE` replaced by the level's flags) and each case
(Gaussian Sum, LogSumExp, ArgKMin K=10 at D = 3 and 100, the Gaussian's gradient; float32 and float64), the table
gives the compile seconds (builds.log) and the best of `--reps` calls; results/compile-<host kind>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_constants import builds
from .run import machine_info, results_path, save_results

LEVELS = ("-O3", "-O3 -fno-ipa-cp-clone", "-O2 -funswitch-loops -fpeel-loops", "-O2")
CASES = [("gaussian", "Exp(-SqDist(x,y))*b", "Sum", 3), ("logsumexp", "-SqDist(x,y)", "LogSumExp", 3),
         ("argkmin", "SqDist(x,y)", "ArgKMin", 3), ("gaussian", "Exp(-SqDist(x,y))*b", "Sum", 100),
         ("argkmin", "SqDist(x,y)", "ArgKMin", 100), ("gaussian_grad", "Grad(Exp(-SqDist(x,y))*b, x, e)", "Sum", 3)]


def child(level: str, n: int, reps: int) -> list[dict]:
    """In a fresh process: every case at one level."""
    import numpy as np

    from kred.engine.backends import cpu
    from kred.numpy import Genred
    cpu.FLAGS = (*level.split(), *cpu.FLAGS[len(cpu.OPTIMISE):])
    cache = Path(os.environ["KRED_CACHE_DIR"])
    rng = np.random.default_rng(0)
    rows = []
    for name, formula, reduction, d in CASES:
        for dtype in ("float32", "float64"):
            size = n if d == 3 else n // 4
            x, y = rng.random((size, d)).astype(dtype), rng.random((size, d)).astype(dtype)
            b, e = rng.random((size, 1)).astype(dtype), rng.random((size, 1)).astype(dtype)
            aliases = [f"x=Vi({d})", f"y=Vj({d})", "b=Vj(1)", "e=Vi(1)"]
            routine = Genred(formula, aliases, reduction_op=reduction, axis=1,
                             opt_arg=10 if reduction == "ArgKMin" else None)
            before = len(builds(cache))
            routine(x, y, b, e, backend="CPU")
            compiled = builds(cache)[before:]
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                routine(x, y, b, e, backend="CPU")
                times.append(time.perf_counter() - start)
            rows.append({"case": name, "d": d, "n": size, "dtype": dtype, "level": level,
                         "compile_s": sum(compiled),
                         "best_ms": 1e3 * min(times)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--level", action="append", dest="levels", help="a flag set (repeatable; default: LEVELS)")
    parser.add_argument("--name", default="compile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.levels = args.levels or list(LEVELS)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.reps)))
        return 0
    rows = []
    for level in args.levels:
        env = {**os.environ, "KRED_CACHE_DIR": tempfile.mkdtemp(prefix="kred-bench-compile-"),
               "KRED_NUM_THREADS": str(args.threads)}
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_compile", f"--child={level}", "--n", str(args.n),
                               "--reps", str(args.reps)], capture_output=True, text=True, env=env, check=True,
                              cwd=Path(__file__).parent.parent, timeout=1800)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    info = machine_info()
    base = {(r["case"], r["d"], r["dtype"]): r for r in rows if r["level"] == args.levels[0]}
    print(f"{'case':14} {'D':>3} {'dtype':8} {'level':36} {'compile s':>9} {'kernel ms':>9} {'vs first level':>14}")
    for r in rows:
        first = base[(r["case"], r["d"], r["dtype"])]
        print(f"{r['case']:14} {r['d']:3d} {r['dtype']:8} {r['level']:36} {r['compile_s']:9.3f} {r['best_ms']:9.2f} "
              f"{r['best_ms'] / first['best_ms']:13.2f}x")
    save_results(results_path(args.name, info), {"settings": vars(args), "machine": info, "load": os.getloadavg(),
                                                 "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
