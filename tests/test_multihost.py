"""kred on a cluster of separate hosts: Linux network namespaces on a private subnet (tests/multihost.py), each
with its own address, its own /tmp, HOME and /dev/shm, so that no process reads a file or maps memory of another.

    store   an S3-compatible object store (moto's server)
    head    `ray start --head` (no CPUs for work), `kred serve --ray-address auto` on its subnet address
    w1, w2  `ray start --address head:6379`, one CPU each: kred's workers
    client  `kred.Client` over TCP (shared memory refused: it is another host; arrays travel as Arrow)
    w3      joins in the middle of a job

The server and every worker get the object store's endpoint and credentials from their environment only
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, read by pyarrow's S3FileSystem); the server's dataset
roots are `s3://kred-data/`. Results are compared with dense numpy in float64. The cluster driver logs one line per
job with where its shards ran (`by_node`: node address -> shards), which tells which hosts took part.

Needs root and iproute2 (CI runs as root): elsewhere these tests fail, saying so, rather than being skipped.
The whole module takes about a minute; everything it starts is killed by namespace and the namespaces deleted.
`KRED_MULTIHOST_RESULTS=path.json` saves the runs' shard distributions and timings (benchmarks/results/).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import multihost
from multihost_client import data, unpacked

pytestmark = pytest.mark.timeout(240)

RUNS: dict = {}                   # what the module measured, for KRED_MULTIHOST_RESULTS


def oracle(x, y, b):
    """sum_j (x_i . y_j)^2 b_j = x_i^T (sum_j b_j y_j y_j^T) x_i, dense numpy in float64."""
    return np.einsum("nd,de,ne->n", x, (y * b).T @ y, x)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = multihost.unavailable()
    if why is not None:
        pytest.fail(f"multi-host tests cannot run: {why}", pytrace=False)
    cluster = None
    try:
        cluster = multihost.Deployment(tmp_path_factory.mktemp("hosts"))
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        if RUNS and os.environ.get("KRED_MULTIHOST_RESULTS"):
            Path(os.environ["KRED_MULTIHOST_RESULTS"]).write_text(json.dumps(RUNS, indent=1))


def addresses(hosts, *names):
    return {hosts.net.hosts[name].address for name in names}


def test_hosts_are_separate(hosts):
    """Each host has its own address and its own /tmp: a file written on one is not there on another."""
    hosts.head.run(["sh", "-c", "echo head > /tmp/mark && ip -4 -o addr show eth0"], "separate.log")
    seen = hosts.workers["w1"].run(["sh", "-c", "cat /tmp/mark 2>/dev/null || echo absent; ip -4 -o addr show eth0"],
                                   "separate.log")
    assert "absent" in seen and hosts.workers["w1"].address in seen and hosts.head.address not in seen


def test_reduction_spread_over_the_hosts(hosts):
    n, m, d = 12_000, 4_000, 64
    result = hosts.finish(hosts.call("reduce", seed=1, n=n, m=m, d=d), "reduce")
    assert result["shared_memory"] is False                 # the client is on another host: Arrow
    assert result["shm_refusal"] and "shared memory" in result["shm_refusal"]
    np.testing.assert_allclose(unpacked(result["result"])[:, 0], oracle(*data(1, n, m, d)), rtol=1e-10)
    job = hosts.jobs()[-1]
    assert set(job["by_node"]) == addresses(hosts, "w1", "w2"), job       # shards on each worker host
    RUNS["reduce"] = {"n": n, "m": m, "d": d, "client_seconds": result["seconds"], **job}


def test_dataset_job_on_the_object_store(hosts):
    n, m, d = 6_000, 2_000, 64
    hosts.finish(hosts.call("upload", seed=2, n=n, m=m, d=d, prefix="small", rows_per_group=500), "upload")
    result = hosts.finish(hosts.call("dataset_job", d=d, prefix="small"), "dataset_job")
    assert result["files"] == n // 500, result
    np.testing.assert_allclose(unpacked(result["result"]), oracle(*data(2, n, m, d)),
                               rtol=1e-10)
    job = hosts.jobs()[-1]
    assert set(job["by_node"]) == addresses(hosts, "w1", "w2") and job["shards"] == n // 500, job
    RUNS["dataset"] = {"n": n, "m": m, "d": d, "client_seconds": result["seconds"], **job}


def test_hosts_leave_and_join_mid_job(hosts):
    """w2 fails (every process killed) while the job runs and w3 joins: the result is exact, w3 computes shards.
    So that w3 surely arrives before the job ends, w1's kred worker is paused (SIGSTOP; its raylet stays up) from
    w2's loss until the job progresses without it, which only w3 can then make it do."""
    n, m, d, group = 16_000, 12_000, 128, 400
    hosts.finish(hosts.call("upload", seed=3, n=n, m=m, d=d, prefix="big", rows_per_group=group), "upload")
    before = len(hosts.jobs())
    job = hosts.call("dataset_job", d=d, prefix="big")
    joining, events, paused, joined_at, paused_at = {}, [], [], None, None
    deadline = time.monotonic() + 150
    for line in job.stdout:
        event = json.loads(line)
        events.append(event)
        progress = event.get("progress", 0)
        if "submitted" in event:                # w3 starts joining now; its Ray start takes seconds
            thread = threading.Thread(target=lambda: joining.update(w3=hosts.start_worker("w3")))
            thread.start()
        if progress >= 0.1 and "w2" in hosts.workers:
            hosts.net.remove("w2")              # the host fails: every process in it killed, its network gone
            del hosts.workers["w2"]
            removed_at = progress
            paused = hosts.workers["w1"].signal_processes("ShardWorker", signal.SIGSTOP)
            assert paused, "w1's kred worker process (ray::ShardWorker) was not found"
            paused_at = time.monotonic()
        if paused and joined_at is None and not thread.is_alive() and time.monotonic() - paused_at > 2:
            joined_at = progress                # w3's node is up, and what w1 finished before its pause is counted
        if paused and ((joined_at is not None and progress > joined_at) or time.monotonic() > deadline):
            hosts.workers["w1"].signal_processes("ShardWorker", signal.SIGCONT)
            paused = []
        if "result" in event or "failed" in event:
            break
    thread.join(60)
    job.wait(30)
    hosts.joined(*joining["w3"])
    result = events[-1]
    assert "result" in result, result
    np.testing.assert_allclose(unpacked(result["result"]), oracle(*data(3, n, m, d)), rtol=1e-10)
    summary = hosts.jobs()[before]
    assert summary["lost"] >= 1, summary                                    # w2's shards were lost, and redone
    w3 = hosts.workers["w3"].address
    assert summary["by_node"].get(w3, 0) >= 1, summary                     # the host that joined took shards
    RUNS["leave_join"] = {"n": n, "m": m, "d": d, "client_seconds": result["seconds"],
                          "w2_removed_at_progress": removed_at, "w3_joined_at_progress": joined_at, "w3": w3,
                          **summary}
