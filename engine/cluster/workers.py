"""The Ray actors that compute shards, and the pool that follows the Ray cluster with them.

One actor per device: per GPU (`num_gpus=1`, Ray sets CUDA_VISIBLE_DEVICES) or per unit of a custom resource, or
per CPU worker with its thread count. The pool re-reads the cluster's nodes while it is in use, so a node that
joins gets workers (and takes shards of running jobs), and gives its actors back after `idle_timeout` without jobs
so that other drivers can use the cluster; compiled kernels stay cached on disk, so restarting them is cheap.
Each actor keeps the input blocks it fetched in a byte-bounded LRU cache (`blocks.BlockCache`).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from ..backends import get_backend
from ..errors import BackendError
from ..plan import COLS
from ..reductions import merge_all
from .blocks import CACHE_BYTES, BlockCache, shard_arrays, shift_indices

MAX_FAILED_STARTS = 3    # an actor that keeps dying while starting is given up on
REFRESH_SECONDS = 1.0    # how often a pool in use looks for nodes that joined


class ShardWorker:
    """Computes partial states of shards; wrapped with `ray.remote` by the pool (so this module imports no Ray)."""

    def __init__(self, backend: str, threads: int | None = None, on_shard=None, cache_bytes: int = CACHE_BYTES):
        if threads:
            # Read by the cpu backend and OpenMP when they first load, which happens after this in a fresh actor
            # (Ray does not pin CPUs, so without them every worker would use every core of its node).
            os.environ["KRED_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
        self.backend_name, self.threads, self.on_shard = backend, threads, on_shard
        self.cache = BlockCache(cache_bytes)
        self.held: dict[str, dict] = {}          # job key -> {shard index: (shard, state on the device)}

    def info(self) -> dict:
        import ray
        try:
            backend = get_backend(self.backend_name).name
        except BackendError as e:      # reported by the first shard, as the job's error
            backend = f"unavailable ({e})"
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "threads": self.threads, "backend": backend,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def partial(self, shard, plan, blocks, hold: str | None = None) -> tuple:
        """(the reduction state of `shard`, bytes this shard had to fetch). `blocks` is a `blocks.BlockRefs`.
        On a GPU, with `hold` (the job's key), the state stays on the device until `collect(hold, ...)` and None is
        returned in its place."""
        if self.on_shard is not None:
            self.on_shard(shard)
        backend = get_backend(self.backend_name)
        on_device = backend.name == "cuda"
        before = self.cache.fetched
        rows, *cols, params = self._fetch(blocks, on_device)
        (r0, r1) = shard.rows
        keep = on_device and hold is not None
        states = []
        for (c0, c1), columns in zip(shard.cols, cols):       # the shard's column ranges, merged in order
            arrays = shard_arrays(plan, rows, columns, params)
            bound = backend.bind(arrays)
            state = (bound.partial(plan, arrays, (0, r1 - r0), (0, c1 - c0), on_device=True) if keep else
                     bound.partial(plan, arrays, (0, r1 - r0), (0, c1 - c0)))      # numpy, any backend
            states.append(shift_indices(plan, state, c0))
        if keep:
            merged = _merged_on_device(plan.reduction, states)
            self.held.setdefault(hold, {})[shard.index] = (shard, states if merged is None else [merged])
            return None, self.cache.fetched - before
        return merge_all(plan.reduction, states), self.cache.fetched - before

    def collect(self, hold: str, plan, indices: list[int]) -> list[tuple]:
        """The states held for job `hold` of the shards `indices` (the others were copies that lost), merged on the
        device per row block in part order, then copied to the host at once: [(block, parts, state), ...]."""
        held = self.held.pop(hold, {})
        blocks: dict[int, list] = {}
        for index in sorted(indices):
            shard, states = held[index]
            blocks.setdefault(shard.block, []).append((shard.part, states))
        merged = []                # (block, parts, states: one when merged on the device, else all of them)
        for block, parts in sorted(blocks.items()):
            parts.sort(key=lambda part: part[0])
            states = [state for _, states in parts for state in states]      # part order, then column order
            one = _merged_on_device(plan.reduction, states)
            merged.append((block, tuple(p for p, _ in parts), states if one is None else [one]))
        host = iter(_to_host([state for _, _, states in merged for state in states]))
        return [(block, parts, merge_all(plan.reduction, [next(host) for _ in states]))     # on the host: the
                for block, parts, states in merged]                                         # rest, if any


    def write_block(self, shard, plan, blocks, readers, out: str, col_readers: dict | None = None) -> tuple:
        """A dataset job's shard: read its rows from the datasets (`readers`, one per row-side input), reduce
        over every column block in order, write the finished rows as the output dataset's file for this block.
        `col_readers` ({argument index: RowReader}) are the column-side inputs that are datasets: their column
        blocks are read here and cached like the object-store blocks. Returns ((), bytes read or fetched)."""
        from .dataset import write_part
        backend = get_backend(self.backend_name)
        on_device = backend.name == "cuda"
        before = self.cache.fetched
        _, *cols, params = self._fetch(blocks, on_device)
        r0, r1 = shard.rows
        rows = [reader.read(r0, r1) for reader in readers]
        if self.on_shard is not None:
            self.on_shard(shard)
        state = None                  # merged as each column block comes: a shard holds two states, not one per block
        for (c0, c1), stored in zip(shard.cols, cols):
            read = {k: self.cache.get(reader.block_key(c0, c1),
                                      lambda reader=reader: _to_device([reader.read(c0, c1)], on_device))[0]
                    for k, reader in (col_readers or {}).items()}
            store = iter(stored)
            columns = [read[k] if k in read else next(store) for k, spec in enumerate(plan.args)
                       if spec.role == COLS]
            arrays = shard_arrays(plan, rows, columns, params)
            block = shift_indices(plan, backend.bind(arrays).partial(plan, arrays, (0, r1 - r0), (0, c1 - c0)), c0)
            state = block if state is None else plan.reduction.merge(state, block)
        write_part(out, shard.block, plan.reduction.finalize(state, rows[0].dtype), plan)
        return (), self.cache.fetched - before + sum(int(a.nbytes) for a in rows)

    def _fetch(self, blocks, on_device: bool) -> list:
        """The parts of each of a shard's object-store blocks (`blocks.BlockRefs`), through the cache."""
        import ray
        return [self.cache.get(ref.hex(), lambda ref=ref: _to_device(ray.get(ref), on_device), size)
                for ref, size in zip(blocks.refs, blocks.nbytes)]

    def forget(self, keys: list[str]) -> None:
        self.cache.forget(keys)
        for key in keys:                 # a job's key: the states it held (a cancelled or failed job)
            self.held.pop(key, None)


def _merged_on_device(reduction, states: list[tuple]):
    """`merge_all` over device arrays: the reductions' numpy code runs on CuPy arrays through NumPy's dispatch to
    their module. None where that module lacks what the merge uses (CuPy's lexsort has no `axis`: the K-best
    merges), whose states are then copied as they are and merged on the host."""
    if len(states) == 1:
        return states[0]
    try:
        return merge_all(reduction, states)
    except (TypeError, NotImplementedError):
        return None


def _to_host(states: list[tuple]) -> list[tuple]:
    """Device states to numpy with one copy: every slot's bytes packed into one device buffer, split on the host."""
    import cupy
    slots = [part for state in states for part in state]
    if not slots:
        return [() for _ in states]
    packed = cupy.concatenate([cupy.ascontiguousarray(part).reshape(-1).view(cupy.uint8) for part in slots])
    data, out, offset = cupy.asnumpy(packed), [], 0
    for part in slots:
        size = part.size * part.dtype.itemsize
        out.append(data[offset:offset + size].view(part.dtype).reshape(part.shape))
        offset += size
    it = iter(out)
    return [tuple(next(it) for _ in state) for state in states]


def _to_device(parts: list, on_device: bool) -> list:
    if on_device:     # copied to this worker's GPU once per block, not once per shard
        import cupy
        parts = [cupy.asarray(a) for a in parts]
    return parts


# Where the actors go ---------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    name: str
    options: dict            # ray actor options: resources and placement
    threads: int | None


def layout(nodes: list[dict], device: str = "auto", resource: str = "GPU", workers: int | None = None,
           threads: int | None = None) -> list[WorkerSpec]:
    """The actors to start on `nodes` (as from `ray.nodes()`), named by node so that re-reading the nodes keeps the
    workers that are there and adds those of nodes that joined.

    device "gpu": one actor per unit of `resource` ("GPU", or a custom resource name), on its node.
    device "cpu": `workers` actors of `threads` CPUs each, or by default one actor per node using all its CPUs.
    device "auto": "gpu" when some node has `resource`, else "cpu".
    """
    alive = [node for node in nodes if node.get("Alive", node.get("alive", False))]
    if device not in ("auto", "gpu", "cpu"):
        raise BackendError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    if device == "auto":
        device = "gpu" if any(node["Resources"].get(resource, 0) >= 1 for node in alive) else "cpu"
    specs = []
    if device == "gpu":
        for node in alive:
            for k in range(int(node["Resources"].get(resource, 0))):
                need = {"num_gpus": 1} if resource == "GPU" else {"resources": {resource: 1}}
                specs.append(WorkerSpec(f"{resource.lower()}-{node['NodeID'][:12]}-{k}",
                                        {"num_cpus": 0, **need, **_on_node(node)}, None))
        if not specs:
            raise BackendError(f"device='gpu' but no node of the Ray cluster has a {resource!r} resource")
        return specs[:workers] if workers else specs
    total = sum(int(node["Resources"].get("CPU", 0)) for node in alive)
    if total < 1:
        raise BackendError("the Ray cluster has no CPU to run workers on")
    if workers is None:
        for node in alive:
            cpus = int(node["Resources"].get("CPU", 0))
            if cpus >= 1:
                count = threads and max(1, cpus // threads) or 1
                for k in range(count):
                    use = threads or cpus
                    specs.append(WorkerSpec(f"cpu-{node['NodeID'][:12]}-{k}", {"num_cpus": use, **_on_node(node)},
                                            use))
        return specs
    largest = max(int(node["Resources"].get("CPU", 0)) for node in alive)      # an actor must fit on one node
    use = threads or max(1, min(total // workers, largest))
    return [WorkerSpec(f"cpu-{k}", {"num_cpus": use, "scheduling_strategy": "SPREAD"}, use) for k in range(workers)]


def _on_node(node) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    # soft: if the node is gone by the time the actor is (re)scheduled, any node with the resources will do
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)}


# The pool --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Worker:
    spec: WorkerSpec
    handle: object
    ready: object = None                     # ref of the pending `info()` call while starting
    info: dict = field(default_factory=dict)
    live_since: float | None = None          # time.monotonic() when it answered


class WorkerPool:
    """The live actors of one Cluster, following `specs()` (the layout of the nodes now alive).

    Thread-safe: several jobs dispatch to, and report losses from, one pool. While jobs run (or within
    `idle_timeout` of the last one) the pool re-reads the layout every REFRESH_SECONDS and starts the actors that are
    missing: those of nodes that joined, and replacements of lost ones. After `idle_timeout` seconds without a job it
    stops all but `min_workers` actors; the next job starts them again.
    """

    def __init__(self, specs, backend: str, on_shard=None, *, min_workers: int = 0, max_workers: int | None = None,
                 idle_timeout: float | None = None, cache_bytes: int = CACHE_BYTES):
        import ray
        self._actor = ray.remote(ShardWorker)
        self._specs = specs
        self.backend, self.on_shard, self.cache_bytes = backend, on_shard, cache_bytes
        self.min_workers, self.max_workers, self.idle_timeout = min_workers, max_workers, idle_timeout
        self._lock = threading.Lock()
        self.live: list[Worker] = []
        self.starting: list[Worker] = []
        self.failed_starts: dict[str, int] = {}
        self.replaced = 0                    # workers lost while in use
        self.released = 0                    # workers given back after idle_timeout
        self.closed = False
        self.jobs = 0                        # jobs running now
        self._last_busy: float | None = None    # the idle clock starts when wait_started returns
        self._idle = False                   # True once the workers were given back
        self.refresh(first=True)
        self._keeper = threading.Thread(target=self._keep, name="kred-pool", daemon=True)
        self._keeper.start()

    # Following the cluster -----------------------------------------------------------------------------
    def refresh(self, first: bool = False) -> None:
        """Start the actors of the current layout that are neither live nor starting."""
        try:
            specs = self._specs()
        except BackendError:
            if first:
                raise
            return                            # e.g. every GPU node is gone for now: keep what is there
        if self.max_workers is not None:
            specs = specs[:self.max_workers]
        self.size = len(specs)               # the workers a job can count on once they have started
        with self._lock:
            if self.closed:
                return
            wanted = {spec.name for spec in specs}
            for worker in [w for w in self.starting if w.spec.name not in wanted]:
                self.starting.remove(worker)          # its node is gone: stop asking Ray for it
                _kill(worker.handle)
            present = {w.spec.name for w in self.live + self.starting}
            for spec in specs:
                if spec.name not in present and self.failed_starts.get(spec.name, 0) < MAX_FAILED_STARTS:
                    self._spawn(spec)

    def _spawn(self, spec: WorkerSpec) -> None:
        # max_restarts=0: a lost actor is replaced by the pool, which also re-dispatches its shards.
        handle = self._actor.options(max_restarts=0, max_task_retries=0, **spec.options).remote(
            self.backend, spec.threads, self.on_shard, self.cache_bytes)
        self.starting.append(Worker(spec, handle, handle.info.remote()))

    def _keep(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            if self.closed:
                return
            with self._lock:
                idle_for = None if self.jobs or self._last_busy is None else time.monotonic() - self._last_busy
                idle = self._idle
            if idle:
                continue
            if self.idle_timeout is not None and idle_for is not None and idle_for > self.idle_timeout:
                self.release(self.idle_timeout)
            else:
                self.refresh()

    def job_started(self) -> None:
        """A job starts: bring the workers back if they were given back."""
        with self._lock:
            self.jobs += 1
            self._last_busy = time.monotonic()
            was_idle, self._idle = self._idle, False
        if was_idle:
            self.refresh()

    def job_finished(self) -> None:
        with self._lock:
            self.jobs -= 1
            self._last_busy = time.monotonic()

    def release(self, idle_for: float = 0.0) -> None:
        """Give every actor beyond `min_workers` back to Ray (and withdraw any request to the autoscaler), unless a
        job runs or one ended (or the workers started) less than `idle_for` seconds ago."""
        with self._lock:
            if self.jobs or self.closed or self._last_busy is None or time.monotonic() - self._last_busy < idle_for:
                return
            self._idle = True
            keep = self.live[:self.min_workers]
            for worker in self.live[self.min_workers:] + self.starting:
                _kill(worker.handle)
                self.released += 1
            self.live, self.starting = keep, []
        request_resources([])

    # Workers -------------------------------------------------------------------------------------------
    def wait_started(self, timeout: float) -> None:
        """Block until every actor started so far answered; past `timeout`, fail if none did (the others keep
        starting in the background, as resources free up)."""
        import ray
        with self._lock:
            pending = {w.ready: w for w in self.starting}
        late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)[1] if pending else []
        with self._lock:
            self._last_busy = time.monotonic()       # the idle clock starts once the workers are up
        if not self.poll() and late:
            names = ", ".join(pending[r].spec.name for r in late)
            raise BackendError(f"cluster workers {names} did not start within {timeout:.0f} s "
                               "(not enough CPUs/GPUs/resources in the Ray cluster?)")

    def poll(self) -> list[Worker]:
        """Move actors that finished starting into the live set; returns the live workers."""
        import ray
        with self._lock:
            if self.starting:
                refs = [w.ready for w in self.starting]
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for worker in [w for w in self.starting if w.ready in ready]:
                    self.starting.remove(worker)
                    try:
                        worker.info = ray.get(worker.ready)
                    except ray.exceptions.RayError:        # died while starting: the next refresh tries again
                        self.failed_starts[worker.spec.name] = self.failed_starts.get(worker.spec.name, 0) + 1
                        continue
                    worker.ready, worker.live_since = None, time.monotonic()
                    self.live.append(worker)
            return list(self.live)

    def lost(self, worker: Worker) -> None:
        """`worker`'s actor died (or its node went away): drop it and start a replacement where the layout says."""
        with self._lock:
            if self.closed or worker not in self.live:
                return
            self.live.remove(worker)
            self.replaced += 1
            _kill(worker.handle)
            if self.jobs or not self._idle:
                self._spawn(_anywhere(worker.spec))

    def wanted(self, shards: int) -> None:
        """A job has `shards` shards: ask the autoscaler for room for that many workers (up to max_workers) when
        fewer are there; the job proceeds with what it has meanwhile."""
        with self._lock:
            have = self.live + self.starting
            count = min(shards, self.max_workers or shards)
            if count <= len(have) or not have:
                return
            shape = _resources(have[0].spec)
        request_resources([shape] * count)

    def broadcast_forget(self, keys: list[str]) -> None:
        with self._lock:
            for worker in self.live:
                worker.handle.forget.remote(keys)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            for worker in self.live + self.starting:
                _kill(worker.handle)
            self.live, self.starting = [], []


def _anywhere(spec: WorkerSpec) -> WorkerSpec:
    options = {key: value for key, value in spec.options.items() if key != "scheduling_strategy"}
    return WorkerSpec(spec.name, options, spec.threads)


def _resources(spec: WorkerSpec) -> dict:
    """The resource shape of one actor of `spec`, as the autoscaler takes it."""
    shape = {"CPU": spec.options.get("num_cpus", 0), "GPU": spec.options.get("num_gpus", 0),
             **spec.options.get("resources", {})}
    return {key: value for key, value in shape.items() if value}


def request_resources(bundles: list[dict]) -> None:
    """Tell Ray's autoscaler what the pool would use (an empty list withdraws the request); a hint, never an error."""
    from ray.autoscaler.sdk import request_resources as ask
    try:
        ask(bundles=bundles)
    except Exception:        # noqa: BLE001 - no autoscaler reachable (a local Ray): nothing to ask
        pass


def _kill(handle) -> None:
    import ray
    try:
        ray.kill(handle, no_restart=True)
    except Exception:        # noqa: BLE001 - already gone with its node
        pass
