"""Forward + backward of the Gaussian kernel sum, a plugin of the benchmark harness.

    python -m benchmarks.run --plugin benchmarks.bench_grad --cases gaussian_grad \
        --impls cpu-autograd,pykeops-cpu-autograd,torch-autograd --sizes 1e4,3e4 --name grad

Case `gaussian_grad`: a_i = sum_j exp(-|x_i - y_j|^2) b_j, and the result checked is the gradient of
sum_i e_i a_i with respect to x (so every impl returns the same (N, D) array):

- `kred-<backend>-autograd`, `pykeops-cpu-autograd`, `torch-autograd` time one forward and one backward pass
  through torch autograd (engine.torch.Genred; a pykeops.torch LazyTensor; dense torch, which holds N x M matrices);
- the harness's formula-driven impls (`kred-cpu`, `pykeops-cpu`, ...) run the case's formula, which is the backward
  reduction alone, `Grad(Exp(-SqDist(x, y)) * b, x, e)`: the part of the work that the backward adds.

pairs/s counts N * M pairs once per call, whatever the number of passes.
"""
from __future__ import annotations

import numpy as np

from .cases import Case, max_relative_error, points, register_case, sqdist
from .peers import Impl, _engine_available, _pykeops_available, register_impl

FORWARD = "Exp(-SqDist(x, y)) * b"


def _aliases(d: int) -> list[str]:
    return [f"x = Vi({d})", f"y = Vj({d})", "b = Vj(1)", "e = Vi(1)"]


def _reference(x, y, b, e):
    def rows(xs, y, b, e):
        diff = xs[:, None, :] - y[None, :, :]
        weights = np.exp(-sqdist(xs, y)) * b[:, 0][None, :]                  # (n, m)
        return -2 * (weights[:, :, None] * diff).sum(1) * e

    step = max(1, (1 << 24) // max(1, y.size))
    return np.concatenate([rows(x[k:k + step], y, b, e[k:k + step]) for k in range(0, len(x), step)], axis=0)


register_case(Case(
    name="gaussian_grad",
    formula=f"Grad({FORWARD}, x, e)",
    aliases=_aliases,
    reduction="Sum",
    data=lambda rng, n, m, d: (*points(rng, n, m, d), rng.standard_normal((m, 1)), rng.standard_normal((n, 1))),
    reference=_reference,
    error=max_relative_error,
    sizes=(1_000, 10_000, 30_000),
    quick_sizes=(1_000, 2_000),
    dims=(3,),
    notes="autograd impls: forward + backward; formula-driven impls: the backward reduction alone",
    extra={"forward": FORWARD},
))

AUTOGRAD_CASES = ("gaussian_grad",)


def _torch_inputs(arrays):
    import torch
    return [torch.from_numpy(a) for a in arrays]


def _kred_build(backend: str):
    def build(case: Case, arrays):
        import torch

        from kred.engine.torch import Genred
        x, y, b, e = _torch_inputs(arrays)
        op = Genred(case.extra["forward"], _aliases(x.shape[1])[:3], axis=1)

        def call():
            xr = x.detach().requires_grad_()
            g, = torch.autograd.grad(op(xr, y, b, backend=backend), xr, grad_outputs=e)
            return g.numpy()
        return call
    return build


def _pykeops_build(case: Case, arrays):
    import torch
    from pykeops.torch import LazyTensor
    x, y, b, e = _torch_inputs(arrays)
    y_j, b_j = LazyTensor(y[None, :, :]), LazyTensor(b[None, :, :])

    def call():
        xr = x.detach().requires_grad_()
        x_i = LazyTensor(xr[:, None, :])
        a = ((-((x_i - y_j) ** 2).sum(-1)).exp() * b_j).sum(dim=1, backend="CPU")
        g, = torch.autograd.grad(a, xr, grad_outputs=e)
        return g.numpy()
    return call


def _torch_dense_build(case: Case, arrays):
    import torch
    x, y, b, e = _torch_inputs(arrays)

    def call():
        xr = x.detach().requires_grad_()
        a = torch.exp(-torch.cdist(xr, y) ** 2) @ b            # the N x M kernel matrix, as a user would write it
        g, = torch.autograd.grad(a, xr, grad_outputs=e)
        return g.numpy()
    return call


def _supports(case: Case) -> bool:
    return case.name in AUTOGRAD_CASES


for _backend in ("reference", "cpu", "cuda"):
    register_impl(Impl(f"kred-{_backend}-autograd", _kred_build(_backend), _engine_available(_backend), _supports,
                       description=f"kred.torch.Genred(backend={_backend!r}), forward + backward"))
register_impl(Impl("pykeops-cpu-autograd", _pykeops_build, _pykeops_available(False), _supports,
                   description="pykeops.torch LazyTensor on the CPU, forward + backward"))
register_impl(Impl("torch-autograd", _torch_dense_build, lambda: "", _supports,
                   description="dense torch (N x M matrices), forward + backward"))
