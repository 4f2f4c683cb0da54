"""Everything that works in-process works over HTTP: batch dimensions, block-sparse `ranges`, gradients of any order
of client.torch.Genred. Oracles: dense torch (float64) with autograd, written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.client import Client
from kred.client.torch import Genred as RemoteGenred
from kred.engine.errors import ArgumentError
from kred.service.app import create_app
from service_helpers import Server, settings

GAUSS = "Exp(-SqDist(x, y) * p) * b"
ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)", "p = Pm(1)"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with Server(create_app(settings(tmp_path_factory.mktemp("parity")))) as server:
        with Client(server.url, transport="arrow") as c:
            yield c


def dense_gauss(x, y, b, p, batch=False):
    """(…, N, M, 2) values of GAUSS, in torch, for any leading batch axes."""
    d2 = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1, keepdim=True)
    return torch.exp(-d2 * p.unsqueeze(-2).unsqueeze(-2) if batch else -d2 * p) * b.unsqueeze(-3)


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=g, dtype=torch.float64) + 0.25 for shape in shapes]


def test_batch_dimensions_over_http(client):
    x, y, b, p = tensors((2, 3, 7, 3), (2, 1, 5, 3), (1, 3, 5, 2), (2, 3, 1))      # broadcasting batch (2, 3)
    got = client.reduce(GAUSS, ALIASES, x.numpy(), y.numpy(), b.numpy(), p.numpy(), axis=1)
    want = dense_gauss(x, y, b, p, batch=True).sum(-2)
    assert got.shape == (2, 3, 7, 2)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)


def test_ranges_over_http(client):
    x, y, b, p = tensors((6, 3), (8, 3), (8, 2), (1,))
    # rows 0-2 see columns 0-3 and 6-8; rows 3-5 see columns 4-6; and the other half for axis=0
    ranges_i, slices_i, redranges_j = [[0, 3], [3, 6]], [2, 3], [[0, 3], [6, 8], [4, 6]]
    ranges_j, slices_j, redranges_i = [[0, 3], [3, 8]], [1, 2], [[0, 3], [3, 6]]
    ranges = tuple(np.array(a) for a in (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i))
    mask_ij = torch.zeros(6, 8, dtype=torch.bool)
    mask_ij[0:3, 0:3] = mask_ij[0:3, 6:8] = mask_ij[3:6, 4:6] = True
    mask_ji = torch.zeros(8, 6, dtype=torch.bool)
    mask_ji[0:3, 0:3] = mask_ji[3:8, 3:6] = True
    values = dense_gauss(x, y, b, p)                                                # (6, 8, 2)
    got1 = client.reduce(GAUSS, ALIASES, x.numpy(), y.numpy(), b.numpy(), p.numpy(), axis=1, ranges=ranges)
    np.testing.assert_allclose(got1, (values * mask_ij[..., None]).sum(1).numpy(), rtol=1e-12)
    got0 = client.reduce(GAUSS, ALIASES, x.numpy(), y.numpy(), b.numpy(), p.numpy(), axis=0, ranges=ranges)
    np.testing.assert_allclose(got0, (values * mask_ji.T[..., None]).sum(0).numpy(), rtol=1e-12)
    bad = list(ranges)
    bad[2] = np.array([[0, 3], [6, 9], [4, 6]])                                    # column 8 does not exist
    with pytest.raises(ArgumentError, match="redranges_j"):
        client.reduce(GAUSS, ALIASES, x.numpy(), y.numpy(), b.numpy(), p.numpy(), axis=1, ranges=bad)
    with pytest.raises(ArgumentError, match="batch"):
        client.reduce(GAUSS, ALIASES, *(np.stack([a.numpy()] * 2) for a in (x, y, b)), p.numpy(), axis=1,
                      ranges=ranges)


@pytest.mark.parametrize("reduction,axis", [("Sum", 1), ("Sum", 0), ("LogSumExp", 1)])
def test_second_order_gradients_over_http(client, reduction, axis):
    x, y, b, p = (t.requires_grad_() for t in tensors((5, 3), (4, 3), (4, 1), (1,), seed=3))
    formula, aliases = ("Exp(-SqDist(x, y) * p) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "p = Pm(1)"])
    op = RemoteGenred(formula, aliases, reduction, axis, client=client)
    f = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1, keepdim=True) * p) * b[None]      # (N, M, 1)
    dense = f.sum(axis) if reduction == "Sum" else torch.logsumexp(f, axis)
    remote = op(x, y, b, p)
    np.testing.assert_allclose(remote.detach().numpy(), dense.detach().numpy(), rtol=1e-12)
    weights = torch.linspace(-1, 1, dense.numel(), dtype=torch.float64).reshape(dense.shape)

    def first_and_second(out):                        # second order: the gradient's norm, differentiated again
        grads = torch.autograd.grad((out * weights).sum(), (x, y, b, p), create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), (x, y, b, p))
        return [g.detach() for g in grads] + list(second)

    for g, w in zip(first_and_second(remote), first_and_second(dense)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-12)


def test_third_order_gradient_over_http(client):
    x = torch.tensor([[0.3], [-0.2]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.1], [0.5], [-0.4]], dtype=torch.float64)
    op = RemoteGenred("Exp(-Square(x - y))", ["x = Vi(1)", "y = Vj(1)"], "Sum", 1, client=client)

    def third(fn):
        (g1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), x, create_graph=True)
        return torch.autograd.grad(g2.sum(), x)[0]

    got = third(lambda x: op(x, y))
    want = third(lambda x: torch.exp(-(x[:, None] - y[None]) ** 2).sum(1))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10)


def test_remote_batch_gradient_matches_dense(client):
    x, y, b, p = (t.requires_grad_() for t in tensors((2, 4, 3), (2, 5, 3), (2, 5, 2), (2, 1), seed=5))
    out = RemoteGenred(GAUSS, ALIASES, "Sum", 1, client=client)(x, y, b, p)
    dense = dense_gauss(x, y, b, p, batch=True).sum(-2)
    got = torch.autograd.grad(out.sum(), (x, y, b, p))
    want = torch.autograd.grad(dense.sum(), (x, y, b, p))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-10)


@pytest.mark.parametrize("reduction,opt_arg", [("Sum", None), ("KMin_ArgKMin", 2)])
def test_batched_reply_fits_in_shared_memory(client, reduction, opt_arg):
    """Regression: the room for a shared-memory reply was sized from the first axis of the arrays (the batch axis,
    2 here) rather than batch x rows, so batched results always fell back to an Arrow reply."""
    x, y, b, p = tensors((2, 3, 2000, 3), (2, 1, 30, 3), (1, 3, 30, 2), (2, 3, 1), seed=7)
    with Client(client._flows.url, transport="shm") as c:
        replies = []
        c.http.event_hooks["response"].append(lambda r: replies.append((r.url.path, r.headers["content-type"])))
        got = c.reduce(GAUSS, ALIASES, x.numpy(), y.numpy(), b.numpy(), p.numpy(), axis=1, reduction_op=reduction,
                       opt_arg=opt_arg)
    values = dense_gauss(x, y, b, p, batch=True)                                    # (2, 3, 2000, 30, 2)
    if reduction == "Sum":
        np.testing.assert_allclose(got, values.sum(-2).numpy(), rtol=1e-12)
    else:
        order = torch.argsort(values, dim=-2, stable=True)[..., :2, :]             # (2, 3, 2000, 2, 2)
        want = torch.take_along_dim(values, order, -2).flatten(-2)
        np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-12)
        np.testing.assert_array_equal(got[1], order.flatten(-2).numpy())
    assert [kind for path, kind in replies if path == "/v1/reduce"] == ["application/json"]
