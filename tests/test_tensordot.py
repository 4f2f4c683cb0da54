"""TensorDot and Kron are emitted as loops (engine/codegen/emit.py), not as one scalar term per product, so the sizes
pykeops runs compile: pykeops's own `keops_tensordot` test with a permutation (x (2,3,2,2,4), y (2,4,2,3,2,3), three
contracted axes), its gradients, and Kron. Values and gradients
against torch.tensordot / numpy.kron and torch autograd in float64, on the reference and CPU backends; the CUDA
source of the same plans compiles with NVRTC and computes the same values in the CPU emulation of the kernels.
"""
from __future__ import annotations

import cuda_emulation as emulation
import numpy as np
import pytest
import torch
from kred.engine.backends import cuda as runtime
from kred.engine.backends import nvrtc
from kred.engine.codegen import cuda as template
from kred.engine.numpy import Genred
from kred.engine.torch.lazytensor import LazyTensor

M, N = 5, 4
DIMFA, DIMFB = (2, 3, 2, 2, 4), (2, 4, 2, 3, 2, 3)
CONTFA, CONTFB = (4, 0, 2), (1, 4, 2)          # pykeops's [5, 1, 3] and [2, 5, 3], counted from the batch axis
PERM = (4, 3, 2, 0, 1)
TENSORDOT = (f"TensorDot(x, y, Ind{DIMFA}, Ind{DIMFB}, Ind{CONTFA}, Ind{CONTFB}, Ind{PERM})").replace(" ", "")
ALIASES = [f"x = Vi({np.prod(DIMFA)})", f"y = Vj({np.prod(DIMFB)})"]


def dense_tensordot(x, y):
    """sum_j of the permuted tensordot of x_i and y_j, written with torch (float64, autograd)."""
    pairs = torch.tensordot(x, y, dims=([1 + k for k in CONTFA], [1 + k for k in CONTFB]))   # (M, 3, 2, N, 2, 3, 3)
    pairs = pairs.movedim(3, 1)                                    # (M, N, free axes of x, free axes of y)
    # output axis k lands at PERM[k]
    pairs = pairs.permute(0, 1, *[2 + k for k in np.argsort(PERM)])
    return pairs.sum(1).reshape(M, -1)


@pytest.fixture
def tensors():
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((M, *DIMFA)), requires_grad=True)
    y = torch.tensor(rng.standard_normal((N, *DIMFB)), requires_grad=True)
    return x, y


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pykeops_tensordot_with_permutation_and_its_gradients(tensors, backend):
    x, y = tensors
    x_i = LazyTensor(x.reshape(M, 1, -1))
    y_j = LazyTensor(y.reshape(1, N, -1))
    got = x_i.keops_tensordot(y_j, DIMFA, DIMFB, CONTFA, CONTFB, PERM).sum(dim=1, backend=backend)
    want = dense_tensordot(x, y)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, y), cotangent)
    want_grads = torch.autograd.grad(want, (x, y), cotangent)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-12, atol=1e-12)


KRON_A, KRON_B = (2, 3, 2), (3, 1, 2)


def dense_kron(a, b, c):
    """sum_j <kron(a_i, b_j), c_j> in torch, for autograd."""
    kron = torch.stack([torch.stack([torch.kron(a[i].reshape(KRON_A), b[j].reshape(KRON_B)).reshape(-1)
                                     for j in range(len(b))]) for i in range(len(a))])
    return (kron * c[None]).sum((1, 2))[:, None]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kron_and_its_gradients(backend):
    """Kron is one TensorDot (interleaved axes, nothing contracted): values and both gradients."""
    from kred.engine.torch.genred import Genred as TorchGenred

    rng = np.random.default_rng(4)
    da, db = np.prod(KRON_A), np.prod(KRON_B)
    a, b, c = (torch.tensor(rng.standard_normal(s), requires_grad=True) for s in ((3, da), (2, db), (2, da * db)))
    op = TorchGenred(f"Sum(Kron(a, b, Ind{KRON_A}, Ind{KRON_B}) * c)".replace(" ", ""),
                     [f"a = Vi({da})", f"b = Vj({db})", f"c = Vj({da * db})"], axis=1)
    got, want = op(a, b, c, backend=backend), dense_kron(a, b, c)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-12)
    for g, w in zip(torch.autograd.grad(got.sum(), (a, b)), torch.autograd.grad(want.sum(), (a, b))):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-11, atol=1e-12)


