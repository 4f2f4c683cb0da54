"""Running a plan: validate the arrays, pick the backend, honour `out=`."""
from __future__ import annotations

import numpy as np

from .backends import get_backend
from .errors import ArgumentError
from .plan import Plan

# pykeops spellings of backends, mapped to ours.
PYKEOPS_BACKENDS = {"CPU": "cpu", "GPU": "cuda", "GPU_1D": "cuda", "GPU_2D": "cuda"}


def backend_name(backend: str) -> str:
    return PYKEOPS_BACKENDS.get(backend, backend)


def run(plan: Plan, args, backend: str = "auto", out=None, ranges=None, device_id: int = -1):
    """Compute the reduction of `plan` on `args` (numpy arrays in, numpy arrays out)."""
    arrays, dtype, n, m = plan.check_args(args)
    if ranges is not None:
        raise ArgumentError("ranges (block-sparse reductions) are not supported by this version")
    result = get_backend(backend_name(backend)).reduce(plan, arrays, n, m)
    return _into(out, result)


def _into(out, result):
    if out is None:
        return result
    if isinstance(result, tuple):
        raise ArgumentError("out= cannot hold a reduction that returns (values, indices)")
    if not isinstance(out, np.ndarray) or out.shape != result.shape or out.dtype != result.dtype:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ArgumentError(f"out= must be a {result.dtype} array of shape {result.shape}, got {got}")
    out[...] = result
    return out
