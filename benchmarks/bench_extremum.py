"""Min/Max with their indices on the CPU backend: an A/B benchmark of the extremum accumulate step (issue 14).

    python -m benchmarks.bench_extremum --label before|after [--n 40000] [--threads 2] [--reps 5] [--name extremum]

`SqDist(x, y)` reduced by Min, Min_ArgMin, ArgMin, Max_ArgMax and ArgMax, N = M = --n, D = 3, float32, cpu backend.
Each label's rows (median wall and CPU seconds of --reps calls after a warm-up) are stored under that label in
benchmarks/results/<name>-<host kind>.json with the machine description and commit, so a run on one commit and a
run on another in the same session compare as A/B; the table prints the CPU time of every label stored (the
machine may be shared: wall time is stored too), with the speed-up of "after" over "before".
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from .bench_ranges import timed
from .run import _git_commit, machine_info, results_path, save_results

REDUCTIONS = ("Min", "Min_ArgMin", "ArgMin", "Max_ArgMax", "ArgMax")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--name", default="extremum")
    args = parser.parse_args(argv)
    os.environ["KRED_NUM_THREADS"] = str(args.threads)
    from kred.numpy import Genred

    rng = np.random.default_rng(0)
    x, y = rng.random((args.n, 3), np.float32), rng.random((args.n, 3), np.float32)
    info = machine_info()
    path = results_path(args.name, info)
    stored = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    rows = {}
    for name in REDUCTIONS:
        fn = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op=name, axis=1)
        call = lambda: fn(x, y, backend="CPU")       # noqa: E731
        call()
        wall, cpu, _ = timed(call, args.reps)
        rows[name] = {"wall_s": wall, "cpu_s": cpu}
    stored["runs"][args.label] = {"settings": vars(args), "commit": _git_commit(), "machine": info,
                                  "load": os.getloadavg(), "results": rows}
    runs = stored["runs"]
    # CPU time of this process: on a shared machine it is disturbed much less than wall-clock time
    print(f"{'reduction':12} " + " ".join(f"{label + ' cpu ms':>16}" for label in runs) + "   after/before speed-up")
    for name in REDUCTIONS:
        cells = [f"{runs[label]['results'][name]['cpu_s'] * 1e3:16.1f}" for label in runs]
        ratio = ""
        if {"before", "after"} <= set(runs):
            ratio = f"{runs['before']['results'][name]['cpu_s'] / runs['after']['results'][name]['cpu_s']:.2f}x"
        print(f"{name:12} " + " ".join(cells) + f"   {ratio}")
    save_results(path, stored)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
