"""Benchmark impls: what runs a case. An impl is a name and a function that builds the timed callable.

`build(case, arrays)` receives the case and its input arrays (numpy, already in the benchmark dtype) and returns a
zero-argument callable that computes the reduction over j for every i and returns a numpy array: setup such as
copying to a device stays outside the timing, compilation happens in the (untimed) warm-up call. `available()`
returns "" when the impl can run here, else the reason it cannot.

Impls registered here:
- `kred-<backend>`: every engine backend present (reference, cpu, cuda), through engine.numpy.Genred;
- `pykeops-cpu` / `pykeops-gpu`: pykeops 2.3 when importable (benchmark-only dependency; compiles with g++);
- `torch` (and `torch-cuda` with a GPU): dense blocks of rows, so memory stays bounded;
- `numpy`: the same dense blocks of rows in numpy.
The torch and numpy peers are hand-written per case (dicts below); they skip cases they do not know.
To add an impl, call `register_impl` from a module given to `python -m benchmarks.run --plugin your.module`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cases import Case

BLOCK_ELEMENTS = 1 << 22        # numbers in one dense block of the numpy / torch peers (16 MiB in float32)


@dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Case, list], Callable[[], np.ndarray]]
    available: Callable[[], str] = lambda: ""
    supports: Callable[[Case], bool] = lambda case: True
    description: str = ""


IMPLS: dict[str, Impl] = {}


def register_impl(impl: Impl) -> Impl:
    if impl.name in IMPLS:
        raise ValueError(f"benchmark impl {impl.name!r} is registered twice")
    IMPLS[impl.name] = impl
    return impl


def _aliases(case: Case, arrays) -> list[str]:
    return case.aliases(arrays[0].shape[1])


# The engine's backends ----------------------------------------------------------------------------------------

def _engine_available(backend: str) -> Callable[[], str]:
    def available() -> str:
        from kred.engine.backends import get_backend
        from kred.engine.errors import BackendError
        try:
            get_backend(backend)
        except BackendError as e:
            return str(e)
        return ""
    return available


def _engine_build(backend: str):
    def build(case: Case, arrays):
        from kred.engine.numpy import Genred
        op = Genred(case.formula, _aliases(case, arrays), reduction_op=case.reduction, axis=1, opt_arg=case.opt_arg,
                    formula2=case.formula2)
        return lambda: op(*arrays, backend=backend)
    return build


for _backend in ("reference", "cpu", "cuda"):
    register_impl(Impl(f"kred-{_backend}", _engine_build(_backend), _engine_available(_backend),
                       description=f"kred.numpy.Genred(backend={_backend!r})"))


# pykeops ------------------------------------------------------------------------------------------------------

def _gpu_visible() -> bool:
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _pykeops_available(gpu: bool) -> Callable[[], str]:
    def available() -> str:
        if importlib.util.find_spec("pykeops") is None:
            return "pykeops is not installed (pip install pykeops==2.3)"
        if gpu and not _gpu_visible():
            return "no GPU visible"
        return ""
    return available


def _pykeops_build(gpu: bool):
    def build(case: Case, arrays):
        from pykeops.numpy import Genred
        op = Genred(case.formula, _aliases(case, arrays), reduction_op=case.reduction, axis=1, opt_arg=case.opt_arg,
                    formula2=case.formula2)
        return lambda: op(*arrays, backend="GPU" if gpu else "CPU")
    return build


register_impl(Impl("pykeops-cpu", _pykeops_build(False), _pykeops_available(False), description="pykeops, CPU"))
register_impl(Impl("pykeops-gpu", _pykeops_build(True), _pykeops_available(True), description="pykeops, GPU"))


# numpy, dense blocks of rows -----------------------------------------------------------------------------------

def _np_sqdist(x, y, y2):
    d2 = (x * x).sum(1, keepdims=True) + y2 - 2 * (x @ y.T)
    return np.maximum(d2, 0, out=d2)


def _np_gaussian_sum(x, y, b):
    y2 = (y * y).sum(1)[None, :]
    return _np_blocks(x, y, lambda xs: np.exp(-_np_sqdist(xs, y, y2)) @ b)


def _np_logsumexp(x, y):
    y2 = (y * y).sum(1)[None, :]

    def block(xs):
        f = -_np_sqdist(xs, y, y2)
        top = f.max(1, keepdims=True)
        return top + np.log(np.exp(f - top).sum(1, keepdims=True))
    return _np_blocks(x, y, block)


def _np_argkmin(x, y, k=10):
    y2 = (y * y).sum(1)[None, :]

    def block(xs):
        d2 = _np_sqdist(xs, y, y2)
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d2, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1)
    return _np_blocks(x, y, block)


def _np_blocks(x, y, block):
    step = max(1, BLOCK_ELEMENTS // len(y))
    return np.concatenate([block(x[k:k + step]) for k in range(0, len(x), step)], axis=0)


NUMPY_KERNELS = {"gaussian_sum": _np_gaussian_sum, "logsumexp": _np_logsumexp, "argkmin": _np_argkmin}

register_impl(Impl("numpy", lambda case, arrays: (lambda: NUMPY_KERNELS[case.name](*arrays)),
                   supports=lambda case: case.name in NUMPY_KERNELS,
                   description=f"numpy, dense blocks of {BLOCK_ELEMENTS} pairs"))


# torch, dense blocks of rows -----------------------------------------------------------------------------------

def _torch_kernels():
    import torch

    def blocks(x, y, block):
        step = max(1, BLOCK_ELEMENTS // len(y))
        return torch.cat([block(x[k:k + step]) for k in range(0, len(x), step)], 0)

    def sqdist(xs, y):
        return torch.cdist(xs, y) ** 2

    return {
        "gaussian_sum": lambda x, y, b: blocks(x, y, lambda xs: torch.exp(-sqdist(xs, y)) @ b),
        "logsumexp": lambda x, y: blocks(x, y, lambda xs: torch.logsumexp(-sqdist(xs, y), 1, keepdim=True)),
        "argkmin": lambda x, y: blocks(x, y, lambda xs: torch.topk(sqdist(xs, y), 10, 1, largest=False).indices),
    }


TORCH_CASES = ("gaussian_sum", "logsumexp", "argkmin")


def _torch_build(device: str):
    def build(case: Case, arrays):
        import torch
        kernel = _torch_kernels()[case.name]
        tensors = [torch.from_numpy(a).to(device) for a in arrays]

        def call():
            with torch.no_grad():
                out = kernel(*tensors)
            if device != "cpu":
                torch.cuda.synchronize()
            return out.cpu().numpy()
        return call
    return build


def _torch_available(device: str) -> Callable[[], str]:
    def available() -> str:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        if device != "cpu":
            import torch
            if not torch.cuda.is_available():
                return "torch sees no CUDA device"
        return ""
    return available


register_impl(Impl("torch", _torch_build("cpu"), _torch_available("cpu"), lambda case: case.name in TORCH_CASES,
                   description=f"torch (CPU), dense blocks of {BLOCK_ELEMENTS} pairs"))
register_impl(Impl("torch-cuda", _torch_build("cuda"), _torch_available("cuda"), lambda case: case.name in TORCH_CASES,
                   description=f"torch (CUDA), dense blocks of {BLOCK_ELEMENTS} pairs"))
