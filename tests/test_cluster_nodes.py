"""engine.cluster over several Ray nodes, emulated on this machine with `ray.cluster_utils.Cluster`: one worker per
node, and a node removed in the middle of a job still gives the exact result."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster as RayNodes

from kred.engine.cluster import Cluster
from kred.engine.numpy import Genred

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the hook runs in the workers

GAUSS, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def nodes():
    # A head without CPUs (it holds the driver's objects) and two single-CPU worker nodes.
    cluster = RayNodes(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * MB,
                                                             "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=80 * MB) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def data(n=400, m=300):
    rng = np.random.default_rng(3)
    return rng.random((n, 3)), rng.random((m, 3)), rng.random((m, 2))


def dense(x, y, b):
    return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)) @ b


def slow_shard(shard):
    time.sleep(0.1)


def test_one_worker_per_node_and_exact_results(nodes):
    cluster, workers = nodes
    x, y, b = data()
    with Cluster(cluster.address) as cl:
        placed = {w["node_id"] for w in cl.workers}
        assert placed == {node.node_id for node in workers}
        assert all(w["threads"] == 1 for w in cl.workers)
        single = Genred(GAUSS, ALIASES, axis=1)(x, y, b)
        for split in [(5, 1), (2, 3)]:
            got = cl.run_plan(Genred(GAUSS, ALIASES, axis=1).plan, [x, y, b], split=split)
            np.testing.assert_allclose(got, single, rtol=1e-12)
            np.testing.assert_allclose(got, dense(x, y, b), rtol=1e-12)


def test_node_removed_mid_job(nodes):
    cluster, workers = nodes
    x, y, b = data()
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    with Cluster(cluster.address, on_shard=slow_shard, speculate=False, worker_wait=30) as cl:
        want = cl.run_plan(plan, [x, y, b], split=(12, 1))
        job = cl.submit_plan(plan, [x, y, b], split=(12, 1))
        deadline = time.monotonic() + 30
        while job.progress().done < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim = next(node for node in workers if node.node_id == cl.workers[0]["node_id"])
        cluster.remove_node(victim)
        got = job.result(120)
        assert job.retries >= 1 and cl.pool.replaced >= 1
        np.testing.assert_array_equal(got, want)
        survivors = {w["node_id"] for w in cl.workers}
        assert victim.node_id not in survivors
    np.testing.assert_allclose(got, dense(x, y, b), rtol=1e-12)
