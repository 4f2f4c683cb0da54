"""Block-sparse `ranges` against the dense reduction: a truncated Gaussian kernel sum on clustered points.

    python -m benchmarks.bench_ranges [--sizes 30000,100000] [--backend cpu] [--scale 0.05] [--name ranges] [--no-save]

Points are uniform in the unit cube, clustered with `grid_cluster` (cells of side 2 * scale), and a block of
clusters is kept when its centroids are closer than 6 * scale: the Gaussian exp(-|x - y|^2 / (2 scale^2)) of the
pairs left out is below exp(-(6 - 2 sqrt(3))^2 / 2) ~ 0.04 at the very worst and usually far smaller. Reported:
seconds (wall clock, and CPU time of the process) of the dense and block-sparse reductions (median of --reps, after
one warm-up that also compiles), the fraction of pairs the ranges keep, and the max relative difference of the two
results (the truncation error).
Results go to benchmarks/results/<name>-<host kind>.json with the machine description and the load average
during each size (a block-sparse run makes one backend call per block, so it suffers more than one long dense call
when other processes compete for the cores; KRED_NUM_THREADS=1 shows the work without that effect).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from kred.engine.numpy import Genred, cluster_ranges_centroids, from_matrix, grid_cluster, sort_clusters

from .run import RESULTS, machine_info, host_kind


def clustered_problem(n: int, scale: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y, b = rng.random((n, 3)), rng.random((n, 3)), rng.standard_normal((n, 1))
    x, x_labels = sort_clusters(x, grid_cluster(x, 2 * scale))
    (y, b), y_labels = sort_clusters((y, b), grid_cluster(y, 2 * scale))
    x_ranges, x_centroids, _ = cluster_ranges_centroids(x, x_labels)
    y_ranges, y_centroids, _ = cluster_ranges_centroids(y, y_labels)
    keep = ((x_centroids[:, None] - y_centroids[None]) ** 2).sum(-1) < (6 * scale) ** 2
    kept = float((np.diff(x_ranges)[:, 0][:, None] * np.diff(y_ranges)[:, 0][None] * keep).sum()) / n ** 2
    return (x, y, b, np.array([1 / (2 * scale ** 2)])), from_matrix(x_ranges, y_ranges, keep), kept


def timed(fn, reps: int) -> tuple[float, float, np.ndarray]:
    """(median wall seconds, median CPU seconds of this process, result), after one warm-up call that compiles."""
    result = fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30000,100000")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--name", default="ranges")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    op = Genred("Exp(-g * SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "g = Pm(1)"], axis=1)
    records = []
    print(f"{'N = M':>8} {'kept':>7} {'dense s':>9} {'ranges s':>9} {'speed-up':>9} {'dense cpu s':>12} "
          f"{'ranges cpu s':>13} {'max rel. diff':>14}")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        data, ranges, kept = clustered_problem(n, args.scale)
        dense_s, dense_cpu, dense = timed(lambda: op(*data, backend=args.backend), args.reps)
        sparse_s, sparse_cpu, sparse = timed(lambda: op(*data, backend=args.backend, ranges=ranges), args.reps)
        diff = float(np.abs(sparse - dense).max() / np.abs(dense).max())
        records.append({"n": n, "m": n, "d": 3, "backend": args.backend, "scale": args.scale, "kept_fraction": kept,
                        "clusters": len(ranges[0]), "blocks": len(ranges[2]), "dense_seconds": dense_s,
                        "ranges_seconds": sparse_s, "dense_cpu_seconds": dense_cpu, "ranges_cpu_seconds": sparse_cpu,
                        "max_rel_diff": diff,
                        "load_average_1min": os.getloadavg()[0]})
        print(f"{n:>8} {kept:>7.3%} {dense_s:>9.3f} {sparse_s:>9.3f} {dense_s / sparse_s:>9.1f} {dense_cpu:>12.3f} "
              f"{sparse_cpu:>13.3f} {diff:>14.2e}", flush=True)
    if not args.no_save:
        info = machine_info()
        path = RESULTS / f"{args.name}-{host_kind(info)}.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        settings = {"reps": args.reps, "dtype": "float64", "formula": "Exp(-g * SqDist(x, y)) * b"}
        path.write_text(json.dumps({"settings": settings, "machine": info, "results": records}, indent=1) + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
