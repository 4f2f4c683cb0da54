"""Block-sparse `ranges` against the dense reduction (issue 14's table), with pykeops 2.3's CPU ranges as the peer.

    python -m benchmarks.bench_ranges [--n 200000] [--cells 1000,8000] [--densities 0.1,0.01] [--threads 2]
                                      [--reps 3] [--no-peer] [--name ranges] [--no-save]

Gaussian Sum `Exp(-g * SqDist(x, y)) * b`, N = M points uniform in the unit cube, D = 3, float32, cpu backend. The
points are sorted into the cubic cells of a grid (`grid_cluster`, ~N / cells points each); a block of cells (i cell,
j cell) is kept when its centroids are among the closest pairs, so that the kept blocks hold the target fraction of
all pairs (the density; the kept fraction is reported). The dense call is timed once per cell count (median of
--dense-reps); each block-sparse call after one warm-up, median of --reps. The peer runs the same
formula, data and 6-tuple through pykeops.numpy.Genred(backend="CPU") with OMP_NUM_THREADS = --threads; its result is
compared with ours (the same blocks: they must agree to float32 rounding). Also reported: the speed-up in CPU time of
this process (dense CPU seconds / sparse CPU seconds), which other processes on the machine disturb less.
Results go to benchmarks/results/<name>-<host kind>.json with the machine description and the load average around
each row (the machine may be shared: a loaded machine slows the many short calls of a sparse run more than one long
dense call).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

GOALS = {(1000, 0.1): 8.0, (1000, 0.01): 70.0, (8000, 0.1): 5.0, (8000, 0.01): 30.0}
FORMULA = "Exp(-g * SqDist(x, y)) * b"
ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "g = Pm(1)"]


def clustered(n: int, cells: int, densities: list[float], seed: int = 0):
    """(arrays, {density: (ranges, kept fraction, blocks)}) for n points per side sorted into ~`cells` cells."""
    from kred.engine.numpy import cluster_ranges_centroids, from_matrix, grid_cluster, sort_clusters

    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 3), np.float32), rng.random((n, 3), np.float32)
    b = rng.standard_normal((n, 1)).astype(np.float32)
    side = 1.0 / round(cells ** (1 / 3))
    x, x_labels = sort_clusters(x, grid_cluster(x, side))
    (y, b), y_labels = sort_clusters((y, b), grid_cluster(y, side))
    x_ranges, x_centroids, _ = cluster_ranges_centroids(x, x_labels)
    y_ranges, y_centroids, _ = cluster_ranges_centroids(y, y_labels)
    distance = ((x_centroids[:, None, :] - y_centroids[None, :, :]) ** 2).sum(-1)
    pairs = np.diff(x_ranges)[:, 0][:, None].astype(np.float64) * np.diff(y_ranges)[:, 0][None, :]
    order = np.argsort(distance, axis=None, kind="stable")
    covered = np.cumsum(pairs.reshape(-1)[order]) / float(n) ** 2
    patterns = {}
    for density in densities:
        keep = np.zeros(distance.size, bool)
        keep[order[:int(np.searchsorted(covered, density)) + 1]] = True
        keep = keep.reshape(distance.shape)
        ranges = from_matrix(x_ranges, y_ranges, keep)
        patterns[density] = (ranges, float((pairs * keep).sum()) / n ** 2, int(keep.sum()))
    g = np.array([1 / (2 * side ** 2)], np.float32)
    return (x, y, b, g), patterns


def timed(fn, reps: int) -> tuple[float, float, np.ndarray]:
    """(median wall seconds, median CPU seconds of this process, result) of `reps` calls (after a warm-up)."""
    walls, cpus, result = [], [], None
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--cells", default="1000,8000")
    parser.add_argument("--densities", default="0.1,0.01")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-reps", type=int, default=2)
    parser.add_argument("--peer-reps", type=int, default=1)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--name", default="ranges")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    # threads are read when OpenMP starts: set them before kred or pykeops run anything
    os.environ["KRED_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from kred.engine.numpy import Genred
    from .run import machine_info, results_path, save_results

    op = Genred(FORMULA, ALIASES, axis=1)
    peer = None
    if not args.no_peer:
        from pykeops.numpy import Genred as PykeopsGenred
        peer = PykeopsGenred(FORMULA, ALIASES, reduction_op="Sum", axis=1)

    densities = [float(d) for d in args.densities.split(",")]
    records, compiled = [], False
    print(f"{'cells':>6} {'pts/cell':>8} {'density':>8} {'blocks':>9} {'dense s':>8} {'ranges s':>9} {'speed-up':>8} "
          f"{'cpu-time':>8} {'goal':>5} {'pykeops s':>10} {'vs pykeops':>10} {'rel. diff':>9} {'load':>5}", flush=True)
    for cells in (int(c) for c in args.cells.split(",")):
        data, patterns = clustered(args.n, cells, densities)
        if not compiled:
            op(*(a[:1000] if a.shape[0] == args.n else a for a in data), backend="cpu")        # compile
            compiled = True
        # the dense call, timed again for each cell count: the machine's load changes during a run
        dense_s, dense_cpu, _ = timed(lambda: op(*data, backend="cpu"), args.dense_reps)
        for density in densities:
            ranges, kept, blocks = patterns[density]
            load_before = os.getloadavg()[0]
            op(*data, backend="cpu", ranges=ranges)                                          # warm-up
            sparse_s, sparse_cpu, ours = timed(lambda: op(*data, backend="cpu", ranges=ranges), args.reps)
            record = {"n": args.n, "m": args.n, "d": 3, "dtype": "float32", "cells": cells,
                      "points_per_cell": args.n / cells, "target_density": density, "kept_fraction": kept,
                      "blocks": blocks, "column_ranges": len(ranges[2]), "dense_seconds": dense_s,
                      "ranges_seconds": sparse_s, "speedup": dense_s / sparse_s, "dense_cpu_seconds": dense_cpu,
                      "ranges_cpu_seconds": sparse_cpu, "cpu_time_speedup": dense_cpu / sparse_cpu,
                      "goal_speedup": GOALS.get((cells, density)), "load_average_1min_before": load_before}
            if peer is not None:
                pk_ranges = tuple(np.ascontiguousarray(r, np.int32) for r in ranges)
                peer(*data, backend="CPU", ranges=pk_ranges)                                 # compile, warm-up
                peer_s, _, theirs = timed(lambda: peer(*data, backend="CPU", ranges=pk_ranges), args.peer_reps)
                record.update(pykeops_ranges_seconds=peer_s, speedup_over_pykeops=peer_s / sparse_s,
                              max_rel_diff_vs_pykeops=float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
            record["load_average_1min_after"] = os.getloadavg()[0]
            records.append(record)
            goal = record["goal_speedup"]
            print(f"{cells:>6} {args.n / cells:>8.0f} {kept:>8.2%} {blocks:>9} {dense_s:>8.2f} {sparse_s:>9.3f} "
                  f"{dense_s / sparse_s:>7.1f}x {dense_cpu / sparse_cpu:>7.1f}x {'' if goal is None else f'{goal:.0f}x':>5} "
                  f"{record.get('pykeops_ranges_seconds', float('nan')):>10.3f} "
                  f"{record.get('speedup_over_pykeops', float('nan')):>9.1f}x "
                  f"{record.get('max_rel_diff_vs_pykeops', float('nan')):>9.1e} {record['load_average_1min_after']:>5.2f}",
                  flush=True)
    if not args.no_save:
        info = machine_info()
        settings = {"formula": FORMULA, "backend": "cpu", "threads": args.threads, "reps": args.reps,
                    "dense_reps": args.dense_reps, "peer": None if args.no_peer else "pykeops.numpy CPU ranges",
                    "peer_reps": args.peer_reps}
        save_results(results_path(args.name, info), {"settings": settings, "machine": info, "results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
