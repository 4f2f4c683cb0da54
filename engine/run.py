"""Running a plan: validate the arrays, pick the backend, honour `out=`."""
from __future__ import annotations

import numpy as np

from .backends import get_backend
from .backends.cuda import on_gpu
from .batch import batch_items, batch_shape, stack_items
from .errors import ArgumentError
from .plan import Plan
from .ranges import reduce_blocks

# pykeops spellings of backends, mapped to ours.
PYKEOPS_BACKENDS = {"CPU": "cpu", "GPU": "cuda", "GPU_1D": "cuda", "GPU_2D": "cuda"}


def backend_name(backend: str) -> str:
    return PYKEOPS_BACKENDS.get(backend, backend)


def run(plan: Plan, args, backend: str = "auto", out=None, ranges=None, device_id: int = -1, cluster=None):
    """Compute the reduction of `plan` on `args` (numpy arrays in, numpy arrays out).

    `backend="cluster"` (or a `cluster=` engine.cluster.Cluster) runs it on Ray workers; without `cluster=` a
    default embedded Cluster starts on first use.

    `ranges` (the pykeops block-sparse 6-tuple, see engine.ranges) and leading batch dimensions (engine.batch) work on
    every backend: both are built on `Backend.partial` / `Backend.reduce`.
    """
    if _widen_half(args, backend, cluster):
        result = run(plan, [_float32(a) for a in args], backend, None, ranges, device_id, cluster)
        return _into(out, _float16(result))
    batch = batch_shape(plan, args)
    if batch:
        if ranges is not None:
            raise ArgumentError("ranges (block-sparse reductions) cannot be combined with batch dimensions")
        results = [run(plan, item, backend, device_id=device_id, cluster=cluster)
                   for item in batch_items(plan, args, batch)]
        return _into(out, stack_items(batch, results))
    if cluster is not None or backend_name(backend) == "cluster":
        return _into(out, _cluster(cluster).run_plan(plan, args, ranges=ranges))
    engine = get_backend(_resolve(backend, args)).bind(args, device_id)
    arrays, _, n, m = plan.check_args(args, xp=engine.xp, dtypes=engine.dtypes)
    return _into(out, _reduce(engine, plan, arrays, n, m, ranges))


def run_checked(plan: Plan, arrays, n: int, m: int, backend: str = "auto", ranges=None):
    """`run` for arrays that `plan.check_args` already returned (rows `n`, columns `m`): the service validates a
    request's arrays once, when it binds them to the plan, and they reach the backend as they are."""
    engine = get_backend(_resolve(backend, arrays)).bind(arrays)
    return _reduce(engine, plan, arrays, n, m, ranges)


def _reduce(engine, plan: Plan, arrays, n: int, m: int, ranges):
    if ranges is not None:
        return reduce_blocks(engine, plan, arrays, n, m, ranges)
    return engine.reduce(plan, arrays, n, m)


def _widen_half(args, backend: str, cluster) -> bool:
    """float16 arrays for a backend that computes in float32 / float64 only (all but cuda): they are widened to
    float32 at this boundary and the results rounded back to float16, as the cuda backend does inside its kernels."""
    if not args or not all(str(getattr(a, "dtype", "")).removeprefix("torch.") == "float16" for a in args):
        return False
    if cluster is not None or backend_name(backend) == "cluster":
        return True
    return np.dtype(np.float16) not in get_backend(_resolve(backend, args)).dtypes


def _float32(array):
    return array.astype(np.float32) if hasattr(array, "astype") else array.float()


def _float16(result):
    if isinstance(result, tuple):
        return tuple(_float16(r) for r in result)
    return result.astype(np.float16) if result.dtype == np.float32 else result      # indices stay int64


def _resolve(backend: str, args) -> str:
    """The backend's name; "auto" with arrays already on a GPU means cuda (they stay there)."""
    name = backend_name(backend)
    if name == "auto" and any(type(a) is not np.ndarray and on_gpu(a) for a in args):   # numpy: skip the probe
        return "cuda"
    return name


def _cluster(cluster):
    if cluster is not None:
        return cluster
    from .cluster import default_cluster      # here, so that `import engine` never imports Ray
    return default_cluster()


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
