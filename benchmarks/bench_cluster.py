"""The cluster path against a direct engine call on the same cores, and how it scales with workers.

    python -m benchmarks.bench_cluster                 # Gaussian Sum, N = M = 1e5, D = 3, float32
    python -m benchmarks.bench_cluster --n 20000 --reps 2

Rows:
- `direct`: engine.run on the best local backend (every core, or the GPU);
- `cluster-same-cores`: one Ray worker holding every core (or every GPU), through Cluster.run_plan;
  `ratio` = direct time / cluster time (the goal is >= 0.9);
- `scaling`: 1, 2, 4... CPU workers of one thread each (as many as there are cores), or 1, 2, 4... GPU workers.
Each row is the median of `--reps` timed calls after one untimed call (kernels compiled, inputs cached). The JSON
goes to benchmarks/results/cluster-<host kind>.json with the machine's description.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from .run import machine_info, results_path, save_results

FORMULA, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi({d})", "y = Vj({d})", "b = Vj(1)"]


def timed(call, reps: int) -> tuple[float, object]:
    result = call()                                   # warm-up: compilation, input transfer
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e5, help="N = M")
    parser.add_argument("--d", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--name", default="cluster")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    import kred.engine as engine
    from kred.engine.backends import auto_choice
    from kred.engine.backends.cuda import gpu_count
    from kred.engine.cluster import Cluster

    n, d = int(args.n), args.d
    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(d))
    x = rng.standard_normal((n, d)).astype(np.float32) * scale
    y = rng.standard_normal((n, d)).astype(np.float32) * scale
    b = rng.standard_normal((n, 1)).astype(np.float32)
    plan = engine.make_plan(engine.Spec(FORMULA, [a.format(d=d) for a in ALIASES], "Sum", 1))
    info = machine_info()
    cores, gpus = info["usable_cpus"], gpu_count()
    device = "gpu" if gpus else "cpu"
    rows = []

    def record(kind, workers, threads, seconds, result, reference):
        error = float(np.abs(result - reference).max() / np.abs(reference).max())
        row = {"kind": kind, "device": device, "workers": workers, "threads_per_worker": threads,
               "seconds": round(seconds, 4), "pairs_per_s": n * n / seconds, "rel_error_vs_direct": error}
        rows.append(row)
        print(f"{kind:20s} {device} workers={workers} threads={threads}: {seconds:8.3f} s  "
              f"{n * n / seconds:.3e} pairs/s  error {error:.1e}", flush=True)
        return row

    # workers at normal priority, as an embedded Cluster() starts them (Ray's default is nice 15)
    ray.init(num_cpus=cores, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})
    try:
        same = dict(device="gpu") if gpus else dict(device="cpu", workers=1, threads=cores)
        with Cluster(**same) as cl:
            # direct and cluster calls alternate, so that load from other processes hits both alike
            direct_call, cluster_call = (lambda: engine.run(plan, [x, y, b])), (lambda: cl.run_plan(plan, [x, y, b]))
            direct, result = direct_call(), cluster_call()
            direct_times, cluster_times = [], []
            for _ in range(args.reps):
                for call, times in ((direct_call, direct_times), (cluster_call, cluster_times)):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
            direct_s, cluster_s = statistics.median(direct_times), statistics.median(cluster_times)
            record("direct", 0, None if gpus else cores, direct_s, direct, direct)
            row = record("cluster-same-cores", len(cl.workers), same.get("threads"), cluster_s, result, direct)
            row["ratio_direct_over_cluster"] = round(direct_s / cluster_s, 3)
            print(f"ratio direct / cluster = {direct_s / cluster_s:.3f}")
        counts = [k for k in (1, 2, 4, 8, 16) if k <= (gpus or cores)]
        for k in counts:
            options = dict(device="gpu", workers=k) if gpus else dict(device="cpu", workers=k, threads=1)
            with Cluster(**options) as cl:
                seconds, result = timed(lambda: cl.run_plan(plan, [x, y, b]), args.reps)
                record("scaling", k, options.get("threads"), seconds, result, direct)
    finally:
        ray.shutdown()

    single = next(r["seconds"] for r in rows if r["kind"] == "scaling" and r["workers"] == 1)
    for r in rows:
        if r["kind"] == "scaling":
            r["speedup_vs_1_worker"] = round(single / r["seconds"], 3)
    settings = {"case": "gaussian_sum", "formula": FORMULA, "n": n, "m": n, "d": d, "dtype": "float32",
                "reps": args.reps, "statistic": "median", "engine_backend": auto_choice(), "gpus": gpus,
                "load_average_at_end": os.getloadavg()}     # other processes' load on a shared machine
    save_results(results_path(args.name, info), {"settings": settings, "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
