"""Issue 20 rows 1, 2, 3, 9 and issue 23 part 2, against a real uvicorn on 127.0.0.1 with the cluster executor on a
real local Ray: dataset URIs are resolved once into a sandboxed filesystem (the path checked is the path opened);
outside a root there is one 403 whatever exists there; no URI option reaches a filesystem (a fake listener sees no
connection) while a server-configured S3-compatible endpoint (moto) runs a whole job; a job's output and shards are
budgeted before it starts and each file is held to its share while written; a worker that cannot see a `file://`
input says so.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from conftest import start_ray
from kred.engine.cluster import Cluster
from kred.engine.cluster.confined import confined
from kred.engine.cluster.dataset import Dataset, DatasetError, Location, write_part
from kred.engine.spec import Spec, make_plan
from kred.service.app import create_app
from kred.service.executors import ClusterExecutor
from service_helpers import Server, settings

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1024 * 1024
REQUEST = {"formula": "Exp(-SqDist(x, y)) * b", "aliases": ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], "axis": 1}
DENIED = "is outside the server's dataset roots"


@pytest.fixture(scope="module")
def moto():
    """An S3-compatible server on 127.0.0.1; the server process and the Ray workers (started after it, with this
    environment) reach it only through the standard AWS_* variables."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test-key",
                      AWS_SECRET_ACCESS_KEY="test-secret", AWS_REGION="us-east-1")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(moto):
    start_ray(num_cpus=2, object_store_memory=100 * MB)
    try:
        with Cluster(device="cpu", workers=1, threads=1, backend="reference", idle_timeout=None) as cl:
            yield cl
    finally:
        ray.shutdown()


