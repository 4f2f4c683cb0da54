"""The HTTP service in-process (httpx ASGI transport): results, gradients, validation, errors, limits, auth, metrics.

Every result is compared with a dense numpy (or torch autograd) computation written in tests/service_helpers.py.
Real sockets are in test_service_http.py, jobs in test_service_jobs.py, Ray in test_service_ray.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kred.client import LimitExceeded, Unauthorized
from kred.engine.errors import ArgumentError, FormulaError
from kred.wire import arrow
from kred.service.app import create_app
from kred.service.executors import LocalExecutor
from kred.wire.shm import HEADER, Segment, new_key
from conftest import BACKENDS
from service_helpers import ALIASES, CASES, FORMULA, Running, assert_matches, data, dense, request, settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def server(tmp_path_factory):
    async with Running(create_app(settings(tmp_path_factory.mktemp("svc")))) as running:
        yield running


# Results ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["arrow", "shm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_every_reduction_equals_dense_numpy(server, case, axis, dtype, transport):
    reduction, formula, formula2, k = case
    x, y, b = data(dtype)
    async with server.client(transport=transport) as c:
        result = await c.reduce(formula, ALIASES, x, y, b, reduction_op=reduction, axis=axis, opt_arg=k,
                                formula2=formula2)
        assert await c.shared_memory() == (transport == "shm")
    assert_matches(result, dense(reduction, formula, formula2, k, axis, x, y, b), dtype)


async def test_fortran_order_and_one_dimensional_inputs(server):
    x, y, b = data()
    async with server.client(transport="arrow") as c:
        result = await c.reduce("SqDist(x, y) * w", ["x = Vi(3)", "y = Vj(3)", "w = Vj(1)"],
                                np.asfortranarray(x), y, b[:, 0], axis=1)
    expected = (((x[:, None] - y[None]) ** 2).sum(-1) * b[None, :, 0]).sum(1, keepdims=True)
    np.testing.assert_allclose(result, expected, rtol=1e-12)


async def test_torch_in_torch_out(server):
    x, y, b = data()
    async with server.client() as c:
        result = await c.reduce(FORMULA, ALIASES, torch.from_numpy(x), torch.from_numpy(y), b, axis=1)
    assert isinstance(result, torch.Tensor)
    np.testing.assert_allclose(result.numpy(), dense("Sum", FORMULA, None, None, 1, x, y, b), rtol=1e-12)


# Gradients: the `grad` request form and Grad(...) inside formulas, against torch autograd ------------------

def torch_reduction(reduction, x, y, b, axis):
    f = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1, keepdim=True) * b[None, :, :]
    if axis == 0:
        f = f.transpose(0, 1)
    if reduction == "Sum":
        return f.sum(1)
    if reduction == "LogSumExp":
        return torch.logsumexp(f, 1)
    if reduction == "Min":
        return f.min(1).values
    if reduction == "KMin":
        return torch.topk(f, 2, dim=1, largest=False).values.reshape(f.shape[0], -1)
    raise ValueError(reduction)


@pytest.mark.parametrize("transport", ["arrow", "shm"])
@pytest.mark.parametrize("reduction,k", [("Sum", None), ("LogSumExp", None), ("Min", None), ("KMin", 2)])
@pytest.mark.parametrize("axis", [0, 1])
async def test_grad_request_equals_torch_autograd(server, reduction, k, axis, transport):
    x, y, b = (torch.from_numpy(a).requires_grad_() for a in data(np.float64, n=9, m=7))
    out = torch_reduction(reduction, x, y, b, axis)
    cotangent = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(out, (x, y, b), cotangent)
    async with server.client(transport=transport) as c:
        for wrt, want in zip(("x", "y", 2), expected):
            got = await c.grad(FORMULA, ALIASES, x.detach(), y.detach(), b.detach(), wrt=wrt,
                               cotangent=cotangent, reduction_op=reduction, axis=axis, opt_arg=k)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


async def test_grad_of_a_parameter_and_grad_inside_a_formula(server):
    x, y, _ = data(np.float64, n=8, m=6)
    p = np.array([0.7])
    xt, pt = torch.from_numpy(x), torch.from_numpy(p).requires_grad_()
    gauss = torch.exp(-pt * ((xt[:, None] - torch.from_numpy(y)[None]) ** 2).sum(-1))
    async with server.client() as c:
        got = await c.grad("Exp(-p * SqDist(x, y))", ["x = Vi(3)", "y = Vj(3)", "p = Pm(1)"], x, y, p, wrt="p",
                           cotangent=np.ones((8, 1)), axis=1)
        np.testing.assert_allclose(got, torch.autograd.grad(gauss.sum(), pt)[0].numpy(), rtol=1e-10)
        # Grad(f, x, e) as a formula: the gradient of the Gaussian kernel sum with respect to x_i
        grad_x = await c.reduce("Grad(Exp(-SqDist(x, y)), x, e)", ["x = Vi(3)", "y = Vj(3)", "e = Vi(1)"],
                                x, y, np.ones((8, 1)), axis=1)
    xg = torch.from_numpy(x).requires_grad_()
    total = torch.exp(-((xg[:, None] - torch.from_numpy(y)[None]) ** 2).sum(-1)).sum()
    np.testing.assert_allclose(grad_x, torch.autograd.grad(total, xg)[0].numpy(), rtol=1e-10)


async def test_grad_request_errors(server):
    x, y, b = data()
    async with server.client(transport="arrow") as c:
        with pytest.raises(ArgumentError, match="names no argument"):
            await c.grad(FORMULA, ALIASES, x, y, b, wrt="nope", cotangent=np.ones((23, 2)), axis=1)
        with pytest.raises(ArgumentError, match="cotangent must have the result's shape"):
            await c.grad(FORMULA, ALIASES, x, y, b, wrt="x", cotangent=np.ones((5, 2)), axis=1)
        with pytest.raises(FormulaError, match="no gradient rule"):
            await c.grad(FORMULA, ALIASES, x, y, b, wrt="x", cotangent=np.ones((23, 4)), axis=1,
                         reduction_op="Max_SumShiftExp")


# Validation ------------------------------------------------------------------------------------------------

async def test_validate_returns_the_normalised_formula_and_arguments(server):
    r = await server.raw.post("/v1/formulas/validate", json=request(reduction_op="KMin", opt_arg=2, axis=1))
    assert r.status_code == 200
    body = r.json()
    assert body["formula"].startswith("Mult(") and "Var(0,3,0)" in body["formula"]
    assert [a["name"] for a in body["args"]] == ["x", "y", "b"]
    assert [a["category"] for a in body["args"]] == ["Vi", "Vj", "Vj"]
    assert body["outputs"] == [{"name": "value", "kind": "value", "dim": 4}]


async def test_validate_names_the_error_and_its_column(server):
    r = await server.raw.post("/v1/formulas/validate", json=request(formula="Exp(x) + Foo(y)"))
    assert r.status_code == 422
    assert r.json()["error"] == "FormulaError" and "Foo" in r.json()["detail"] and "column 10" in r.json()["detail"]
    r = await server.raw.post("/v1/formulas/validate", json=request(formula="x + y", aliases=["x=Vi(3)", "y=Vj(2)"]))
    assert r.status_code == 422 and r.json()["error"] == "DimensionError"


# Malformed requests and hostile input: 4xx, and the server keeps serving -----------------------------------

async def test_malformed_bodies(server):
    raw = server.raw
    r = await raw.post("/v1/reduce", content=b"not arrow at all", headers={"content-type": arrow.CONTENT_TYPE})
    assert r.status_code == 400 and r.json()["error"] == "invalid_body"
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("a", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1])], names=["a"]))
    r = await raw.post("/v1/reduce", content=sink.getvalue().to_pybytes(), headers={"content-type": arrow.CONTENT_TYPE})
    assert r.status_code == 400 and "kred" in r.json()["detail"]
    r = await raw.post("/v1/reduce", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = await raw.post("/v1/reduce", json=request())
    assert r.status_code == 422 and "shared memory" in r.json()["detail"]
    r = await raw.post("/v1/reduce", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = await server.post_arrow(request(unknown_field=1), list(data()))
    assert r.status_code == 422 and "unknown_field" in r.json()["detail"]
    r = await server.post_arrow(request(axis="one"), list(data()))
    assert r.status_code == 422
    await server.still_serving()


async def test_wrong_shapes_dtypes_and_counts_name_the_argument(server):
    x, y, b = data()
    cases = [([x, y[:, :2], b], "y"), ([x, y, b[:5]], "b"), ([x, y], "expected 3 arrays"),
             ([x.astype(np.int64), y, b], "int64"), ([x, y.astype(np.float32), b], "float32")]
    for arrays, needle in cases:
        r = await server.post_arrow(request(axis=1), arrays)
        assert r.status_code == 422, needle
        assert r.json()["error"] == "ArgumentError" and needle in r.json()["detail"]
    await server.still_serving()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_nonfinite_inputs_are_refused_when_the_operator_says_so(tmp_path, bad):
    x, y, b = data()
    y = y.copy()
    y[3, 1] = bad
    async with Running(create_app(settings(tmp_path, reject_nonfinite=True))) as strict:
        r = await strict.post_arrow(request(axis=1), [x, y, b])
    assert r.status_code == 422 and "y contains" in r.json()["detail"]


@pytest.mark.parametrize("transport", ["arrow", "shm"])
async def test_nonfinite_inputs_are_computed_as_in_process_by_default(server, transport):
    """pykeops programs send them (GeomLoss's -inf log-weights of empty bins, TorchDR's inf clamp bounds): by
    default they get the engine's IEEE answers, as in process, checked against dense numpy written here."""
    x, y, b = data()
    b = b[:, :1].copy()
    logw = np.log(np.abs(b))
    logw[:3, 0] = -np.inf                       # empty bins
    aliases = ["x = Vi(3)", "y = Vj(3)", "w = Vj(1)"]
    d2 = ((x[:, None, :] - y[None]) ** 2).sum(-1)
    f = logw[None, :, 0] - d2
    top = f.max(1, keepdims=True)
    async with server.client(transport=transport) as c:
        gauss = await c.reduce("Exp(w - SqDist(x, y))", aliases, x, y, logw, axis=1)
        lse = await c.reduce("w - SqDist(x, y)", aliases, x, y, logw, reduction_op="LogSumExp", axis=1)
        clamped = await c.reduce("Clamp(w, IntCst(0), c) * SqDist(x, y)", [*aliases, "c = Pm(1)"], x, y, b,
                                 np.array([np.inf]), axis=1)
        poisoned = await c.reduce("w * SqDist(x, y)", aliases, x, y, np.where(np.arange(len(y))[:, None] == 5,
                                                                               np.nan, b), axis=1)
    np.testing.assert_allclose(gauss, np.exp(f).sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(lse, top + np.log(np.exp(f - top).sum(1, keepdims=True)), rtol=1e-12)
    np.testing.assert_allclose(clamped, (np.maximum(b[None, :, 0], 0) * d2).sum(1, keepdims=True), rtol=1e-12)
    assert np.isnan(poisoned).all()


INJECTIONS = [
    "__import__('os').system('touch /tmp/kred-pwned')",
    "x.__class__.__mro__[1].__subclasses__()",
    "eval('1')", "open('/etc/passwd')", "(lambda: 1)()", "[c for c in ()]", "x if y else b",
    "Exp(x); import os", "Exp(x)\nimport os", "f'{x}'", "x.real", "globals()", "Exp(*x)", "Exp(x=1)",
    "(" * 400 + "x" + ")" * 400, "Exp(" * 120 + "x" + ")" * 120,
]


@pytest.mark.parametrize("formula", INJECTIONS, ids=range(len(INJECTIONS)))
async def test_formula_injection_is_a_4xx(server, formula):
    r = await server.post_arrow(request(formula=formula, axis=1), list(data()))
    assert r.status_code == 422, r.text
    assert r.json()["error"] in ("FormulaError", "DimensionError", "limit")
    assert not os.path.exists("/tmp/kred-pwned")


async def test_hostile_aliases_and_options(server):
    for body in (request(aliases=["x = __import__('os')", "y=Vj(3)", "b=Vj(2)"]),
                 request(aliases="x=Vi(3)"), request(reduction_op="__class__"), request(reduction_op="KMin", opt_arg=0),
                 request(axis=2), request(dtype_acc="float16")):
        r = await server.post_arrow(body, list(data()))
        assert r.status_code == 422, body
    await server.still_serving()


async def test_bad_shared_memory_references(server):
    x, y, b = data()
    key = new_key()
    refs = [{"segment": "kred_" + "0" * 32, "offset": HEADER, "dtype": "float64", "shape": [23, 3]}] * 3
    r = await server.raw.post("/v1/reduce", json=request(arrays=refs, shm_key=key))
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]
    r = await server.raw.post("/v1/reduce", json=request(arrays=[dict(refs[0], segment="../../etc/passwd")] * 3,
                                                         shm_key=key))
    assert r.status_code == 422 and "not one this service accepts" in r.json()["detail"]
    with Segment.create(64, key) as segment:
        far = [{"segment": segment.name, "offset": HEADER, "dtype": "float64", "shape": [1000, 3]}] * 3
        r = await server.raw.post("/v1/reduce", json=request(arrays=far, shm_key=key))
        assert r.status_code == 422 and "does not fit" in r.json()["detail"]
    await server.still_serving()


