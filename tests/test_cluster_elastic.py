"""A Cluster that follows the Ray cluster, shares it and moves only its shards' data, on real Ray with emulated
nodes (`ray.cluster_utils.Cluster`, one CPU each): a node that joins mid-job runs shards of that job, an idle Cluster
gives its workers back, two drivers on one cluster both finish, workers fetch only their blocks, and a job with more
shards than workers asks the autoscaler for room. Results are checked against dense numpy.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster as RayNodes

from kred.engine.cluster import Cluster, workers as workers_module
from kred.engine.numpy import Genred

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the hooks run in the workers

GAUSS, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def nodes():
    # A head without CPUs (it holds the drivers' objects) and one single-CPU worker node; tests add more.
    cluster = RayNodes(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * MB,
                                                             "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def data(n=400, m=300, seed=3):
    rng = np.random.default_rng(seed)
    return rng.random((n, 3)), rng.random((m, 3)), rng.random((m, 2))


def dense(x, y, b):
    return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)) @ b


class NodeLog:
    """Appends `node_id shard` to a file for each shard a worker starts, then sleeps `seconds`."""

    def __init__(self, path, seconds=0.0):
        self.path, self.seconds = str(path), seconds

    def __call__(self, shard):
        with open(self.path, "a") as f:
            f.write(f"{ray.get_runtime_context().get_node_id()} {shard.index}\n")
        time.sleep(self.seconds)

    def nodes(self) -> list[str]:
        return [line.split()[0] for line in Path(self.path).read_text().splitlines()]


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_workers_fetch_only_their_blocks(nodes):
    x, y, b = data()
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    whole = x.nbytes + y.nbytes + b.nbytes
    with Cluster(nodes.address, device="cpu", workers=1, idle_timeout=None) as cl:
        job = cl.submit_plan(plan, [x, y, b], split=(4, 3))
        np.testing.assert_allclose(job.result(60), dense(x, y, b), rtol=1e-12)
        (name, fetched), = job.bytes_fetched.items()
        assert fetched == job.bytes_read[name] == whole        # each block once, the whole input in all
    # a cache of one block: blocks are fetched again, the result is the same
    with Cluster(nodes.address, device="cpu", workers=1, idle_timeout=None, cache_bytes=1) as small:
        tight = small.submit_plan(plan, [x, y, b], split=(4, 3))
        np.testing.assert_array_equal(tight.result(60), job.result())
        assert sum(tight.bytes_fetched.values()) > whole


class HoldOldNodes(NodeLog):
    """After its first shards, a worker of a node in `old` waits (at most a minute) for the `go` file: the job cannot
    end before a node that joins has run shards, however slowly that node starts on a busy machine."""

    def __init__(self, path, old, go):
        super().__init__(path)
        self.old, self.go = set(old), str(go)

    def __call__(self, shard):
        super().__call__(shard)
        if shard.index >= 2 and ray.get_runtime_context().get_node_id() in self.old:
            deadline = time.monotonic() + 60
            while not os.path.exists(self.go) and time.monotonic() < deadline:
                time.sleep(0.05)


def test_node_joining_mid_job_takes_shards(nodes, tmp_path):
    x, y, b = data()
    old = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    hook = HoldOldNodes(tmp_path / "log", old, tmp_path / "go")
    with Cluster(nodes.address, device="cpu", on_shard=hook, speculate=False, idle_timeout=None) as cl:
        job = cl.submit_plan(Genred(GAUSS, ALIASES, axis=1).plan, [x, y, b], split=(20, 1))
        wait_for(lambda: job.progress().done >= 2)
        joined = nodes.add_node(num_cpus=1, object_store_memory=80 * MB)
        wait_for(lambda: joined.node_id in hook.nodes(), timeout=90)      # it ran a shard of the running job
        (tmp_path / "go").touch()
        got = job.result(120)
        on_new = [w["name"] for w in cl.workers if w["node_id"] == joined.node_id]
        assert on_new, "the joined node got no worker"
        assert job.first_shard[on_new[0]] < 5.0                     # within 5 s of its worker starting
    np.testing.assert_allclose(got, dense(x, y, b), rtol=1e-12)


def test_asks_the_autoscaler_for_what_a_job_needs(nodes, monkeypatch):
    asked = []
    monkeypatch.setattr(workers_module, "request_resources", asked.append)
    x, y, b = data()
    with Cluster(nodes.address, device="cpu", workers=2, threads=1, idle_timeout=0.5) as cl:
        job = cl.submit_plan(Genred(GAUSS, ALIASES, axis=1).plan, [x, y, b], split=(6, 1))
        np.testing.assert_allclose(job.result(60), dense(x, y, b), rtol=1e-12)
        assert [{"CPU": 1}] * 6 in asked             # room for one worker per shard
        wait_for(lambda: not cl.pool.live)          # idle: workers given back, the request withdrawn
        assert asked[-1] == []


DRIVER = """
import sys, numpy as np
from kred.engine.cluster import Cluster
rng = np.random.default_rng(5)
x, y, b = rng.random((200, 3)), rng.random((150, 3)), rng.random((150, 2))
with Cluster(sys.argv[1], device="cpu", idle_timeout=1.0) as cl:
    a = cl.reduce("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], x, y, b, axis=1, timeout=120)
want = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
assert np.allclose(a, want, rtol=1e-12), abs(a - want).max()
print("second driver done")
"""


def test_idle_cluster_releases_its_workers_and_two_drivers_finish(nodes, tmp_path):
    x, y, b = data()
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    with Cluster(nodes.address, device="cpu", idle_timeout=1.0, on_shard=NodeLog(tmp_path / "log", 0.1)) as cl:
        held = len(cl.workers)
        assert held == len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")])
        job = cl.submit_plan(plan, [x, y, b], split=(20, 1))
        # a second driver while this one holds every CPU: it waits, then runs once this Cluster is idle
        other = subprocess.Popen([sys.executable, "-c", DRIVER, nodes.address], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        try:
            np.testing.assert_allclose(job.result(60), dense(x, y, b), rtol=1e-12)
            wait_for(lambda: not cl.pool.live)
            assert cl.pool.released == held
            out, _ = other.communicate(timeout=180)
        finally:
            if other.poll() is None:
                other.kill()
        assert other.returncode == 0 and "second driver done" in out, out
        # the next job brings workers back (it proceeds with the first one that is up)
        np.testing.assert_allclose(cl.run_plan(plan, [x, y, b], timeout=120), dense(x, y, b), rtol=1e-12)


def test_small_reductions_stay_in_the_service_process(nodes, tmp_path):
    from kred.service.executors import ClusterExecutor
    hook = NodeLog(tmp_path / "log")
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    with Cluster(nodes.address, device="cpu", workers=1, on_shard=hook, idle_timeout=None) as cl:
        executor = ClusterExecutor(cluster=cl, local_below_pairs=50_000, backend="reference")
        x, y, b = data(100, 100)                     # 10^4 pairs: computed here
        np.testing.assert_allclose(executor.run(plan, [x, y, b]), dense(x, y, b), rtol=1e-12)
        assert not (tmp_path / "log").exists()
        x, y, b = data(400, 300)                     # 1.2 x 10^5 pairs: on the cluster
        np.testing.assert_allclose(executor.run(plan, [x, y, b]), dense(x, y, b), rtol=1e-12)
        assert len(hook.nodes()) >= 1
