"""`Cluster`: one reduction over every GPU and node of a Ray cluster (an embedded local one by default)."""
from __future__ import annotations

import atexit
import hashlib
import os
import threading

import numpy as np

from ..errors import ArgumentError, BackendError
from ..plan import COLS, ROWS, Plan
from ..spec import Spec
from ..ranges import ranges_grid
from . import reaper
from .blocks import CACHE_BYTES
from .dataset import Dataset, DatasetError, Output, check_rows, dataset_shards, row_blocks, row_reader
from .job import DatasetJob, Job
from .sharding import MIN_SHARD_PAIRS, SHARDS_PER_WORKER, choose_split, make_shards, shards_of
from .workers import WorkerPool, layout


class Cluster:
    """Workers on a Ray cluster, and the jobs that run reductions on them.

    >>> with Cluster() as cl:                   # embedded local Ray: all local GPUs, else CPU workers
    ...     a = cl.reduce("Exp(-SqDist(x,y))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], x, y, b, axis=1)

    address: None starts (or reuses) a local Ray; "ray://head:10001" or "auto" joins an existing cluster.
    device: "gpu" (one actor per unit of `resource`), "cpu" (`workers` actors of `threads` CPUs, default one per
      node using all its CPUs) or "auto" (gpu when any node has `resource`).
    resource: the resource a device actor takes one unit of: "GPU", or a custom resource name.
    backend: the engine backend the workers run ("auto": each worker picks the best one it has).
    shards_per_worker, min_shard_pairs: how finely the automatic split cuts a job (see sharding.choose_split).
    inflight: shards queued per worker; max_attempts: lost workers a shard survives before the job fails;
    speculate: copy the last stragglers onto idle workers.
    on_shard: a picklable callable run in the worker before each shard (tests and diagnostics).
    ray_options: extra `ray.init` arguments when this Cluster starts Ray (num_cpus, object_store_memory...).
    min_workers, max_workers: the workers kept when idle, and the most started (None: as many as the layout has).
    idle_timeout: seconds without a job after which all but `min_workers` workers are given back to Ray, so that
      other drivers can use the cluster (None: never); the next job starts them again.
    cache_bytes: each worker's budget for the input blocks it keeps between shards.

    The workers follow the cluster: while jobs run, nodes that join get workers, which take shards of running
    jobs; a job with more shards than workers asks Ray's autoscaler for room (and proceeds with what it has).
    """

    def __init__(self, address: str | None = None, *, device: str = "auto", resource: str = "GPU",
                 workers: int | None = None, threads: int | None = None, backend: str = "auto",
                 shards_per_worker: int = SHARDS_PER_WORKER, min_shard_pairs: int = MIN_SHARD_PAIRS,
                 inflight: int = 2, max_attempts: int = 3, speculate: bool = True, worker_wait: float = 60.0,
                 start_timeout: float = 120.0, on_shard=None, ray_options: dict | None = None,
                 min_workers: int = 0, max_workers: int | None = None, idle_timeout: float | None = 60.0,
                 cache_bytes: int = CACHE_BYTES):
        ray = _ray()
        self._owns_ray, self._reaper = not ray.is_initialized(), None
        if self._owns_ray:
            options = {"include_dashboard": False, **(ray_options or {})}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # A Ray of our own ("local": ray.init(None) would join whatever Ray was last started on this
                # machine); its workers compute at the caller's priority, not at Ray's default nice 15 (which
                # halves a reduction's speed on a machine that is busy with anything else).
                address = "local"
                options.setdefault("_system_config", {"worker_niceness": 0})
            before = set(reaper.descendants(os.getpid())) if os.path.isdir("/proc") else set()
            ray.init(address=address, **options)
            # Ray's agents can outlive this process if it is killed: a watcher stops what ray.init started then
            self._reaper = reaper.watch(os.getpid(), before)
        self.shards_per_worker, self.min_shard_pairs = shards_per_worker, min_shard_pairs
        self._job_options = dict(inflight=inflight, max_attempts=max_attempts, speculate=speculate,
                                 worker_wait=worker_wait)
        def specs():
            return layout(ray.nodes(), device, resource, workers, threads)

        self.pool = WorkerPool(specs, backend, on_shard, min_workers=min_workers, max_workers=max_workers,
                               idle_timeout=idle_timeout, cache_bytes=cache_bytes)
        try:
            self.pool.wait_started(start_timeout)
        except BaseException:
            self.close()
            raise

    # Submitting work -------------------------------------------------------------------------------------
    def submit(self, formula: str, aliases, *args, split: tuple[int, int] | None = None, ranges=None,
               **options) -> Job:
        """Start a reduction (same arguments as `engine.reduce`: `options` are the fields of `Spec`); returns its
        Job at once."""
        return self.submit_plan(Spec(formula, aliases, **options).plan(), args, split=split, ranges=ranges)

    def submit_plan(self, plan: Plan, args, split: tuple[int, int] | None = None, ranges=None) -> Job:
        """Start the reduction of an already built plan. `split` = (row blocks, column blocks) overrides the
        automatic split. `ranges` (pykeops' block-sparse 6-tuple, see engine.ranges): one shard per cluster of rows,
        reading only its rows and its column ranges."""
        if self.pool is None:
            raise BackendError("this Cluster is closed")
        arrays, dtype, n, m = plan.check_args(args)
        if ranges is not None:
            if split is not None:
                raise ArgumentError("split and ranges cannot be combined: ranges decide the shards")
            shards = shards_of(ranges_grid(ranges, plan.axis, n, m))
        else:
            if split is None:
                split = choose_split(n, m, max(1, self.pool.size), self.shards_per_worker, self.min_shard_pairs)
            shards = make_shards(n, m, split)
        return Job(self.pool, plan, arrays, dtype, shards, **self._job_options)

    def submit_dataset(self, plan: Plan, inputs: list, output: str, dtype=None) -> DatasetJob:
        """Start an out-of-core job: `inputs` are, per argument of the plan, an array or a `Dataset`; the row-side
        ones (the output's rows) must be Datasets, which the workers read row group by row group. Column-side
        Datasets are read by the workers too, as column blocks (the row groups of the first of them); column-side
        arrays and parameters are put in the object store. The driver reads only the datasets' metadata. The
        workers write the result to the Parquet dataset `output` (a folder or URI), one file per row block (the row
        groups of the first row-side input); blocks already written there by the same job are not computed again.
        The job's result is `output`."""
        if self.pool is None:
            raise BackendError("this Cluster is closed")
        if len(inputs) != plan.nargs:
            raise DatasetError(f"expected {plan.nargs} inputs ({', '.join(a.name for a in plan.args)}), "
                               f"got {len(inputs)}")
        readers, col_readers, arrays = {}, {}, []
        for k, (spec, source) in enumerate(zip(plan.args, inputs)):
            if spec.role == ROWS:
                if not isinstance(source, Dataset):
                    raise DatasetError(f"{spec.name} is a row-side input of a dataset job: give it as a Dataset")
                readers[k] = reader = row_reader(source, spec.name, spec.dim, dtype)
                arrays.append(np.zeros((1, spec.dim), reader.dtype))     # a stand-in, for the checks below
            elif isinstance(source, Dataset) and spec.role == COLS:
                col_readers[k] = reader = row_reader(source, spec.name, spec.dim, dtype)
                # a stand-in of the right length for the checks below: calloc'd pages that are never touched,
                # so it holds no memory
                arrays.append(np.zeros((reader.rows, spec.dim), reader.dtype))
            elif isinstance(source, Dataset):          # a parameter: a few numbers, read here
                reader = row_reader(source, spec.name, spec.dim, dtype)
                arrays.append(reader.read(0, reader.rows))
            else:
                arrays.append(source)
            dtype = dtype or (reader.dtype if isinstance(source, Dataset) else None)
        if not readers:
            raise DatasetError("a dataset job needs a row-side input (an i variable, or j for axis=0)")
        arrays, dtype, _, m = plan.check_args(arrays)
        n = check_rows(plan, readers, {})
        blocks = row_blocks(readers[min(readers)])
        columns = tuple(row_blocks(col_readers[min(col_readers)])) if col_readers else ((0, m),)
        digest = hashlib.sha256()
        for k, array in enumerate(arrays):
            if k in col_readers:
                digest.update(col_readers[k].key.encode())
            elif k not in readers:
                digest.update(np.ascontiguousarray(array).tobytes())
        job = {"plan": plan.key, "rows": n, "columns": m, "dtype": dtype.str, "blocks": blocks,
               "inputs": [inputs[k].uri for k in sorted(readers)], "others": digest.hexdigest()}
        out = Output(output, job)
        shards = dataset_shards(blocks, columns, out.written)
        arrays = [None if k in readers or k in col_readers else a for k, a in enumerate(arrays)]
        return DatasetJob(self.pool, plan, arrays, dtype, shards, [readers[k] for k in sorted(readers)], out,
                          col_readers, **self._job_options)

    def reduce(self, formula: str, aliases, *args, progress: bool = False, timeout: float | None = None, **kwargs):
        """`submit(...)` and wait for the result (with a progress bar if `progress`)."""
        return self.submit(formula, aliases, *args, **kwargs).result(timeout, progress=progress)

    def run_plan(self, plan: Plan, args, progress: bool = False, timeout: float | None = None, split=None,
                 ranges=None):
        job = self.submit_plan(plan, args, split=split, ranges=ranges)
        try:
            return job.result(timeout, progress=progress)
        except KeyboardInterrupt:
            job.cancel()
            raise

    # The cluster -----------------------------------------------------------------------------------------
    @property
    def workers(self) -> list[dict]:
        """What each live worker reported: node, GPU ids, threads, backend."""
        return [dict(name=w.spec.name, **w.info) for w in self.pool.poll()] if self.pool else []

    def close(self) -> None:
        """Stop the workers (and Ray, if this Cluster started it)."""
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            pool.close()
        if self._owns_ray:
            self._owns_ray = False
            _ray().shutdown()
            if self._reaper is not None:        # Ray stopped cleanly: the watcher has nothing left to do
                self._reaper.kill()
                self._reaper.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ray():
    import ray
    return ray


# The default cluster behind backend="cluster" -------------------------------------------------------------

_default: Cluster | None = None
_default_lock = threading.Lock()


def default_cluster() -> Cluster:
    """A Cluster started on first use, joining $RAY_ADDRESS when set, closed when the process exits."""
    global _default
    with _default_lock:
        if _default is None or _default.pool is None:
            _default = Cluster(os.environ.get("RAY_ADDRESS") or None)
            atexit.register(_default.close)
        return _default