async def test_unknown_routes_and_jobs_are_404_json(server):
    r = await server.raw.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await server.raw.get("/v1/jobs/0123456789")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


# Internal errors: a 500 that does not leak -----------------------------------------------------------------

class Exploding(LocalExecutor):
    def run(self, plan, arrays, progress=None, cancelled=None, **options):
        raise RuntimeError("secret detail at /srv/internal/path.py")


async def test_internal_errors_are_500_without_details(tmp_path):
    async with Running(create_app(settings(tmp_path), executor=Exploding())) as running:
        r = await running.post_arrow(request(axis=1), list(data()))
        assert r.status_code == 500
        assert r.json()["error"] == "internal"
        assert "secret" not in r.text and "Traceback" not in r.text and "/srv" not in r.text
        assert (await running.raw.get("/healthz")).status_code == 200


# Limits ------------------------------------------------------------------------------------------------------

async def test_body_size_limit(tmp_path):
    async with Running(create_app(settings(tmp_path, max_body_bytes=10_000))) as running:
        x, y, b = data(n=1000)
        r = await running.post_arrow(request(axis=1), [x, y, b])
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]

        async def chunks():          # no Content-Length: counted as it streams
            body = bytes(arrow.encode(request(axis=1), [x, y, b]))
            for k in range(0, len(body), 4096):
                yield body[k:k + 4096]
        r = await running.raw.post("/v1/reduce", content=chunks(), headers={"content-type": arrow.CONTENT_TYPE})
        assert r.status_code == 413
        await running.still_serving()


