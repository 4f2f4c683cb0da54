"""End to end over a real socket: uvicorn on 127.0.0.1 (a free port), the blocking Client, client.torch and the
`kred` command line. Results are compared with dense numpy and torch autograd computed here."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kred.client import Client
from kred.client.cli import app as cli
from kred.client.torch import Genred as RemoteGenred
from kred.engine.errors import ArgumentError, FormulaError
from kred.service.app import create_app
from service_helpers import ALIASES, CASES, FORMULA, Server, assert_matches, data, dense, settings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(create_app(settings(tmp_path_factory.mktemp("http")))) as running:
        yield running


@pytest.fixture(scope="module", params=["arrow", "shm"])
def client(server, request):
    with Client(server.url, transport=request.param) as c:
        yield c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_reduction_over_http(client, case, axis, dtype):
    reduction, formula, formula2, k = case
    x, y, b = data(dtype, seed=1)
    result = client.reduce(formula, ALIASES, x, y, b, reduction_op=reduction, axis=axis, opt_arg=k, formula2=formula2)
    assert client.shared_memory == (client._flows.transport == "shm")
    assert_matches(result, dense(reduction, formula, formula2, k, axis, x, y, b), dtype)


def test_remote_genred_and_validate(client):
    x, y, b = data()
    op = client.Genred(FORMULA, ALIASES, "LogSumExp", 1)
    with pytest.raises(FormulaError):              # LogSumExp of a 2-dim formula is fine; this one is not valid
        client.validate("Exp(x) + y", ["x = Vi(3)", "y = Vj(2)"])
    assert client.validate(FORMULA, ALIASES)["args"][2]["dim"] == 2
    np.testing.assert_allclose(op(x, y, b), np.log(np.exp(
        ((x[:, None] - y[None]) ** 2).sum(-1, keepdims=True) * b[None]).sum(1)), rtol=1e-12)


@pytest.mark.parametrize("reduction,axis", [("Sum", 1), ("LogSumExp", 0), ("Min", 1)])
def test_torch_genred_backward_runs_on_the_server(client, reduction, axis):
    x, y, b = (torch.from_numpy(a).requires_grad_() for a in data(np.float64, n=11, m=9, seed=2))
    op = RemoteGenred(FORMULA, ALIASES, reduction, axis, client=client)
    out = op(x, y, b)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = torch.autograd.grad((out * weights).sum(), (x, y, b))
    f = ((x[:, None] - y[None]) ** 2).sum(-1, keepdim=True) * b[None]
    f = f.transpose(0, 1) if axis == 0 else f
    dense_out = {"Sum": lambda: f.sum(1), "LogSumExp": lambda: torch.logsumexp(f, 1),
                 "Min": lambda: f.min(1).values}[reduction]()
    np.testing.assert_allclose(out.detach().numpy(), dense_out.detach().numpy(), rtol=1e-12)
    want = torch.autograd.grad((dense_out * weights).sum(), (x, y, b))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-12)


def test_jobs_over_http(client):
    x, y, b = data()
    job = client.submit(FORMULA, ALIASES, x, y, b, reduction_op="ArgMin", axis=1)
    assert_matches(job.result(timeout=30, progress=True), dense("ArgMin", FORMULA, None, None, 1, x, y, b),
                   np.float64)
    assert client.job(job.id).status()["state"] == "done"
    assert job.id in [j["id"] for j in client.jobs()]


def test_errors_come_back_as_engine_exceptions_and_the_server_keeps_serving(client):
    x, y, b = data()
    with pytest.raises(ArgumentError, match="b"):
        client.reduce(FORMULA, ALIASES, x, y, b[:, :1], axis=1)
    with pytest.raises(ArgumentError, match="rows"):
        client.reduce(FORMULA, ALIASES, x, y, b[:-1], axis=1)
    bad = y.copy()
    bad[0, 0] = np.nan              # not an error (reject_nonfinite is off): NaN in every row's sum, as in process
    assert np.isnan(client.reduce(FORMULA, ALIASES, x, bad, b, axis=1)).all()
    with pytest.raises(FormulaError, match="not allowed"):
        client.reduce("x.__class__", ALIASES, x, y, b)
    assert_matches(client.reduce(FORMULA, ALIASES, x, y, b, axis=1),
                   dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)


def test_concurrent_requests(server):
    x, y, b = data()
    expected = dense("Sum", FORMULA, None, None, 1, x, y, b)
    failures = []

    def worker(transport):
        try:
            with Client(server.url, transport=transport) as c:
                for _ in range(10):
                    np.testing.assert_allclose(c.reduce(FORMULA, ALIASES, x, y, b, axis=1), expected, rtol=1e-12)
        except Exception as e:          # noqa: BLE001 - reported below
            failures.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in ("arrow", "shm") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures


def test_connection_errors_are_retried_then_raised():
    import httpx

    from kred.client import ServerUnreachable
    from service_helpers import free_port
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=2, transport="arrow") as c:
        with pytest.raises(ServerUnreachable, match=f"cannot reach a kred server at {url}") as raised:
            c.health()
    assert isinstance(raised.value.__cause__, httpx.ConnectError)


# The command line ---------------------------------------------------------------------------------------------

def test_kred_reduce_and_jobs_commands(server, tmp_path):
    x, y, b = data()
    for name, array in (("x", x), ("y", y), ("b", b)):
        np.save(tmp_path / f"{name}.npy", array)
    runner = CliRunner()
    common = ["-a", ALIASES[0], "-a", ALIASES[1], "-a", ALIASES[2], "-i", f"x={tmp_path / 'x.npy'}",
              "-i", f"y={tmp_path / 'y.npy'}", "-i", f"b={tmp_path / 'b.npy'}", "--axis", "1"]
    result = runner.invoke(cli, ["reduce", FORMULA, *common, "-o", str(tmp_path / "out.npy"), "--url", server.url])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), dense("Sum", FORMULA, None, None, 1, x, y, b),
                               rtol=1e-12)
    result = runner.invoke(cli, ["reduce", FORMULA, *common, "--reduction", "Min_ArgMin", "-o",
                                 str(tmp_path / "out.npz"), "--url", server.url, "--job"])
    assert result.exit_code == 0, result.output
    value, index = dense("Min_ArgMin", FORMULA, None, None, 1, x, y, b)
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_allclose(saved["value"], value, rtol=1e-12)
        np.testing.assert_array_equal(saved["index"], index)
    result = runner.invoke(cli, ["reduce", FORMULA, *common, "-o", str(tmp_path / "local.npy"), "--local"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "local.npy"), np.load(tmp_path / "out.npy"), rtol=1e-6)
    result = runner.invoke(cli, ["reduce", "Exp(", *common, "-o", str(tmp_path / "bad.npy"), "--url", server.url])
    assert result.exit_code == 1 and "syntax error" in result.output

    listing = runner.invoke(cli, ["jobs", "list", "--url", server.url, "--state", "done"])
    assert listing.exit_code == 0 and "done" in listing.output
    job_id = listing.output.split()[0]
    shown = runner.invoke(cli, ["jobs", "show", job_id, "--url", server.url])
    assert shown.exit_code == 0 and '"state": "done"' in shown.output
    fetched = runner.invoke(cli, ["jobs", "result", job_id, "-o", str(tmp_path / "job.npz"), "--url", server.url])
    assert fetched.exit_code == 0, fetched.output
    with np.load(tmp_path / "job.npz") as saved:
        np.testing.assert_array_equal(saved["arr_1"], index)
    cancelled = runner.invoke(cli, ["jobs", "cancel", job_id, "--url", server.url])
    assert cancelled.exit_code == 0 and "done" in cancelled.output       # finished jobs stay finished


def test_cli_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    with Server(create_app(settings(tmp_path, token_file=token))) as guarded:
        runner = CliRunner()
        denied = runner.invoke(cli, ["jobs", "list", "--url", guarded.url])
        assert denied.exit_code != 0
        allowed = runner.invoke(cli, ["jobs", "list", "--url", guarded.url, "--token-file", str(token)])
        assert allowed.exit_code == 0, allowed.output
        x, y, b = data()
        with Client(guarded.url, token="tok-123") as c:
            assert_matches(c.submit(FORMULA, ALIASES, x, y, b, axis=1).result(timeout=10),
                           dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)


def test_kred_serve_starts_a_working_server(tmp_path):
    """`kred serve` as a user runs it (in-process executor here; the Ray one is covered by test_service_ray.py)."""
    import os
    import subprocess
    import sys
    import time

    from service_helpers import free_port
    port = free_port()
    env = dict(os.environ, KRED_STORE_DIR=str(tmp_path / "jobs"), KRED_BACKEND="reference")
    process = subprocess.Popen([sys.executable, "-m", "kred.client.cli", "serve", "--executor", "local", "--port",
                                str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"http://127.0.0.1:{port}", retries=0) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert c.health()["executor"] == "local"
                    break
                except Exception:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            x, y, b = data()
            assert_matches(c.reduce(FORMULA, ALIASES, x, y, b, axis=1), dense("Sum", FORMULA, None, None, 1, x, y, b),
                           np.float64)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in output          # bound to the loopback address by default
