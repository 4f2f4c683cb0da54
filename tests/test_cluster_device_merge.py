"""GPU workers of the cluster keep their shards' partial states on the device, merge them there (per row block, in
part order, with the reduction's own merge over the device arrays) and copy them to the host once per job. Two
emulated GPUs (tests/cuda_emulation.py's FakeCupy installed in each Ray worker, real NVRTC cubins): every copy to
the host is logged, so the test counts them; results against dense numpy in float64."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import ray

from conftest import start_ray
from kred.engine.cluster import Cluster
from kred.engine.numpy import Genred

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the hook runs in the workers


class EmulatedGPU:
    """Run in each worker before its shards: CuPy replaced by the emulation, every host copy logged to `log`."""

    def __init__(self, log: str, tests: str):
        self.log, self.tests = log, tests

    def __call__(self, shard) -> None:
        if getattr(sys.modules.get("cupy"), "emulated", False):
            return
        sys.path.insert(0, self.tests)
        import cuda_emulation

        from kred.engine import backends
        from kred.engine.backends import cuda
        fake = cuda_emulation.FakeCupy(sm_count=4)
        fake.emulated, fake.concatenate, fake.uint8 = True, np.concatenate, np.uint8
        copy, log = fake.asnumpy, self.log

        def asnumpy(array, stream=None):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return copy(array, stream)

        fake.asnumpy = asnumpy
        sys.modules["cupy"] = fake
        cuda._cupy, cuda.gpu_count = (lambda: fake), (lambda: 1)
        for cached in (cuda._sm_count, cuda._shared_limit, backends._instance):
            cached.cache_clear()


@pytest.fixture(scope="module")
def gpus(tmp_path_factory):
    log = tmp_path_factory.mktemp("copies") / "log"
    start_ray(num_cpus=2, num_gpus=2, object_store_memory=100 * 1024 * 1024)
    try:
        hook = EmulatedGPU(str(log), os.path.dirname(__file__))
        with Cluster(device="gpu", backend="cuda", on_shard=hook, speculate=False, idle_timeout=None) as cl:
            yield cl, log
    finally:
        ray.shutdown()


def copies(log) -> dict:
    """Host copies so far, per worker process."""
    if not log.exists():
        return {}
    pids = log.read_text().split()
    return {pid: pids.count(pid) for pid in set(pids)}


@pytest.mark.parametrize("reduction", ["Sum"])     # (the K-best merge: test_collect_... below, without Ray)
def test_states_merged_on_the_device_one_copy_per_worker(gpus, reduction):
    cluster, log = gpus
    rng = np.random.default_rng(7)
    x, y, b = rng.random((600, 3)), rng.random((500, 3)), rng.random((500, 1))
    if reduction == "Sum":
        plan = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1).plan
        args = [x, y, b]
        want = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
    else:
        plan = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="ArgKMin", axis=1, opt_arg=3).plan
        args = [x, y]
        want = np.argsort(((x[:, None] - y[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :3]
    before = copies(log)
    job = cluster.submit_plan(plan, args, split=(4, 3))          # 12 shards, 3 column parts per row block
    got = job.result(300)
    if reduction == "Sum":
        np.testing.assert_allclose(got, want, rtol=1e-10)
    else:
        np.testing.assert_array_equal(got, want)
    after = copies(log)
    new = {pid: after[pid] - before.get(pid, 0) for pid in after if after[pid] > before.get(pid, 0)}
    assert sum(job.shards_by_node.values()) == 12
    assert sorted(new.values()) == [1] * len(new) and len(new) == len(job.transfers), (new, job.transfers)
    assert set(job.transfers.values()) == {1}                    # one copy per worker that computed shards


class DeviceArray(np.ndarray):
    """numpy arrays that refuse what CuPy's module refuses: `lexsort` along an axis (the K-best merges use it)."""

    def __array_function__(self, func, types, args, kwargs):
        if func is np.lexsort and "axis" in kwargs:
            raise TypeError("lexsort() got an unexpected keyword argument 'axis'")
        return super().__array_function__(func, types, args, kwargs)


@pytest.mark.parametrize("reduction, merged_on_device", [("Sum", True), ("ArgKMin", False)])
def test_collect_copies_once_and_merges_what_the_device_cannot_on_the_host(monkeypatch, reduction,
                                                                          merged_on_device):
    from types import SimpleNamespace

    from kred.engine.backends import get_backend
    from kred.engine.cluster.blocks import shift_indices
    from kred.engine.cluster.sharding import make_shards
    from kred.engine.cluster.workers import ShardWorker
    copied = []
    fake = SimpleNamespace(concatenate=np.concatenate, ascontiguousarray=np.ascontiguousarray, uint8=np.uint8,
                           asnumpy=lambda a: copied.append(a) or np.asarray(a))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 2)), rng.random((30, 2))
    if reduction == "Sum":
        plan = Genred("Exp(-SqDist(x, y))", ["x = Vi(2)", "y = Vj(2)"], axis=1).plan
        want = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdims=True)
    else:
        plan = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="ArgKMin", axis=1, opt_arg=3).plan
        want = np.argsort(((x[:, None] - y[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :3]
    shards = make_shards(40, 30, (2, 3))
    worker = ShardWorker("reference")
    merges, merge = [], plan.reduction.merge

    def recorded(a, b):                  # the array type of each merge that succeeded
        out = merge(a, b)
        merges.append(type(out[0]))
        return out

    monkeypatch.setattr(plan.reduction, "merge", recorded)
    for shard in shards:
        (r0, r1), ((c0, c1),) = shard.rows, shard.cols
        state = get_backend("reference").partial(plan, [x[r0:r1], y[c0:c1]], (0, r1 - r0), (0, c1 - c0))
        device = tuple(part.view(DeviceArray) for part in shift_indices(plan, state, c0))
        worker.held.setdefault("job", {})[shard.index] = (shard, [device])
    out = worker.collect("job", plan, [s.index for s in shards])
    assert len(copied) == 1 and worker.held == {}                  # one copy, nothing left on the "device"
    assert [(block, parts) for block, parts, _ in out] == [(0, (0, 1, 2)), (1, (0, 1, 2))]
    got = plan.reduction.finalize(tuple(np.concatenate(p) for p in zip(*(state for _, _, state in out))),
                                  np.float64)
    if reduction == "Sum":
        np.testing.assert_allclose(got, want, rtol=1e-12)
    else:
        np.testing.assert_array_equal(got, want)
    assert (DeviceArray in merges) == merged_on_device != (np.ndarray in merges)    # on the device, or the host