@pytest.mark.parametrize("limit,value,body,needle", [
    ("max_formula_chars", 50, request(formula="Exp(-SqDist(x, y)) * b" + " + b" * 20), "max_formula_chars"),
    ("max_formula_depth", 6, request(formula="(Exp(Exp(Exp(Exp(Exp(Exp(x))))))|y) * b"), "max_formula_depth"),
    ("max_formula_nodes", 5, request(), "max_formula_nodes"),
    ("max_dim", 8, request(formula="TensorProd(x, y) * Sum(b)"), "max_dim"),
    ("max_pairs_per_request", 100, request(), "max_pairs_per_request"),
])
async def test_each_request_limit(tmp_path, limit, value, body, needle):
    async with Running(create_app(settings(tmp_path, **{limit: value}))) as running:
        r = await running.post_arrow(dict(body, axis=1), list(data()))
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "limit" and needle in r.json()["detail"]


async def test_compile_time_limit(tmp_path):
    """Four nested Laplacians take ~20 s to differentiate (unless a node budget refuses them sooner)."""
    import time

    from safety_helpers import NESTED
    async with Running(create_app(settings(tmp_path, compile_timeout_s=1.0))) as running:
        await running.still_serving()                                # the plan workers are up
        began = time.monotonic()
        r = await running.raw.post("/v1/formulas/validate", json={"formula": NESTED, "aliases": ["x=Vi(3)", "y=Vj(3)"]})
        assert r.status_code == 422 and time.monotonic() - began < 5, r.text


