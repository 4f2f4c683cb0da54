"""Every example of examples/ runs at a small size, in-process and through the in-process service, and its own
check against an independent computation passes (the script's exit status). One example runs on the cluster."""
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


def run(name: str, mode: str, tmp_path, client=None) -> int:
    module = importlib.import_module(name)
    return module.main(["--size", str(SIZES[name]), "--mode", mode, "--out", str(tmp_path)], client=client)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_example_in_process(name, tmp_path, capsys):
    assert run(name, "local", tmp_path) == 0, capsys.readouterr().out
    assert "check ok" in capsys.readouterr().out
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(SIZES))
def test_example_through_the_service(name, tmp_path, capsys, server_client):
    assert run(name, "server", tmp_path, server_client) == 0, capsys.readouterr().out
    assert "check ok" in capsys.readouterr().out


def test_batch_job_on_the_cluster(tmp_path, capsys):
    """The one cluster run: the job file through kred.cluster.run_job_file on an embedded Ray (loopback)."""
    import ray
    try:
        assert run("batch_job", "cluster", tmp_path) == 0, capsys.readouterr().out
        assert "check ok" in capsys.readouterr().out
    finally:
        ray.shutdown()
