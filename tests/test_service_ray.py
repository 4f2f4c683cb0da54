"""The service on a real local Ray (engine.cluster through the ClusterExecutor), end to end over uvicorn.

One Ray instance for the module (2 logical CPUs, bounded object store) and one Cluster of 2 CPU workers on the numpy
reference backend, shared by an app served by a real uvicorn. Results are checked against dense numpy and torch.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from kred.client import Client  # noqa: E402
from conftest import start_ray  # noqa: E402
from kred.engine.cluster import Cluster  # noqa: E402
from kred.service.app import create_app  # noqa: E402
from kred.service.executors import ClusterExecutor  # noqa: E402
from service_helpers import ALIASES, CASES, FORMULA, Server, assert_matches, data, dense, settings  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    start_ray(num_cpus=2, object_store_memory=200 * 1024 * 1024)
    try:
        with Cluster(device="cpu", workers=2, threads=1, backend="reference", min_shard_pairs=1) as cluster:
            app = create_app(settings(tmp_path_factory.mktemp("ray")), executor=ClusterExecutor(cluster=cluster))
            with Server(app) as running:
                yield running
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", params=["arrow", "shm"])
def client(server, request):
    with Client(server.url, transport=request.param) as c:
        assert c.health()["executor"] == "cluster"
        yield c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_reduction_through_ray(client, case, axis, dtype):
    reduction, formula, formula2, k = case
    x, y, b = data(dtype, n=40, m=30, seed=3)
    result = client.reduce(formula, ALIASES, x, y, b, reduction_op=reduction, axis=axis, opt_arg=k, formula2=formula2)
    assert_matches(result, dense(reduction, formula, formula2, k, axis, x, y, b), dtype)


def test_gradient_through_ray(client):
    x, y, b = (torch.from_numpy(a).requires_grad_() for a in data(np.float64, n=12, m=10))
    cotangent = torch.ones((12, 2), dtype=torch.float64)
    got = client.grad(FORMULA, ALIASES, x.detach(), y.detach(), b.detach(), wrt="y", cotangent=cotangent,
                      reduction_op="LogSumExp", axis=1)
    f = ((x[:, None] - y[None]) ** 2).sum(-1, keepdim=True) * b[None]
    want = torch.autograd.grad(torch.logsumexp(f, 1).sum(), y)[0]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9)


def test_job_progress_and_cancel_through_ray(client):
    x, y, b = data(n=400, m=300)
    job = client.submit(FORMULA, ALIASES, x, y, b, axis=1)
    assert_matches(job.result(timeout=60), dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)
    assert job.status()["progress"] == 1.0
    # a job big enough (seconds here) to still be running when cancelled
    x, y, b = data(n=8000, m=3000)
    job = client.submit("Exp(-SqDist(x, y)) * b", ALIASES, x, y, b, reduction_op="LogSumExp", axis=1)
    deadline = time.monotonic() + 30
    while job.status()["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    info = job.cancel(wait=True, timeout=60)
    assert info["state"] == "cancelled" and info["progress"] < 1.0
    assert time.monotonic() - started < 10
    assert client.health()["status"] == "ok"