async def test_client_raises_limit_exceeded(tmp_path):
    async with Running(create_app(settings(tmp_path, max_pairs_per_request=10))) as running:
        async with running.client(transport="arrow") as c:
            with pytest.raises(LimitExceeded, match="submit it as a job"):
                await c.reduce(FORMULA, ALIASES, *data(), axis=1)


# Auth ---------------------------------------------------------------------------------------------------------

async def test_bearer_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    async with Running(create_app(settings(tmp_path, token_file=token_file))) as running:
        raw = running.raw
        assert (await raw.get("/healthz")).status_code == 200          # probes stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            r = await raw.post("/v1/formulas/validate", json=request(), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert (await raw.get("/metrics", headers=headers)).status_code == 401
            assert (await raw.get("/v1/jobs", headers=headers)).status_code == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert (await raw.post("/v1/formulas/validate", json=request(), headers=ok)).status_code == 200
        assert (await raw.get("/metrics", headers=ok)).status_code == 200
        async with running.client(token="wrong") as c:
            with pytest.raises(Unauthorized):
                await c.reduce(FORMULA, ALIASES, *data(), axis=1)
        async with running.client(token="s3cret-token") as c:
            x, y, b = data()
            assert_matches(await c.reduce(FORMULA, ALIASES, x, y, b, axis=1),
                           dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)


