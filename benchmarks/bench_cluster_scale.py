"""The elastic cluster: emulated nodes, a node joining mid-job, bytes moved per worker, out-of-core jobs and the
service's default executor under many small requests.

    python -m benchmarks.bench_cluster_scale                       # every part, sizes for a 2-core machine
    python -m benchmarks.bench_cluster_scale --only ooc --ooc-n 1e8

Parts (goals from issue 11):
- `nodes`: Gaussian Sum on 1 and 2 emulated nodes of 1 CPU (ray.cluster_utils); a node added mid-job: seconds from
  its worker starting to its first shard (goal < 5 s); bytes fetched per worker against the bytes of the blocks its
  shards read (goal <= 1.2x) and against the whole input (what every worker fetched before blocks).
- `ooc`: `Cluster.submit_dataset` on a Parquet dataset of N float32 points (M = 1000) against the same job in
  memory: throughput ratio (goal >= 0.8) and the driver's peak RSS (goal < 400 MB for a 720 MB input).
- `service`: `--requests` concurrent N = M = 1000 reductions through a real `kred serve` with the default
  (cluster) executor and with the local one: throughput ratio (goal >= 0.9), errors (goal 0), p50 / p99.
- `crossover`: the same Gaussian Sum (N = M) through the service's two paths, its local executor (this process,
  kernels warm) and its cluster executor (the Ray driver in a child process, workers), over a range of sizes; the
  smallest N x M at which the cluster is faster is the measured default of the setting `local_below_pairs`.
The JSON goes to benchmarks/results/cluster-scale-<host kind>.json with the machine and its load average.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from .run import machine_info, results_path, save_results

FORMULA, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]
MB = 1024 * 1024


def data(n, m, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3), dtype=np.float32), rng.random((m, 3), dtype=np.float32),
            rng.random((m, 1), dtype=np.float32))


class PeakRss:
    """The peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        import psutil
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_nodes(args, rows):
    import ray
    from ray.cluster_utils import Cluster as RayNodes

    from kred.engine import Spec, make_plan
    from kred.engine.cluster import Cluster
    plan = make_plan(Spec(FORMULA, ALIASES, "Sum", 1))
    n = int(args.nodes_n)
    x, y, b = data(n, n)
    nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * MB,
                                                           "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1, object_store_memory=200 * MB)
        ray.init(address=nodes.address, log_to_driver=False)
        for count in (1, 2):
            if count == 2:
                nodes.add_node(num_cpus=1, object_store_memory=200 * MB)
                nodes.wait_for_nodes()
            with Cluster(nodes.address, device="cpu", idle_timeout=None) as cl:
                cl.run_plan(plan, [x, y, b])                              # warm: kernels, worker start
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    job = cl.submit_plan(plan, [x, y, b])
                    job.result()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                whole = x.nbytes + y.nbytes + b.nbytes
                row = {"part": "nodes", "nodes": count, "workers": len(cl.workers), "n": n, "m": n,
                       "seconds": round(seconds, 4), "pairs_per_s": n * n / seconds,
                       "bytes_fetched": dict(job.bytes_fetched), "bytes_read": job.bytes_read,
                       "whole_input_bytes": whole,
                       "fetched_over_read_max": max(job.bytes_fetched[w] / job.bytes_read[w] for w in job.bytes_read)}
                rows.append(row)
                print(f"nodes={count}: {seconds:.3f} s, {n * n / seconds:.3e} pairs/s; fetched/read per worker "
                      f"{row['fetched_over_read_max']:.2f}, fetched {list(job.bytes_fetched.values())} of "
                      f"whole {whole}", flush=True)
        if len(rows) == 2:
            rows[1]["speedup_vs_1_node"] = round(rows[0]["seconds"] / rows[1]["seconds"], 3)
        # a node joining mid-job: first remove the second node, start a long job, add a node back
        nodes.remove_node(list(nodes.worker_nodes)[-1])
        time.sleep(2)
        with Cluster(nodes.address, device="cpu", idle_timeout=None) as cl:
            cl.run_plan(plan, [x, y, b])
            job = cl.submit_plan(plan, [x, y, b], split=(64, 1))
            while job.progress().done < 2:
                time.sleep(0.01)
            added = time.monotonic()
            joined = nodes.add_node(num_cpus=1, object_store_memory=200 * MB)
            job.result()
            new = [w for w in cl.pool.live if w.info.get("node_id") == joined.node_id]
            latency = job.first_shard.get(new[0].spec.name) if new else None
            rows.append({"part": "node-join", "first_shard_after_worker_start_s": latency,
                         "worker_live_after_node_add_s": new[0].live_since - added if new else None,
                         "shards_total": len(job.shards)})
            print(f"node joined mid-job: its worker took its first shard {latency} s after starting", flush=True)
    finally:
        ray.shutdown()
        nodes.shutdown()


