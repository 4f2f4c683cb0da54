"""Remote LazyTensor: pykeops-style code built locally, reductions computed on a server. Oracles: dense torch / numpy
in float64 written here (with torch autograd for gradients), never the engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.client import Client
from kred.client.lazytensor import using
from kred.client.numpy import LazyTensor as NumpyLazyTensor
from kred.client.torch import LazyTensor, Pm, Vi, Vj
from kred.engine.errors import ArgumentError
from kred.service.app import create_app
from service_helpers import Server, served_reductions, settings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(create_app(settings(tmp_path_factory.mktemp("lazy")))) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, transport="arrow") as c:
        yield c


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(*shape, generator=g, dtype=torch.float64) + 0.25).requires_grad_() for shape in shapes]


def test_gaussian_kernel_values_and_gradients_to_second_order(client):
    x, y, b, p = tensors((6, 3), (5, 3), (5, 2), (1,))
    x_i = LazyTensor(x[:, None, :], client=client)
    y_j, b_j = Vj(y), Vj(b)                                   # unbound leaves follow the bound operand's client
    k_ij = (-Pm(p) * ((x_i - y_j) ** 2).sum(-1)).exp()
    remote = (k_ij * b_j).sum(dim=1)
    dense = (torch.exp(-p * ((x[:, None] - y[None]) ** 2).sum(-1, keepdim=True)) * b[None]).sum(1)
    assert remote.shape == (6, 2)
    np.testing.assert_allclose(remote.detach().numpy(), dense.detach().numpy(), rtol=1e-12)
    weights = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(6, 2)

    def first_and_second(out):
        grads = torch.autograd.grad((out * weights).sum(), (x, y, b, p), create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), (x, y, b, p))
        return [g.detach() for g in grads] + list(second)

    for got, want in zip(first_and_second(remote), first_and_second(dense)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


def test_logsumexp_over_i_and_its_gradient(client):
    x, y = tensors((7, 2), (4, 2), seed=1)
    x_i, y_j = Vi(x, client=client), Vj(y)
    remote = (-((x_i - y_j) ** 2).sum(-1)).logsumexp(dim=0)            # axis 0: one row per j
    dense = torch.logsumexp(-((x[:, None] - y[None]) ** 2).sum(-1), 0)[:, None]
    np.testing.assert_allclose(remote.detach().numpy(), dense.detach().numpy(), rtol=1e-12)
    got = torch.autograd.grad(remote.sum(), (x, y))
    want = torch.autograd.grad(dense.sum(), (x, y))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-10)


def test_min_gradient_and_argkmin(client):
    x, y = tensors((6, 2), (9, 2), seed=2)
    d_ij = ((Vi(x, client=client) - Vj(y)) ** 2).sum(-1)
    dense = ((x[:, None] - y[None]) ** 2).sum(-1)
    remote = d_ij.min(dim=1)
    np.testing.assert_allclose(remote.detach().numpy(), dense.min(1).values[:, None].detach().numpy(), rtol=1e-12)
    (got,) = torch.autograd.grad(remote.sum(), x)                       # first order, by the server's grad request
    (want,) = torch.autograd.grad(dense.min(1).values.sum(), x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10)
    indices = d_ij.argKmin(3, dim=1)
    assert indices.dtype == torch.int64 and indices.shape == (6, 3)
    np.testing.assert_array_equal(indices.numpy(), torch.argsort(dense.detach(), dim=1, stable=True)[:, :3].numpy())


def test_numpy_binding_batches_and_using(client):
    rng = np.random.default_rng(3)
    x, y, b = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 1))
    with using(client):                                       # no client= anywhere: the block's client
        x_i, y_j, b_j = NumpyLazyTensor(x[:, :, None, :]), NumpyLazyTensor(y[:, None]), NumpyLazyTensor(b[:, None])
        remote = ((-((x_i - y_j) ** 2).sum(-1)).exp() * b_j).sum(axis=2)
    dense = (np.exp(-((x[:, :, None] - y[:, None]) ** 2).sum(-1, keepdims=True)) * b[:, None]).sum(2)
    assert remote.shape == (2, 5, 1)
    np.testing.assert_allclose(remote, dense, rtol=1e-12)


def test_ranges_travel_with_the_reduction(client):
    x, y = (t.detach() for t in tensors((4, 1), (6, 1), seed=4))
    ranges = tuple(torch.tensor(a, dtype=torch.int64) for a in
                   ([[0, 2], [2, 4]], [1, 2], [[0, 3], [3, 6]], [[0, 3], [3, 6]], [1, 2], [[0, 2], [2, 4]]))
    k_ij = (-(Vi(x, client=client) - Vj(y)) ** 2).exp()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0:2, 0:3] = mask[2:4, 3:6] = True
    dense = torch.exp(-(x[:, None, 0] - y[None, :, 0]) ** 2)
    np.testing.assert_allclose(k_ij.sum(dim=1, ranges=ranges).numpy(), (dense * mask).sum(1, keepdim=True).numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(k_ij.sum(dim=0, ranges=ranges).numpy(), (dense * mask).sum(0)[:, None].numpy(),
                               rtol=1e-12)


def test_symbolic_variables_are_called_like_genred(client):
    x, y = (t.detach() for t in tensors((3, 2), (5, 2), seed=6))
    op = ((Vi(0, 2, client=client) - Vj(1, 2)) ** 2).sum(-1).sum_reduction(dim=1, call=False)
    np.testing.assert_allclose(op(x, y).numpy(), ((x[:, None] - y[None]) ** 2).sum((1, 2))[:, None].numpy(),
                               rtol=1e-12)


def test_clear_errors(client, server):
    x = torch.rand(3, 1, 2, dtype=torch.float64)
    with pytest.raises(ArgumentError, match="needs a server"):
        (LazyTensor(x) * 2).sum(-1).sum(dim=1)
    with Client(server.url, transport="arrow") as other:
        with pytest.raises(ArgumentError, match="different clients"):
            LazyTensor(x, client=client) + LazyTensor(x, client=other)
    with pytest.raises(ArgumentError, match="unknown backend 'cpux'"):
        LazyTensor(x, client=client).sum(-1).sum(dim=1, backend="cpux")


def test_backend_hints_are_accepted_and_the_server_chooses(client):
    """pykeops programs pass backend="CPU" / "GPU" and device_id: a hint the server may ignore, same answer."""
    x, y = (t.detach() for t in tensors((4, 2), (5, 2), seed=8))
    want = ((x[:, None] - y[None]) ** 2).sum((1, 2))[:, None]
    for hint in ({"backend": "CPU"}, {"backend": "GPU", "device_id": 0}, {"backend": "auto"}):
        got = ((LazyTensor(x[:, None, :], client=client) - Vj(y)) ** 2).sum(-1).sum(dim=1, **hint)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("binding", ["torch", "numpy"])
def test_solve_runs_its_products_on_the_server(client, server, binding):
    """pykeops's RBF interpolation tutorial: (alpha I + K_xx) a = b, conjugate gradient here, K a on the server,
    against numpy's dense solve; with call=False and callfun too."""
    rng = np.random.default_rng(9)
    x, b = rng.random((40, 2)), rng.standard_normal((40, 3))
    lazy = LazyTensor if binding == "torch" else NumpyLazyTensor
    wrap = torch.from_numpy if binding == "torch" else (lambda a: a)
    x_i, x_j = lazy(wrap(x)[:, None, :], client=client), lazy(wrap(x)[None, :, :], client=client)
    K = (-((x_i - x_j) ** 2).sum(-1) * 10).exp()
    want = np.linalg.solve(np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) * 10) + 0.5 * np.eye(40), b)
    before = served_reductions(server.url)
    got = K.solve(lazy(wrap(b)[:, None, :], client=client), alpha=0.5, eps=1e-12)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-10)
    assert served_reductions(server.url) > before + 5                  # one request per conjugate-gradient step
    later = K.solve(wrap(b), alpha=0.5, eps=1e-12, call=False)
    np.testing.assert_allclose(np.asarray(later()), want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(later.callfun(*later.variables, alpha=0.5, eps=1e-12)), want, rtol=1e-8,
                               atol=1e-10)


def test_solve_gradient_flows_through_the_remote_steps(client):
    x, b = tensors((12, 2), (12, 1), seed=10)
    x_i, x_j = LazyTensor(x[:, None, :], client=client), Vj(x)
    a = (-((x_i - x_j) ** 2).sum(-1)).exp().solve(Vi(b), alpha=1.0, eps=1e-14)
    dense = torch.linalg.solve(torch.exp(-((x[:, None] - x[None]) ** 2).sum(-1)) + torch.eye(12, dtype=x.dtype), b)
    np.testing.assert_allclose(a.detach().numpy(), dense.detach().numpy(), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(a.sum(), (x, b))
    want = torch.autograd.grad(dense.sum(), (x, b))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=1e-8)