# Health, metrics, docs ------------------------------------------------------------------------------------

async def test_health_metrics_and_docs(server):
    health = (await server.raw.get("/healthz")).json()
    assert health["status"] == "ok" and health["executor"] == "local" and health["shared_memory"] is True
    await server.still_serving()
    await server.raw.post("/v1/formulas/validate", json=request(formula="Bad("))
    text = (await server.raw.get("/metrics")).text
    assert 'kred_requests_total{method="POST",route="/v1/reduce",status="200"}' in text
    assert 'route="/v1/formulas/validate",status="422"' in text
    assert "kred_request_seconds_bucket" in text and "kred_pairs_total" in text
    assert 'kred_jobs{state="queued"}' in text and 'kred_plan_cache_total{result="hit"}' in text
    assert "kred_pairs_per_second" in text and "kred_request_bytes_total" in text
    assert (await server.raw.get("/docs")).status_code == 200
    spec = (await server.raw.get("/openapi.json")).json()
    assert {"/v1/reduce", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/formulas/validate",
            "/healthz", "/metrics"} <= set(spec["paths"])
    assert arrow.CONTENT_TYPE in spec["paths"]["/v1/reduce"]["post"]["requestBody"]["content"]


async def test_shared_memory_can_be_disabled(tmp_path):
    async with Running(create_app(settings(tmp_path, allow_shm=False))) as running:
        async with running.client() as c:
            assert await c.shared_memory() is False        # auto falls back to Arrow
            x, y, b = data()
            assert_matches(await c.reduce(FORMULA, ALIASES, x, y, b, axis=1),
                           dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)
        with Segment.create(64, new_key()) as segment:
            ref = {"segment": segment.name, "offset": HEADER, "dtype": "float64", "shape": [1, 3]}
            r = await running.raw.post("/v1/reduce", json=request(arrays=[ref] * 3, shm_key=segment.key))
            assert r.status_code == 422 and "allow_shm" in r.json()["detail"]


async def test_result_too_large_for_the_clients_room_comes_back_as_arrow(server):
    x, y, b = data()
    with Segment.create(1 << 16, new_key()) as segment:
        from kred.wire.shm import pack
        refs, end = pack(segment, [x, y, b])
        body = request(axis=1, arrays=refs, out={"segment": segment.name, "offset": end, "size": 8},
                       shm_key=segment.key)
        r = await server.raw.post("/v1/reduce", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == arrow.CONTENT_TYPE
    meta, (result,) = arrow.decode(r.content)
    assert meta["names"] == ["value"]
    assert_matches(result, dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)


@pytest.mark.parametrize("engine_backend", BACKENDS)
async def test_kernel_compilation_counts_against_the_compile_time_limit(tmp_path, engine_backend):
    """Compiled backends build a kernel per new formula inside the budget; the reference backend compiles nothing."""
    constant = float(np.random.default_rng().uniform(1, 2))          # a formula no kernel cache has seen
    body = request(formula=f"Exp(-SqDist(x, y) * {constant!r}) * b", axis=1)
    # 0.2 s: room to build the plan in a (warm) plan worker, none to run a C compiler
    app = create_app(settings(tmp_path, backend=engine_backend, compile_timeout_s=0.2))
    async with Running(app) as running:
        await running.post_arrow(request(axis=1), list(data()))     # starts the plan workers
        r = await running.post_arrow(body, list(data()))
    if engine_backend == "reference":
        assert r.status_code == 200
    else:
        assert r.status_code == 422 and "compiling the formula took longer" in r.json()["detail"]