def write(path, rows: int, seed: int, marker: str = "u"):
    rng = np.random.default_rng(seed)
    x = rng.random((rows, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({marker: x[:, 0], "v": x[:, 1], "w": x[:, 2]}), path)
    return x


@pytest.fixture
def tree(tmp_path):
    """root/ (the dataset root): in/x.parquet (10 rows), a folder literally named %2e%2e (10 rows), y and b;
    outside/x.parquet (50 rows), victim/ (an existing dataset of 10 rows); root/latest -> ../.. (points out)."""
    root = tmp_path / "root"
    x = write(str(root / "in" / "x.parquet"), 10, 1)
    write(str(root / "%2e%2e" / "outside" / "x.parquet"), 10, 2)
    write(str(tmp_path / "outside" / "x.parquet"), 50, 3)
    write(str(tmp_path / "victim" / "part-000000.parquet"), 10, 4)
    rng = np.random.default_rng(5)
    y, b = rng.random((7, 3)), rng.random((7, 1))
    pq.write_table(pa.table({"p": y[:, 0], "q": y[:, 1], "r": y[:, 2]}), root / "y.parquet")
    pq.write_table(pa.table({"b": b[:, 0]}), root / "b.parquet")
    os.symlink("../..", root / "latest")
    return tmp_path, root, x, y, b


def body(root, x_uri, output):
    return REQUEST | {"inputs": {"x": {"uri": x_uri}, "y": {"uri": str(root / "y.parquet")},
                                 "b": {"uri": str(root / "b.parquet")}}, "output": output}


def snapshot(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


def wait(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while (info := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def dense(x, y, b):
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b


def read_output(fs, folder):
    parts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder)) if "part-" in i.path)
    tables = []
    for p in parts:
        with fs.open_input_file(p) as f:
            tables.append(pq.read_table(f).column("value_0").to_numpy())
    return np.concatenate(tables)


def test_row1_dot_segments_and_symlinks_out_of_the_root_are_403(cluster, tree):
    tmp, root, x, y, b = tree
    before = snapshot(tmp / "victim") | snapshot(tmp / "outside")
    escapes = [body(root, f"file://{root}/%2e%2e/outside/x.parquet", str(root / "o1/")),   # the observed input
               body(root, f"file://{root}/%2E%2e/%2e%2E/{tmp.name}/outside/x.parquet", str(root / "o2/")),
               body(root, f"{root}/../outside/x.parquet", str(root / "o3/")),
               body(root, f"{root}/latest/{tmp.parent.name}/{tmp.name}/outside/x.parquet", str(root / "o4/")),
               body(root, str(root / "in" / "x.parquet"), f"file://{root}/%2e%2e/victim/"),         # observed
               body(root, str(root / "in" / "x.parquet"), f"{root}/latest/{tmp.parent.name}/{tmp.name}/victim/")]
    app = create_app(settings(tmp, dataset_roots=[str(root)]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for request in escapes:
            reply = client.post("/v1/jobs", json=request)
            assert reply.status_code == 403 and DENIED in reply.json()["detail"], (request, reply.text)
        # a plain path is opened as written: root/%2e%2e/ is a folder of the root (10 rows), not its parent
        reply = client.post("/v1/jobs", json=body(root, f"{root}/%2e%2e/outside/x.parquet", str(root / "o5/")))
        assert reply.status_code == 202, reply.text
        assert wait(client, reply.json()["id"])["rows"] == 10
        # and a URI is decoded once, as it is opened: %20 names the folder "a b"
        write(str(root / "a b" / "x.parquet"), 10, 1)
        reply = client.post("/v1/jobs", json=body(root, f"file://{root}/a%20b/x.parquet", f"file://{root}/o%206/"))
        assert reply.status_code == 202, reply.text
        assert wait(client, reply.json()["id"])["state"] == "done"
    assert snapshot(tmp / "victim") | snapshot(tmp / "outside") == before          # nothing outside written
    got = pq.read_table(root / "o 6").column("value_0").to_numpy()
    np.testing.assert_allclose(got, dense(x, y, b)[:, 0], rtol=1e-12)


def test_row1_the_workers_reopen_through_the_sandbox(tmp_path):
    """The filesystem handed to a worker re-resolves every path it opens: a symlink swapped in after the check
    (the window between the server's check and a worker's open) is refused there too."""
    root = tmp_path / "root"
    write(str(root / "d" / "x.parquet"), 4, 1)
    write(str(tmp_path / "secret" / "x.parquet"), 4, 2)
    fs = confined(str(root))
    assert fs.get_file_info("d/x.parquet").type == pafs.FileType.File
    shipped = pickle.loads(pickle.dumps(fs))                 # as a worker receives it
    os.rename(root / "d", root / "d-old")
    os.symlink(tmp_path / "secret", root / "d")
    with pytest.raises(PermissionError, match="outside the dataset root"):
        shipped.open_input_file("d/x.parquet")
    with pytest.raises(PermissionError):
        shipped.open_output_stream("d/new.parquet")
    assert [i.path for i in shipped.get_file_info(pafs.FileSelector("", recursive=True))
            if i.path.startswith("d/")] == []                # a listing does not follow it either


def test_row2_outside_a_root_one_403_whatever_exists(cluster, tree):
    tmp, root, *_ = tree
    probes = ["/etc/passwd", "/etc/no-such-file-here", str(tmp / "outside" / "x.parquet"), str(tmp / "outside"),
              str(tmp / "nothing" / "x.parquet"), f"file://{root}/%2e%2e/outside/x.parquet",
              f"file://{root}/%2e%2e/nothing.parquet", f"{root}/latest/etc/passwd", f"{root}/latest/nope"]
    app = create_app(settings(tmp, dataset_roots=[str(root)]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        replies = [client.post("/v1/jobs", json=body(root, uri, str(root / "o/"))) for uri in probes]
    assert {(r.status_code, r.text) for r in replies} == {
        (403, '{"error":"dataset_denied","detail":"input x is outside the server\'s dataset roots"}')}


class Listener:
    """A TCP listener on 127.0.0.1 that records whether anyone connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except socket.timeout:
            return False
        conn.close()
        return True


def test_row3_uri_options_never_reach_a_filesystem_and_s3_runs_on_the_configured_endpoint(cluster, moto, tmp_path):
    # from the AWS_* environment (endpoint included), as the server's root filesystem is
    s3, _ = pafs.FileSystem.from_uri("s3://bucket?allow_bucket_creation=true")
    s3.create_dir("bucket")
    rng = np.random.default_rng(7)
    x, y, b = rng.random((300, 3)), rng.random((20, 3)), rng.random((20, 1))
    for name, array, columns in (("x", x, "uvw"), ("y", y, "pqr"), ("b", b, "b")):
        with s3.open_output_stream(f"bucket/kred/{name}/part.parquet") as sink:
            pq.write_table(pa.table({c: array[:, k] for k, c in enumerate(columns)}), sink, row_group_size=100)
    listener = Listener()
    evil = f"?endpoint_override=127.0.0.1:{listener.port}&scheme=http"
    ok = REQUEST | {"inputs": {n: {"uri": f"s3://bucket/kred/{n}/"} for n in "xyb"},
                    "output": "s3://bucket/kred/out/"}
    app = create_app(settings(tmp_path, dataset_roots=["s3://bucket/kred/"]), executor=ClusterExecutor(cluster=cluster))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for request in (ok | {"inputs": ok["inputs"] | {"x": {"uri": "s3://bucket/kred/x/" + evil}}},   # observed
                        ok | {"output": "s3://bucket/kred/out/" + evil},
                        ok | {"inputs": ok["inputs"] | {"x": {"uri": "s3://bucket/kred/x/#frag"}}}):
            reply = client.post("/v1/jobs", json=request)
            assert reply.status_code == 422 and "query string" in reply.json()["detail"], reply.text
        reply = client.post("/v1/jobs", json=ok | {"output": "gs://bucket/kred/out/"})     # a scheme of no root
        assert reply.status_code == 403 and DENIED in reply.json()["detail"]
        assert not listener.connected()
        reply = client.post("/v1/jobs", json=ok)
        assert reply.status_code == 202, reply.text
        info = wait(client, reply.json()["id"])
        assert info["state"] == "done" and info["rows"] == 300, info
    assert not listener.connected()
    np.testing.assert_allclose(read_output(s3, "bucket/kred/out"), dense(x, y, b)[:, 0], rtol=1e-12)


def test_row9_output_and_shard_budgets_before_the_job_and_while_writing(cluster, tree):
    tmp, root, x, y, b = tree
    request = body(root, str(root / "in" / "x.parquet"), str(root / "out/"))
    kmin = request | {"formula": "SqDist(x, y)", "reduction_op": "ArgKMin", "opt_arg": 5}
    cases = [(settings(tmp, dataset_roots=[str(root)], max_output_bytes_per_job=50), request,
              "(max_output_bytes_per_job)"),
             (settings(tmp, dataset_roots=[str(root)], max_shard_bytes=500), request, "max_shard_bytes (500)")]
    for config, job, message in cases:
        with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            reply = client.post("/v1/jobs", json=job)
            assert reply.status_code == 413 and message in reply.json()["detail"], reply.text
    assert not (root / "out").exists()                          # refused before anything was written
    # the budget grows with the output's width: ArgKMin K=5 (10 rows of 5 int64) is admitted where K=7 is not
    config = settings(tmp, dataset_roots=[str(root)], max_output_bytes_per_job=10 * 5 * 8)
    with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/jobs", json=kmin | {"opt_arg": 7}).status_code == 413
        reply = client.post("/v1/jobs", json=kmin)
        assert reply.status_code == 202, reply.text
        assert wait(client, reply.json()["id"])["state"] == "done"
    want = np.argsort(((x[:, None] - y[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :5]
    got = np.column_stack([c.to_numpy() for c in pq.read_table(root / "out").columns])
    np.testing.assert_array_equal(got, want)
    # per tenant: the output budgets of its jobs in the store add up to at most its max_output_bytes
    one_job = (64 << 10) + 10 * 8 * 3 // 2 + 256
    config = settings(tmp / "t", dataset_roots=[str(root)],
                      tenants=[{"name": "t", "token": "tok", "max_output_bytes": one_job + 10}])
    with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server, \
            httpx.Client(base_url=server.url, timeout=60, headers={"authorization": "Bearer tok"}) as client:
        first = client.post("/v1/jobs", json=request | {"output": str(root / "t1/")})
        assert first.status_code == 202, first.text
        second = client.post("/v1/jobs", json=request | {"output": str(root / "t2/")})
        assert second.status_code == 413 and f"max_output_bytes ({one_job + 10})" in second.json()["detail"]
        wait(client, first.json()["id"])
    # while writing: a block's file past its share is refused, and nothing is left behind
    plan = make_plan(Spec(REQUEST["formula"], REQUEST["aliases"], axis=1))
    target = Location(pafs.LocalFileSystem(), str(tmp / "w"), "w")
    os.makedirs(tmp / "w")
    with pytest.raises(DatasetError, match="past its output budget of 100 bytes"):
        write_part(target, 0, np.zeros((10, 1)), plan, max_bytes=100)
    assert os.listdir(tmp / "w") == []


def test_issue23_a_file_the_workers_cannot_see_fails_naming_it(cluster, tmp_path):
    """A path that exists only for the driver process: /proc/self/fd/N of a descriptor only the driver holds. Its
    metadata is read here; the worker, another process, cannot open it, and the job's error says so."""
    write(str(tmp_path / "x.parquet"), 10, 1)
    fd = os.open(tmp_path / "x.parquet", os.O_RDONLY)
    only_here = os.dup2(fd, 987)
    try:
        path = f"/proc/self/fd/{only_here}"
        plan = make_plan(Spec(REQUEST["formula"], REQUEST["aliases"], axis=1))
        y, b = np.ones((4, 3)), np.ones((4, 1))
        job = cluster.submit_dataset(plan, [Dataset(path), y, b], str(tmp_path / "out"))
        with pytest.raises(DatasetError, match=f"x: {path} was listed .* cannot see it: the workers cannot read"):
            job.result(timeout=120)
    finally:
        os.close(only_here)
        os.close(fd)
