"""The client on its own: a client-only install, retries, timeouts, error mapping, shared-memory cleanup."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from kred.client import AsyncClient, Client, LimitExceeded, RemoteError, ServerUnreachable, TooBusy, Unauthorized
from kred.engine.errors import ArgumentError, DimensionError, FormulaError
from kred.wire import arrow
from kred.service.app import create_app
from service_helpers import ALIASES, FORMULA, Running, assert_matches, data, dense, settings

ROOT = Path(__file__).resolve().parents[1]


def arrow_reply(request: httpx.Request) -> httpx.Response:
    """A stand-in server: decodes the request and answers x summed over its rows, as an Arrow stream."""
    meta, arrays = arrow.decode(request.content)
    body = arrow.encode({"names": ["value"], "timings": {}}, [arrays[0].sum(0, keepdims=True)])
    return httpx.Response(200, content=bytes(body), headers={"content-type": arrow.CONTENT_TYPE})


def test_client_imports_without_the_server_stack():
    blocked = ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client", "ray", "torch"]
    script = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None                       # importing any of them now fails
import httpx, numpy as np
from kred.client import Client
def reply(request):
    from kred.wire import arrow
    meta, arrays = arrow.decode(request.content)
    assert meta["formula"] == "x" and meta["reduction_op"] == "Sum"
    body = arrow.encode({{"names": ["value"]}}, [arrays[0] * 2])
    return httpx.Response(200, content=bytes(body), headers={{"content-type": arrow.CONTENT_TYPE}})
with Client("http://kred", transport="arrow", http_transport=httpx.MockTransport(reply)) as c:
    print(c.reduce("x", ["x = Vi(1)"], np.ones((3, 1))).ravel().tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2.0, 2.0, 2.0]"


class Flaky:
    """Fails the first `failures` requests with `error`, then answers like `arrow_reply`."""

    def __init__(self, failures: int, error: type[Exception]):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, request):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("simulated", request=request)
        if request.url.path == "/v1/jobs":
            return httpx.Response(202, json={"id": "j1", "state": "queued", "progress": 0.0, "created": 0.0})
        return arrow_reply(request)


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError])
def test_idempotent_calls_are_retried(error):
    flaky = Flaky(2, error)
    with Client("http://kred", transport="arrow", retries=3, http_transport=httpx.MockTransport(flaky)) as c:
        c.reduce("x", ["x = Vi(2)"], np.ones((4, 2)))
    assert flaky.calls == 3


def test_retries_give_up_and_timeouts_are_not_retried():
    flaky = Flaky(10, httpx.ConnectError)
    with Client("http://kred", transport="arrow", retries=2, http_transport=httpx.MockTransport(flaky)) as c:
        with pytest.raises(ServerUnreachable, match="cannot reach a kred server at http://kred: simulated"):
            c.reduce("x", ["x = Vi(2)"], np.ones((4, 2)))
    assert flaky.calls == 3
    slow = Flaky(1, httpx.ReadTimeout)
    with Client("http://kred", transport="arrow", http_transport=httpx.MockTransport(slow)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.reduce("x", ["x = Vi(2)"], np.ones((4, 2)))
    assert slow.calls == 1


def test_submitting_a_job_is_retried_only_when_nothing_was_sent():
    lost = Flaky(1, httpx.ReadError)         # the server may have stored the job: do not submit it twice
    with Client("http://kred", transport="arrow", http_transport=httpx.MockTransport(lost)) as c:
        with pytest.raises(httpx.ReadError):
            c.submit("x", ["x = Vi(2)"], np.ones((4, 2)))
    refused = Flaky(1, httpx.ConnectError)
    with Client("http://kred", transport="arrow", http_transport=httpx.MockTransport(refused)) as c:
        assert c.submit("x", ["x = Vi(2)"], np.ones((4, 2))).id == "j1"
    assert refused.calls == 2


@pytest.mark.parametrize("status,body,expected", [
    (422, {"error": "FormulaError", "detail": "unknown op 'Foo'"}, FormulaError),
    (422, {"error": "DimensionError", "detail": "dims differ"}, DimensionError),
    (422, {"error": "ArgumentError", "detail": "y has 3 rows"}, ArgumentError),
    (422, {"error": "limit", "detail": "too many pairs"}, LimitExceeded),
    (413, {"error": "limit", "detail": "too big"}, LimitExceeded),
    (401, {"error": "unauthorized", "detail": "token"}, Unauthorized),
    (429, {"error": "too_busy", "detail": "full"}, TooBusy),
    (500, {"error": "internal", "detail": "internal server error (reference 1)"}, RemoteError),
    (502, None, RemoteError),
])
def test_error_statuses_become_exceptions(status, body, expected):
    def reply(request):
        if body is None:
            return httpx.Response(status, text="Bad Gateway from a proxy")
        return httpx.Response(status, json=body)
    with Client("http://kred", transport="arrow", retries=0, http_transport=httpx.MockTransport(reply)) as c:
        with pytest.raises(expected) as caught:
            c.reduce("x", ["x = Vi(2)"], np.ones((4, 2)))
    message = str(caught.value)
    assert (body["detail"] if body else "Bad Gateway") in message


def test_token_is_sent_as_a_bearer_header(monkeypatch):
    seen = []

    def reply(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})
    with Client("http://kred", token="abc", http_transport=httpx.MockTransport(reply)) as c:
        c.health()
    monkeypatch.setenv("KRED_TOKEN", "from-env")
    with Client("http://kred", http_transport=httpx.MockTransport(reply)) as c:
        c.health()
    assert seen == ["Bearer abc", "Bearer from-env"]


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="transport"):
        Client("http://kred", transport="carrier-pigeon")


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("kred_")}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_shared_memory_segments_are_released(tmp_path, anyio_backend):
    before = _segments()
    x, y, b = data()
    async with Running(create_app(settings(tmp_path))) as running:
        async with running.client(transport="shm") as c:
            for axis in (0, 1):
                assert_matches(await c.reduce(FORMULA, ALIASES, x, y, b, axis=axis),
                               dense("Sum", FORMULA, None, None, axis, x, y, b), np.float64)
            assert len(_segments() - before) <= 4            # a small pool, reused between calls
        assert _segments() == before


def test_forced_shared_memory_against_a_remote_server_fails_clearly():
    def reply(request):
        return httpx.Response(200, json={"shared_memory": False, "sha256": None})
    with Client("http://elsewhere", transport="shm", http_transport=httpx.MockTransport(reply)) as c:
        with pytest.raises(RemoteError, match="cannot read this client's shared memory"):
            c.reduce("x", ["x = Vi(2)"], np.ones((4, 2)))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_client_retries(anyio_backend):
    flaky = Flaky(1, httpx.ConnectError)

    async def handler(request):
        return flaky(request)
    async with AsyncClient("http://kred", transport="arrow", http_transport=httpx.MockTransport(handler)) as c:
        result = await c.reduce("x", ["x = Vi(2)"], np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(result, [[12.0, 16.0]])
    assert flaky.calls == 2
