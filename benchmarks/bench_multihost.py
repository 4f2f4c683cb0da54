"""kred across namespace hosts (tests/multihost.py) against one host with the same cores: where shards ran, times.

    sudo python -m benchmarks.bench_multihost            # root: it makes network namespaces

Two deployments of the same machine's cores, each with an object store, a Ray head serving `kred serve` and a
client host (the client talks to the server over TCP, Arrow): `two-hosts` has two worker hosts of one CPU each,
`one-host` one worker host of two CPUs. Each runs one in-memory reduction (POST /v1/reduce) and one dataset job
whose inputs and output are on the object store, twice (the first call compiles and warms the workers); the
second is reported: the client's wall time, the job's time in the cluster driver and its shards per host. The JSON
goes to benchmarks/results/multihost-<host kind>.json with the machine's description.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .run import machine_info, results_path, save_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import multihost  # noqa: E402  (the harness lives with the tests)

DEPLOYMENTS = {"two-hosts": {"w1": 1, "w2": 1}, "one-host": {"w1": 2}}


def run(name: str, workers: dict, n: int, m: int, d: int, logs: Path) -> list[dict]:
    rows = []
    hosts = multihost.Deployment(logs / name, workers)
    try:
        names = {host.address: host.name for host in hosts.net.hosts.values()}
        hosts.finish(hosts.call("upload", seed=1, n=n, m=m, d=d, prefix="bench", rows_per_group=max(1, n // 24)),
                     "upload")
        for kind in ("reduce", "dataset_job"):
            for k in range(2):
                args = ({"seed": 1, "n": n, "m": m, "d": d} if kind == "reduce" else
                        {"d": d, "prefix": "bench", "out": f"out{k}"})
                result = hosts.finish(hosts.call(kind, **args), kind)
            job = hosts.jobs()[-1]
            rows.append({"deployment": name, "workers": workers, "kind": kind, "n": n, "m": m, "d": d,
                         "client_seconds": round(result["seconds"], 3), "job_seconds": job["seconds"],
                         "shards": job["shards"], "by_host": {names[ip]: k for ip, k in job["by_node"].items()},
                         "duplicates": job["duplicates"], "bytes_fetched": job["bytes_fetched"]})
    finally:
        hosts.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24_000)
    parser.add_argument("--m", type=int, default=12_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    why = multihost.unavailable()
    if why:
        print(why, file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="kred-multihost-") as logs:
        for name, workers in DEPLOYMENTS.items():
            rows += run(name, workers, args.n, args.m, args.d, Path(logs))
    print(f"{'deployment':<10} {'kind':<12} {'client s':>9} {'job s':>7} {'shards':>6}  shards per host")
    for row in rows:
        print(f"{row['deployment']:<10} {row['kind']:<12} {row['client_seconds']:>9.2f} {row['job_seconds']:>7.2f} "
              f"{row['shards']:>6}  {row['by_host']}")
    info = machine_info()
    save_results(args.out or results_path("multihost", info),
                 {"machine": info, "formula": "Square((x | y)) * b", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
