"""How often arrays are validated and copied between the caller and the kernel, on each path (issue #15 part 6).

A counting hook on `Plan.check_args` counts validations; a hook on the backend's `reduce` records the arrays the
kernel receives, and `np.shares_memory` says whose memory they are: the caller's (in process), the received body
(Arrow), or the server's own copy read from the client's segment (shared memory). Results are compared with a dense
numpy computation written here.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from kred.engine.backends import get_backend
from kred.engine.plan import Plan
from kred.numpy import Genred
from kred.service import transport
from kred.service.app import create_app
from kred.wire import arrow

from service_helpers import Running, settings

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]
FORMULA = "SqDist(x, y) * b"


def dense(x, y, b):
    return (((x[:, None] - y[None]) ** 2).sum(-1, keepdims=True) * b[None]).sum(1)


def data(n=40, m=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(m, 3)), rng.normal(size=(m, 2))


@pytest.fixture
def probe(monkeypatch):
    """Counts `Plan.check_args` calls and records the arrays the reference backend's `reduce` receives."""
    seen = {"checks": 0, "kernel": []}
    check_args, backend = Plan.check_args, type(get_backend("reference"))
    reduce = backend.reduce

    def counting(self, *args, **kwargs):
        seen["checks"] += 1
        return check_args(self, *args, **kwargs)

    def recording(self, plan, arrays, n, m):
        seen["kernel"].append(list(arrays))
        return reduce(self, plan, arrays, n, m)

    monkeypatch.setattr(Plan, "check_args", counting)
    monkeypatch.setattr(backend, "reduce", recording)
    return seen


def test_in_process_contiguous_arrays_reach_the_kernel_uncopied_and_checked_once(probe):
    x, y, b = data()
    op = Genred(FORMULA, ALIASES, axis=1)
    np.testing.assert_allclose(op(x, y, b, backend="reference"), dense(x, y, b), rtol=1e-10)
    assert probe["checks"] == 1
    (kernel,) = probe["kernel"]
    assert all(k is a for k, a in zip(kernel, (x, y, b)))


@pytest.fixture
def bodies(monkeypatch):
    """The request bodies the server received."""
    received = []
    read_body = transport.read_body

    async def keeping(request):
        body = await read_body(request)
        received.append(body)
        return body

    monkeypatch.setattr(transport, "read_body", keeping)
    return received


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_arrow_arrays_are_views_of_the_body_checked_once(tmp_path, anyio_backend, probe, bodies):
    x, y, b = data()
    async with Running(create_app(settings(tmp_path))) as running:
        async with running.client(transport="arrow") as c:
            result = await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)
    np.testing.assert_allclose(result, dense(x, y, b), rtol=1e-10)
    assert result.flags.writeable
    assert probe["checks"] == 1                               # the server's bind, not again in the executor
    (kernel,) = probe["kernel"]
    (body,) = bodies
    received = np.frombuffer(body, np.uint8)
    assert all(np.shares_memory(k, received) for k in kernel)  # zero copies from the body to the kernel


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_batched_arrow_request_is_checked_once_per_item(tmp_path, anyio_backend, probe):
    rng = np.random.default_rng(1)
    x, y, b = rng.normal(size=(2, 10, 3)), rng.normal(size=(2, 8, 3)), rng.normal(size=(2, 8, 2))
    async with Running(create_app(settings(tmp_path))) as running:
        async with running.client(transport="arrow") as c:
            result = await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)
    np.testing.assert_allclose(result, np.stack([dense(*item) for item in zip(x, y, b)]), rtol=1e-10)
    assert probe["checks"] == 2                               # one per batch item, each once


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_shared_memory_arrays_are_read_once_and_checked_once(tmp_path, anyio_backend, probe, monkeypatch):
    from kred.wire.shm import ClientSegments

    reads = []
    read = ClientSegments.read
    monkeypatch.setattr(ClientSegments, "read", lambda self, item: reads.append(read(self, item)) or reads[-1])
    x, y, b = data()
    async with Running(create_app(settings(tmp_path))) as running:
        async with running.client(transport="shm") as c:
            result = await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)
    np.testing.assert_allclose(result, dense(x, y, b), rtol=1e-10)
    assert probe["checks"] == 1
    (kernel,) = probe["kernel"]
    assert all(k is r for k, r in zip(kernel, reads))          # the server's one pread copy, nothing more


def test_arrow_encode_copies_a_large_array_once():
    """Client array -> IPC body: the body is the only new memory (numpy allocations traced by tracemalloc, Arrow's
    by its pool), and the array's bytes sit in it once."""
    x = np.random.default_rng(0).normal(size=(1 << 20, 4))      # 32 MiB
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    tracemalloc.start()
    try:
        body = arrow.encode({"formula": "x"}, [x])
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert numpy_peak < x.nbytes // 16
    assert x.nbytes <= body.size < x.nbytes + 4096
    assert pool.bytes_allocated() - before <= body.size + 4096
    _, (decoded,) = arrow.decode(body)
    assert np.shares_memory(decoded, np.frombuffer(body, np.uint8)) and np.array_equal(decoded, x)
