"""Shared by the service and client tests: dense oracles for every reduction, and servers to talk to.

The oracles build the full N x M x D array of formula values with numpy in float64 and reduce it directly, which is
independent of the engine's tiled, monoid-based code.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import uvicorn

from kred.client import AsyncClient
from kred.wire import arrow

from kred.service.settings import Settings

# The formula of every case: x = Vi(3), y = Vj(3), b = Vj(2). F[i, j] = |x_i - y_j|^2 * b_j  (dimension 2).
ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]
FORMULA = "SqDist(x, y) * b"
SCALAR = "-SqDist(x, y)"                 # for the weighted reductions, whose formula is scalar
WEIGHTS = "b + SqNorm2(x)"               # their formula2 (dimension 2)
K = 3

# (reduction, formula, formula2, opt_arg)
CASES = [
    ("Sum", FORMULA, None, None), ("Min", FORMULA, None, None), ("Max", FORMULA, None, None),
    ("ArgMin", FORMULA, None, None), ("ArgMax", FORMULA, None, None), ("Min_ArgMin", FORMULA, None, None),
    ("Max_ArgMax", FORMULA, None, None), ("KMin", FORMULA, None, K), ("ArgKMin", FORMULA, None, K),
    ("KMin_ArgKMin", FORMULA, None, K), ("LogSumExp", SCALAR, None, None),
    ("LogSumExpWeight", SCALAR, WEIGHTS, None), ("SumSoftMaxWeight", SCALAR, WEIGHTS, None),
    ("Max_SumShiftExp", SCALAR, None, None), ("Max_SumShiftExpWeight", SCALAR, WEIGHTS, None),
]


def data(dtype=np.float64, n=23, m=17, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(dtype)
    y = rng.normal(size=(m, 3)).astype(dtype)
    b = rng.uniform(0.5, 1.5, size=(m, 2)).astype(dtype)
    return x, y, b


def dense_values(formula: str, x, y, b) -> np.ndarray:
    """The formula on every (i, j) pair, shape (N, M, D), float64."""
    x, y, b = (np.asarray(a, np.float64) for a in (x, y, b))
    sqdist = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1, keepdims=True)
    if formula == FORMULA:
        return sqdist * b[None, :, :]
    if formula == SCALAR:
        return -sqdist
    if formula == WEIGHTS:
        return np.broadcast_to(b[None, :, :] + (x ** 2).sum(-1)[:, None, None], (len(x), len(y), 2))
    raise ValueError(formula)


def dense(reduction: str, formula: str, formula2, k, axis: int, x, y, b):
    """The expected result(s) of a reduction over j (axis=1) or over i (axis=0)."""
    f = dense_values(formula, x, y, b)
    g = dense_values(formula2, x, y, b) if formula2 else None
    if axis == 0:                       # rows are j, reduce over i
        f = f.transpose(1, 0, 2)
        g = g.transpose(1, 0, 2) if g is not None else None
    n = f.shape[0]
    if reduction == "Sum":
        return f.sum(1)
    if reduction in ("Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin", "Max_ArgMax"):
        pick = np.argmin if "Min" in reduction else np.argmax
        index = pick(f, axis=1)
        value = np.take_along_axis(f, index[:, None, :], 1)[:, 0, :]
        return {"Min": value, "Max": value, "ArgMin": index, "ArgMax": index}.get(reduction, (value, index))
    if reduction in ("KMin", "ArgKMin", "KMin_ArgKMin"):
        order = np.argsort(f, axis=1, kind="stable")[:, :k, :]
        value = np.take_along_axis(f, order, 1).reshape(n, -1)
        index = order.reshape(n, -1)
        return {"KMin": value, "ArgKMin": index}.get(reduction, (value, index))
    top = f.max(1)
    shifted = np.exp(f - top[:, None, :])
    if reduction == "LogSumExp":
        return top + np.log(shifted.sum(1))
    if reduction == "LogSumExpWeight":
        return top + np.log((shifted * g).sum(1))
    if reduction == "SumSoftMaxWeight":
        return (shifted * g).sum(1) / shifted.sum(1)
    if reduction == "Max_SumShiftExp":
        return np.concatenate([top, shifted.sum(1)], 1)
    if reduction == "Max_SumShiftExpWeight":
        return np.concatenate([top, (shifted * g).sum(1)], 1)
    raise ValueError(reduction)


def assert_matches(result, expected, dtype) -> None:
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    assert len(results) == len(expecteds)
    for got, want in zip(results, expecteds):
        got = np.asarray(got)
        assert got.shape == want.shape, (got.shape, want.shape)
        if want.dtype.kind == "i":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
        else:
            assert got.dtype == np.dtype(dtype)
            tol = 2e-5 if np.dtype(dtype) == np.float32 else 1e-10
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def settings(tmp_path, **overrides) -> Settings:
    """Test settings: the local executor on the numpy reference backend (no kernel compiles: the HTTP layer is what
    these tests are about; the backends have their own tests)."""
    return Settings(**{"store_dir": tmp_path / "jobs", "executor": "local", "backend": "reference"} | overrides)


class Server:
    """A real uvicorn serving `app` on 127.0.0.1 (a free port), in a thread of this process."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(formula=FORMULA, aliases=ALIASES, **options) -> dict:
    return {"formula": formula, "aliases": aliases, **options}


class Running:
    """An app with its lifespan running, and clients on it through the ASGI transport."""

    def __init__(self, app):
        self.app = app

    async def __aenter__(self):
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://kred")
        return self

    def client(self, **kwargs) -> AsyncClient:
        return AsyncClient("http://kred", http_transport=httpx.ASGITransport(app=self.app), **kwargs)

    async def __aexit__(self, *exc):
        await self.raw.aclose()
        await self._lifespan.__aexit__(*exc)

    async def post_arrow(self, meta, arrays, **kwargs):
        return await self.raw.post("/v1/reduce", content=bytes(arrow.encode(meta, arrays)),
                                   headers={"content-type": arrow.CONTENT_TYPE}, **kwargs)

    async def submit_arrow(self, meta, arrays, **kwargs):
        return await self.raw.post("/v1/jobs", content=bytes(arrow.encode(meta, arrays)),
                                   headers={"content-type": arrow.CONTENT_TYPE}, **kwargs)

    async def still_serving(self):
        assert (await self.raw.get("/healthz")).json()["status"] == "ok"
        x, y, b = data()
        async with self.client(transport="arrow") as c:
            result = await c.reduce(FORMULA, ALIASES, x, y, b, axis=1)
        assert_matches(result, dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)


def served_reductions(url: str) -> float:
    """How many reductions the server at `url` has answered with 200 (its /metrics, read by prometheus's parser)."""
    from prometheus_client.parser import text_string_to_metric_families
    families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == "kred_requests_total" and sample.labels.get("route") == "/v1/reduce"
               and sample.labels.get("status") == "200")
