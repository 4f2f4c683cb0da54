"""Dataset jobs through the service (POST /v1/jobs with dataset URIs) on a real local Ray and a real uvicorn: the
cluster's workers read the Parquet inputs and write the output dataset; URIs outside the server's dataset roots
are refused before anything is opened; an interrupted job is re-run by the next server and keeps its written blocks.
"""
from __future__ import annotations

import os
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from conftest import start_ray
from kred.engine.cluster import Cluster
from kred.wire import arrow
from kred.service.app import create_app
from kred.service.executors import ClusterExecutor
from service_helpers import Server, settings

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the hook runs in the workers

MB = 1024 * 1024
REQUEST = {"formula": "Exp(-SqDist(x, y)) * b", "aliases": ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "axis": 1}


def slow(shard):
    time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    start_ray(num_cpus=2, object_store_memory=100 * MB)
    try:
        with Cluster(device="cpu", workers=2, threads=1, backend="reference", idle_timeout=None,
                     on_shard=slow) as cl:
            yield cl
    finally:
        ray.shutdown()


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(2)
    x, y, b = rng.random((6_000, 3)), rng.random((50, 3)), rng.random((50, 1))
    (tmp_path / "x").mkdir()
    pq.write_table(pa.table({"u": x[:, 0], "v": x[:, 1], "w": x[:, 2]}), tmp_path / "x" / "a.parquet",
                   row_group_size=500)
    pq.write_table(pa.table({"p": y[:, 0], "q": y[:, 1], "r": y[:, 2]}), tmp_path / "y.parquet")
    pq.write_table(pa.table({"b": b[:, 0]}), tmp_path / "b.parquet")
    want = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
    body = REQUEST | {"inputs": {"x": {"uri": str(tmp_path / "x")}, "y": {"uri": str(tmp_path / "y.parquet")},
                                 "b": {"uri": f"file://{tmp_path}/b.parquet"}},
                      "output": str(tmp_path / "out") + "/"}
    return body, want


def output(folder):
    parts = sorted(p for p in os.listdir(folder) if p.startswith("part-"))
    return np.concatenate([pq.read_table(os.path.join(folder, p)).column("value_0").to_numpy() for p in parts])


def wait(client, job_id, states=("done", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while (info := client.get(f"/v1/jobs/{job_id}").json())["state"] not in states:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def test_dataset_job_through_the_service(cluster, data, tmp_path):
    body, want = data
    app = create_app(settings(tmp_path, dataset_roots=[str(tmp_path)]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        reply = client.post("/v1/jobs", json=body)
        assert reply.status_code == 202, reply.text
        info = wait(client, reply.json()["id"])
        assert info["state"] == "done" and (info["rows"], info["cols"]) == (6000, 50), info
        meta, arrays = arrow.decode(client.get(f"/v1/jobs/{info['id']}/result").content)
        assert meta["output"] == body["output"] and arrays == []
    np.testing.assert_allclose(output(tmp_path / "out"), want[:, 0], rtol=1e-12)


def test_dataset_uris_outside_the_roots_are_refused(cluster, data, tmp_path):
    body, _ = data
    root = tmp_path / "allowed"
    root.mkdir()
    cases = [(body, "outside the server's dataset roots"),
             (body | {"output": str(root / ".." / "out")}, "output"),
             (body | {"output": f"s3://bucket/{root}/out/"}, "outside"),
             (body | {"inputs": {**body["inputs"], "z": [1.0]}, "output": str(root / "o")}, "not in the aliases")]
    app = create_app(settings(tmp_path, dataset_roots=[str(root)]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for request, message in cases:
            reply = client.post("/v1/jobs", json=request)
            assert reply.status_code in (403, 422) and message in reply.json()["detail"], reply.text
    app = create_app(settings(tmp_path / "local"))                       # the local executor runs no dataset job
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        reply = client.post("/v1/jobs", json=body)
        assert reply.status_code == 422 and "cluster executor" in reply.json()["detail"]


def test_interrupted_dataset_job_is_rerun_by_the_next_server(cluster, data, tmp_path):
    body, want = data
    config = settings(tmp_path, dataset_roots=[str(tmp_path)])
    with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            deadline = time.monotonic() + 60
            while not os.path.isdir(tmp_path / "out") or \
                    len([p for p in os.listdir(tmp_path / "out") if p.startswith("part-")]) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    # the server stopped mid-job: the job is left `running`; the next server re-runs it
    written = {p for p in os.listdir(tmp_path / "out") if p.startswith("part-")}
    stamps = {p: os.stat(tmp_path / "out" / p).st_mtime_ns for p in written}
    assert 2 <= len(written) < 12
    with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert wait(client, job_id)["state"] == "done"
    assert all(os.stat(tmp_path / "out" / p).st_mtime_ns == stamps[p] for p in written)   # not rewritten
    np.testing.assert_allclose(output(tmp_path / "out"), want[:, 0], rtol=1e-12)


def test_client_submit_dataset(cluster, data, tmp_path):
    from kred import Client
    body, want = data
    app = create_app(settings(tmp_path, dataset_roots=[str(tmp_path)]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, Client(server.url) as client:
        inputs = {"x": str(tmp_path / "x"), "y": {"uri": str(tmp_path / "y.parquet"), "columns": ["p", "q", "r"]},
                  "b": body["inputs"]["b"]["uri"]}
        job = client.submit_dataset(REQUEST["formula"], REQUEST["aliases"], inputs, body["output"], axis=1)
        info = job.wait(timeout=120)
        assert info["state"] == "done" and (info["rows"], info["cols"]) == (6000, 50), info
    np.testing.assert_allclose(output(tmp_path / "out"), want[:, 0], rtol=1e-12)
