"""Where the service's reductions run: one small blocking interface, two implementations.

- `LocalExecutor`: the engine in the server's process (`engine.run`), on the configured backend.
- `ClusterExecutor`: `engine.cluster.Cluster` (Ray) in a driver process of its own (`cluster_driver.py`, so that a
  dying raylet ends that process, never the server): an embedded local Ray or an existing cluster. Reductions of
  fewer than `local_below_pairs` pairs (N x M) run in this process instead, kernels warm: for them the cluster's
  round trips cost more than the computation.

`run` is called from a worker thread. `progress(fraction)` and `cancelled()` are optional callbacks used by jobs;
a cancelled run raises `Cancelled`, one the executor lost raises `Interrupted`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import CancelledError
from typing import Callable

import numpy as np

from kred.engine.backends import get_backend
from kred.engine.grid import Grid, grid_state
from kred.engine.plan import Plan
from kred.engine.ranges import ranges_grid
from kred.engine.run import backend_name, run_checked

from .cluster_driver import RemoteCluster
from .errors import Interrupted  # noqa: F401  (job_manager reads the executors' errors from here)

Progress = Callable[[float], None]
Flag = Callable[[], bool]


class Cancelled(Exception):
    """The run was cancelled before it finished."""


class Executor(ABC):
    name: str

    @abstractmethod
    def run(self, plan: Plan, arrays: list[np.ndarray], progress: Progress | None = None,
            cancelled: Flag | None = None, ranges=None, shape: tuple[int, int] | None = None):
        """The reduction's result (an array, or a tuple for values + indices); `ranges`: pykeops' block-sparse
        6-tuple (engine.ranges). `shape` = (rows, columns) says that `arrays` are what `plan.check_args` returned
        (the planner's bind, the one validation of a request): they are not checked again."""

    def prepare(self, plan: Plan, dtype) -> None:
        """Compile what `run` will need (called within the compile-time limit); a no-op where nothing compiles."""

    def health(self) -> str | None:
        """None when the executor can take work, else why not (`/healthz` answers 503 with it)."""
        return None

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """The engine in this process. Jobs run in row blocks so that they report progress and can stop between blocks."""
    name = "local"
    BLOCKS = 20
    # a run that only has `cancelled` (a request's deadline) is cut into blocks from this size on: below it one
    # call is faster and ends soon anyway
    CHECKED_FROM_PAIRS = 1e8

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        get_backend(backend_name(backend))       # fail at start, not at the first request, if it is missing

    def prepare(self, plan, dtype):
        get_backend(backend_name(self.backend)).prepare(plan, np.dtype(dtype))

    def run(self, plan, arrays, progress=None, cancelled=None, ranges=None, shape=None):
        if shape is None:
            arrays, _, *shape = plan.check_args(arrays)
        n, m = shape
        if cancelled is not None and cancelled():
            raise Cancelled()
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        backend = get_backend(backend_name(self.backend))
        acc = plan.acc_dtype(dtype)
        if ranges is not None:
            grid = ranges_grid(ranges, plan.axis, n, m)
            if cancelled is None or grid.pairs < self.CHECKED_FROM_PAIRS:
                return run_checked(plan, arrays, n, m, self.backend, ranges)
            # with a deadline, the block-sparse grid runs in pieces of row blocks (each one CSR kernel call), the
            # deadline checked between them; their states are rows of the whole, concatenated
            states = []
            for piece in grid.pieces(self.BLOCKS):
                if cancelled():
                    raise Cancelled()
                states.append(backend.grid_state(plan, arrays, piece))
            return plan.reduction.finalize(tuple(np.concatenate(parts) for parts in zip(*states)), dtype)
        if progress is None and (cancelled is None or n * m < self.CHECKED_FROM_PAIRS):
            return run_checked(plan, arrays, n, m, self.backend)

        def after(item, fraction):
            if progress is not None:
                progress(fraction)
            if fraction < 1 and cancelled is not None and cancelled():
                raise Cancelled()

        if cancelled is not None and cancelled():
            raise Cancelled()
        grid = Grid.dense((0, n), (0, m), self.BLOCKS)
        state = grid_state(grid, plan.reduction, lambda rows, cols: backend.partial(plan, arrays, rows, cols),
                           lambda count: plan.reduction.identity(count, dtype, acc), after)
        return plan.reduction.finalize(state, dtype)


class ClusterExecutor(Executor):
    """Reductions through `engine.cluster` (Ray): an embedded local Ray (`address=None`) or an existing cluster,
    driven from a child process (`RemoteCluster`, restarted if it dies), or a Cluster the caller already started
    in this process (`cluster=`, left open on `close`). Below `local_below_pairs` pairs a
    reduction runs in this process on `backend` (0: everything goes to the cluster)."""
    name = "cluster"

    def __init__(self, address: str | None = None, cluster=None, local_below_pairs: float = 0, backend: str = "auto",
                 **options):
        self.local = LocalExecutor(backend) if local_below_pairs > 0 else None
        self.local_below_pairs = local_below_pairs
        if cluster is None:
            cluster, self._owned = RemoteCluster(address, **options), True
        else:
            self._owned = False
        self.cluster = cluster

    def prepare(self, plan, dtype):
        if self.local is not None:
            self.local.prepare(plan, dtype)

    def health(self):
        check = getattr(self.cluster, "health", None)
        return check() if check is not None else None

    def run(self, plan, arrays, progress=None, cancelled=None, ranges=None, shape=None):
        if self.local is not None:
            if shape is None:
                arrays, _, *shape = plan.check_args(arrays)
            if shape[0] * shape[1] < self.local_below_pairs:
                return self.local.run(plan, arrays, progress, cancelled, ranges, shape)
        return self._wait(self.cluster.submit_plan(plan, arrays, ranges=ranges), progress, cancelled)

    def run_dataset(self, plan, sources, output: str, progress=None, cancelled=None) -> str:
        """An out-of-core job (`Cluster.submit_dataset`): the workers read and write the datasets; returns `output`."""
        return self._wait(self.cluster.submit_dataset(plan, sources, output), progress, cancelled)

    @staticmethod
    def _wait(job, progress, cancelled):
        while True:
            if cancelled is not None and cancelled():
                job.cancel()
                raise Cancelled()
            try:
                return job.result(timeout=0.1)
            except TimeoutError:
                if progress is not None:
                    progress(job.progress().fraction)
            except CancelledError:
                raise Cancelled() from None

    def close(self) -> None:
        if self._owned:
            self.cluster.close()


def make_executor(kind: str, backend: str = "auto", ray_address: str | None = None,
                  local_below_pairs: float = 0) -> Executor:
    if kind == "cluster":
        return ClusterExecutor(ray_address, local_below_pairs=local_below_pairs, backend=backend)
    return LocalExecutor(backend)
