"""The Ray actors that compute shards, and the pool that starts, watches and replaces them.

One actor per device: per GPU (`num_gpus=1`, Ray sets CUDA_VISIBLE_DEVICES) or per unit of a custom resource, or
per CPU worker with its thread count. Actors live as long as the Cluster, so compiled kernels stay warm, and each
keeps the inputs it has already fetched, keyed by object ref, so a job's arrays cross the network once per worker.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..backends import get_backend
from ..errors import BackendError

INPUT_CACHE_SIZE = 2     # jobs whose inputs a worker keeps; more would pin object-store memory for nothing
MAX_FAILED_STARTS = 3    # an actor that keeps dying while starting is given up on


class ShardWorker:
    """Computes partial states of shards; wrapped with `ray.remote` by the pool (so this module imports no Ray)."""

    def __init__(self, backend: str, threads: int | None = None, on_shard=None):
        if threads:
            # Read by the cpu backend and OpenMP when they first load, which happens after this in a fresh actor
            # (Ray does not pin CPUs, so without them every worker would use every core of its node).
            os.environ["KRED_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
        self.backend_name, self.threads, self.on_shard = backend, threads, on_shard
        self.inputs: OrderedDict[str, tuple] = OrderedDict()

    def info(self) -> dict:
        import ray
        try:
            backend = get_backend(self.backend_name).name
        except BackendError as e:      # reported by the first shard, as the job's error
            backend = f"unavailable ({e})"
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "threads": self.threads, "backend": backend,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def partial(self, shard, inputs: list) -> tuple:
        """The reduction state of `shard`; `inputs` is [ref to (plan, arrays)] (in a list so Ray does not fetch it)."""
        backend = get_backend(self.backend_name)
        plan, arrays = self._fetch(inputs[0], on_device=backend.name == "cuda")
        if self.on_shard is not None:
            self.on_shard(shard)
        return backend.bind(arrays).partial(plan, arrays, shard.rows, shard.cols)     # numpy state, on any backend

    def forget(self, key: str) -> None:
        self.inputs.pop(key, None)

    def _fetch(self, ref, on_device: bool) -> tuple:
        import ray
        key = ref.hex()
        if key in self.inputs:
            self.inputs.move_to_end(key)
        else:
            plan, arrays = ray.get(ref)
            if on_device:     # copied to this worker's GPU once per job, not once per shard
                import cupy
                arrays = [cupy.asarray(a) for a in arrays]
            self.inputs[key] = plan, arrays
            while len(self.inputs) > INPUT_CACHE_SIZE:
                self.inputs.popitem(last=False)
        return self.inputs[key]


# Where the actors go ---------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    name: str
    options: dict            # ray actor options: resources and placement
    threads: int | None


def layout(nodes: list[dict], device: str = "auto", resource: str = "GPU", workers: int | None = None,
           threads: int | None = None) -> list[WorkerSpec]:
    """The actors to start on `nodes` (as from `ray.nodes()`).

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
            for _ in range(int(node["Resources"].get(resource, 0))):
                need = {"num_gpus": 1} if resource == "GPU" else {"resources": {resource: 1}}
                specs.append(WorkerSpec(f"{resource.lower()}-{len(specs)}",
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
                for _ in range(count):
                    use = threads or cpus
                    specs.append(WorkerSpec(f"cpu-{len(specs)}", {"num_cpus": use, **_on_node(node)}, use))
        return specs
    use = threads or max(1, total // workers)
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
    failed_starts: int = 0


class WorkerPool:
    """The live actors of one Cluster. Thread-safe: several jobs dispatch to, and report losses from, one pool."""

    def __init__(self, specs: list[WorkerSpec], backend: str, on_shard=None):
        import ray
        self._actor = ray.remote(ShardWorker)
        self.backend, self.on_shard = backend, on_shard
        self._lock = threading.Lock()
        self.live: list[Worker] = []
        self.starting: list[Worker] = []
        self.replaced = 0
        self.closed = False
        for spec in specs:
            self._spawn(spec)

    def _spawn(self, spec: WorkerSpec, failed_starts: int = 0) -> None:
        # max_restarts=0: a lost actor is replaced by the pool, which also re-dispatches its shards.
        handle = self._actor.options(max_restarts=0, max_task_retries=0, **spec.options).remote(
            self.backend, spec.threads, self.on_shard)
        self.starting.append(Worker(spec, handle, handle.info.remote(), failed_starts=failed_starts))

    def wait_started(self, timeout: float) -> None:
        """Block until every first-generation actor answered, or fail naming those that did not."""
        import ray
        with self._lock:
            pending = {w.ready: w for w in self.starting}
        if not pending:
            return
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        self.poll()
        if late:
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
                    except ray.exceptions.RayError:        # died while starting: try again elsewhere, a few times
                        if worker.failed_starts + 1 < MAX_FAILED_STARTS:
                            self._spawn(_anywhere(worker.spec), worker.failed_starts + 1)
                        continue
                    worker.ready = None
                    self.live.append(worker)
            return list(self.live)

    def lost(self, worker: Worker) -> None:
        """`worker`'s actor died (or its node went away): drop it and start a replacement wherever it fits."""
        import ray
        with self._lock:
            if self.closed or worker not in self.live:
                return
            self.live.remove(worker)
            self.replaced += 1
            ray.kill(worker.handle, no_restart=True)
            self._spawn(_anywhere(worker.spec))

    def broadcast_forget(self, key: str) -> None:
        with self._lock:
            for worker in self.live:
                worker.handle.forget.remote(key)

    def close(self) -> None:
        import ray
        with self._lock:
            self.closed = True
            for worker in self.live + self.starting:
                ray.kill(worker.handle, no_restart=True)
            self.live, self.starting = [], []


def _anywhere(spec: WorkerSpec) -> WorkerSpec:
    options = {key: value for key, value in spec.options.items() if key != "scheduling_strategy"}
    return WorkerSpec(spec.name, options, spec.threads)
