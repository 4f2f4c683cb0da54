"""Every example of examples/ runs at a small size, in-process and through the in-process service, and its own
check against an independent computation passes (the script's exit status). The batch job is a dataset job file,
which runs on Ray's workers: in-process it is `kred run`'s embedded cluster, and through a service with the cluster
executor (one local Ray for both)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import anyio.from_thread
import httpx
import pytest

from kred import Client
from kred.service.app import create_app
from kred.service.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

# example -> a small --size that still exercises it
SIZES = {"kmeans": 4000, "knn": 2000, "gp_regression": 300, "sinkhorn": 300, "gmm_em": 3000, "block_sparse": 4000,
         "batch_job": 3000}


class ASGISync(httpx.BaseTransport):
    """A synchronous httpx transport to an ASGI app, for the synchronous kred.Client: each request runs on an
    event loop in a helper thread (anyio's blocking portal), through httpx's own ASGITransport."""

    def __init__(self, portal, app):
        self.portal, self.inner = portal, httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send():
            request.read()
            response = await self.inner.handle_async_request(request)
            return httpx.Response(response.status_code, headers=response.headers, content=await response.aread())
        return self.portal.call(send)


@pytest.fixture(scope="module")
def server_client(tmp_path_factory):
    app = create_app(Settings(store_dir=tmp_path_factory.mktemp("jobs"), executor="local"))
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            with Client("http://kred", transport="arrow", http_transport=ASGISync(portal, app)) as client:
                yield client


def passes(name: str, mode: str, tmp_path, capsys, client=None) -> None:
    """The example exits with 0, says its check passed and saved its picture."""
    module = importlib.import_module(name)
    status = module.main(["--size", str(SIZES[name]), "--mode", mode, "--out", str(tmp_path)], client=client)
    out = capsys.readouterr().out
    assert status == 0 and "check ok" in out, out
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(set(SIZES) - {"batch_job"}))
def test_example_in_process(name, tmp_path, capsys):
    passes(name, "local", tmp_path, capsys)


@pytest.mark.parametrize("name", sorted(set(SIZES) - {"batch_job"}))
def test_example_through_the_service(name, tmp_path, capsys, server_client):
    passes(name, "server", tmp_path, capsys, server_client)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (loopback, small object store) for the dataset job's two runs; each starts its Cluster on it."""
    import ray
    from conftest import start_ray
    start_ray(num_cpus=2, object_store_memory=100 << 20)
    yield
    ray.shutdown()


def test_batch_job_in_process(local_ray, tmp_path, capsys):
    """`--mode local`: the job file through kred.cluster.run_job_file, as `kred run` runs it (here on the test's Ray)."""
    passes("batch_job", "local", tmp_path, capsys)
    assert len(list((tmp_path / "batch_job" / "result").glob("part-*.parquet"))) == 4     # one file per row group


def test_batch_job_through_the_service(local_ray, tmp_path, capsys):
    """`--mode server`: POST /v1/jobs with the datasets' paths to a server with the cluster executor."""
    from kred.service.executors import ClusterExecutor
    executor = ClusterExecutor(device="cpu", workers=1, threads=1)
    app = create_app(Settings(store_dir=tmp_path / "jobs", executor="cluster", dataset_roots=[str(tmp_path)]),
                     executor=executor)
    try:
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
                with Client("http://kred", transport="arrow", http_transport=ASGISync(portal, app)) as client:
                    passes("batch_job", "server", tmp_path, capsys, client)
    finally:
        executor.close()