def bench_ooc(args, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from kred.engine import Spec, make_plan
    from kred.engine.cluster import Cluster, Dataset
    n, m, group = int(args.ooc_n), 1000, int(args.row_group)
    plan = make_plan(Spec(FORMULA, ALIASES, "Sum", 1))
    _, y, b = data(1, m, seed=1)
    folder = tempfile.mkdtemp(prefix="kred-ooc-", dir=args.tmp)
    for k, start in enumerate(range(0, n, group)):
        chunk = np.random.default_rng(100 + k).random((min(group, n - start), 3), dtype=np.float32)
        pq.write_table(pa.table({"u": chunk[:, 0], "v": chunk[:, 1], "w": chunk[:, 2]}), _path(folder, k),
                       row_group_size=group)
    input_bytes = n * 3 * 4
    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=args.object_store_mb * MB,
             _system_config={"worker_niceness": 0})
    try:
        with Cluster(device="cpu", idle_timeout=None) as cl:
            cl.run_plan(plan, [*data(1000, 10)[:1], y[:10], b[:10]])                 # warm: kernels
            out = os.path.join(folder, "out") + "/"
            with PeakRss() as rss:
                start = time.perf_counter()
                cl.submit_dataset(plan, [Dataset(os.path.join(folder, "x")), y, b], out).result()
                ooc_s = time.perf_counter() - start
            x = np.concatenate([_read(folder, k) for k in range(-(-n // group))])
            start = time.perf_counter()
            cl.run_plan(plan, [x, y, b])
            memory_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    row = {"part": "ooc", "n": n, "m": m, "input_bytes": input_bytes, "row_group": group,
           "out_of_core_s": round(ooc_s, 3), "in_memory_s": round(memory_s, 3),
           "throughput_ratio_ooc_over_memory": round(memory_s / ooc_s, 3),
           "driver_peak_rss_mb_during_ooc": round(rss.peak / MB, 1)}
    rows.append(row)
    print(f"out-of-core N={n}: {ooc_s:.2f} s vs in memory {memory_s:.2f} s (ratio {memory_s / ooc_s:.2f}); "
          f"driver peak RSS {rss.peak / MB:.0f} MB for a {input_bytes / MB:.0f} MB input", flush=True)


def _path(folder, k):
    os.makedirs(os.path.join(folder, "x"), exist_ok=True)
    return os.path.join(folder, "x", f"part-{k:05d}.parquet")


def _read(folder, k):
    import pyarrow.parquet as pq
    table = pq.read_table(_path(folder, k))
    return np.column_stack([table.column(c).to_numpy() for c in "uvw"])


def bench_service(args, rows):
    import httpx

    from kred.client import AsyncClient, Client

    from .bench_service import wait_ready
    x, y, b = data(1000, 1000, seed=2)
    for executor in ("cluster", "local"):
        store = tempfile.mkdtemp(prefix="kred-bench-store-", dir=args.tmp)
        process, url = start_server(executor, store)
        try:
            with Client(url) as client:
                wait_ready(client, process, timeout=240)

            async def burst():
                http = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=args.requests))
                async with AsyncClient(url, http_transport=http, timeout=600) as c:
                    await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)                     # warm
                    latencies = []

                    async def one():
                        start = time.perf_counter()
                        await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)
                        latencies.append(time.perf_counter() - start)

                    start = time.perf_counter()
                    results = await asyncio.gather(*[one() for _ in range(args.requests)], return_exceptions=True)
                    return time.perf_counter() - start, latencies, [r for r in results if r is not None]

            seconds, latencies, errors = asyncio.run(burst())
        finally:
            process.terminate()
            process.wait(60)
        latencies.sort()
        row = {"part": "service", "executor": executor, "requests": args.requests, "n": 1000, "m": 1000,
               "seconds": round(seconds, 3), "requests_per_s": round(args.requests / seconds, 1),
               "errors": len(errors), "p50_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
               "p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 4) if latencies else None}
        rows.append(row)
        print(f"service, {executor} executor: {row['requests_per_s']} requests/s, {len(errors)} errors, "
              f"p50 {row['p50_s']} s, p99 {row['p99_s']} s", flush=True)
    cluster, local = rows[-2], rows[-1]
    cluster["throughput_ratio_vs_local"] = round(cluster["requests_per_s"] / local["requests_per_s"], 3)


def bench_crossover(args, rows):
    from kred.engine.spec import Spec, make_plan
    from kred.service.executors import ClusterExecutor, LocalExecutor
    plan = make_plan(Spec(FORMULA, ALIASES, "Sum", 1, None, None, "auto"))
    local, cluster = LocalExecutor(), ClusterExecutor(local_below_pairs=0)
    try:
        for n in (int(v) for v in args.crossover_n):
            arrays = list(data(n, n, seed=3))
            times = {}
            for name, executor in (("local", local), ("cluster", cluster)):
                executor.run(plan, arrays)                              # warm: kernels compiled, workers up
                runs = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    executor.run(plan, arrays)
                    runs.append(time.perf_counter() - start)
                times[name] = statistics.median(runs)
            row = {"part": "crossover", "n": n, "m": n, "pairs": n * n, "local_s": round(times["local"], 5),
                   "cluster_s": round(times["cluster"], 5), "load_average": os.getloadavg()[0]}
            rows.append(row)
            print(f"crossover N = M = {n}: local {row['local_s']} s, cluster {row['cluster_s']} s", flush=True)
    finally:
        cluster.close()
        local.close()
    rows.append(crossover([r for r in rows if r["part"] == "crossover"]))
    print(f"crossover: local_below_pairs = {rows[-1]['local_below_pairs']}", flush=True)


def crossover(measured: list[dict], slack: float = 1.05) -> dict:
    """The smallest measured N x M from which on the cluster is at most `slack` x the local time at every larger
    size (single sizes where it wins by noise do not count)."""
    pairs = None
    for row in sorted(measured, key=lambda r: -r["pairs"]):
        if row["cluster_s"] > slack * row["local_s"]:
            break
        pairs = row["pairs"]
    return {"part": "crossover_result", "local_below_pairs": pairs, "slack": slack,
            "note": "smallest measured N x M from which on the cluster executor took at most slack x the local "
                    "executor's time (None: slower at every measured size)"}


def start_server(executor: str, store: str):
    """`kred serve --executor EXECUTOR` in a subprocess on a free loopback port: (process, url)."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, KRED_STORE_DIR=store)
    process = subprocess.Popen([sys.executable, "-m", "kred.client.cli", "serve", "--executor", executor, "--port",
                                str(port), "--log-level", "warning"], env=env)
    return process, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["nodes", "ooc", "service", "crossover"], action="append")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nodes-n", type=float, default=3e4, help="N = M of the emulated-nodes runs")
    parser.add_argument("--ooc-n", type=float, default=2e7, help="points of the out-of-core input")
    parser.add_argument("--row-group", type=float, default=1e6)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--crossover-n", type=float, nargs="+", default=[1e3, 3e3, 1e4, 2e4, 4e4],
                        help="N = M of the crossover part's sizes")
    parser.add_argument("--tmp", default=None, help="folder for the dataset and stores (default: the system's)")
    parser.add_argument("--name", default="cluster-scale")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parts = args.only or ["nodes", "ooc", "service", "crossover"]
    info, rows = machine_info(), []
    load_before = os.getloadavg()
    for part in parts:
        {"nodes": bench_nodes, "ooc": bench_ooc, "service": bench_service, "crossover": bench_crossover}[part](args, rows)
    settings = {k: v for k, v in vars(args).items() if k != "tmp"} | {
        "formula": FORMULA, "dtype": "float32", "statistic": "median of --reps (nodes), single run (ooc, service)",
        "load_average_at_start": load_before, "load_average_at_end": os.getloadavg(),
        "note": "a shared 2-core machine: other processes' load is in the load averages"}
    save_results(results_path(args.name, info), {"settings": settings, "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