def test_numpy_kron_and_tensordot_oracles_agree():
    """The numpy row (the reference backend's) against numpy.kron and numpy.tensordot directly."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((1, 6)), rng.standard_normal((1, 6))
    got = Genred("Kron(a, b, Ind(2,3), Ind(3,2))", ["a = Vi(6)", "b = Vj(6)"], axis=1)(a, b, backend="reference")
    np.testing.assert_allclose(got[0], np.kron(a[0].reshape(2, 3), b[0].reshape(3, 2)).reshape(-1), rtol=1e-14)
    got = Genred("TensorDot(a, b, Ind(2,3), Ind(3,2), Ind(0,1), Ind(1,0))", ["a = Vi(6)", "b = Vj(6)"],
                 axis=1)(a, b, backend="reference")
    np.testing.assert_allclose(got[0], [np.tensordot(a[0].reshape(2, 3), b[0].reshape(3, 2), ((0, 1), (1, 0)))],
                               rtol=1e-14)


def cuda_plans():
    grad = f"Grad({TENSORDOT}, x, e)"
    return {"forward": Genred(TENSORDOT, ALIASES, axis=1).plan,
            "gradient": Genred(grad, ALIASES + [f"e = Vi({dense_tensordot_dim()})"], axis=1).plan}


def dense_tensordot_dim() -> int:
    return int(np.prod(DIMFA) * np.prod(DIMFB) // np.prod([DIMFA[k] for k in CONTFA]) ** 2)


@pytest.mark.parametrize("name", ["forward", "gradient"])
def test_cuda_source_of_the_pykeops_tensordot_compiles_and_computes(name, tensors):
    plan = cuda_plans()[name]
    acc = plan.acc_dtype(np.float64)            # one dtype: NVRTC takes tens of seconds on a module this size
    for group in runtime.component_groups(plan, np.float64, acc):
        source = template.build(group, np.float64, acc).source
        assert "for (int" in source
        nvrtc.compile_source(source, "sm_90")
    x, y = (t.detach().reshape(len(t), -1).numpy() for t in tensors)
    e = np.random.default_rng(6).standard_normal((M, dense_tensordot_dim()))
    arrays = [x, y] if name == "forward" else [x, y, e]
    checked, _, n, m = plan.check_args(arrays)
    (got,) = emulation.execute(plan, checked, (0, n), (0, m), final=True)
    xt, yt = (t.detach().clone().requires_grad_(True) for t in tensors)
    want = dense_tensordot(xt, yt)
    if name == "gradient":
        want = torch.autograd.grad(want, xt, torch.tensor(e))[0].reshape(M, -1)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_pykeops_tensordot_on_the_gpu(tensors):
    x, y = tensors
    x_i, y_j = LazyTensor(x.reshape(M, 1, -1)), LazyTensor(y.reshape(1, N, -1))
    got = x_i.keops_tensordot(y_j, DIMFA, DIMFB, CONTFA, CONTFB, PERM).sum(dim=1, backend="GPU")
    want = dense_tensordot(x, y)
    np.testing.assert_allclose(got.detach().cpu().numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (x, y), cotangent.to(got.device)),
                    torch.autograd.grad(want, (x, y), cotangent)):
        np.testing.assert_allclose(g.cpu().numpy(), w.numpy(), rtol=1e-12, atol=1e-12)
