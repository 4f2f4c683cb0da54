"""engine.cluster on one real local Ray (4 logical GPUs, no real one): sharded results against dense numpy and the
single-process engine, lost workers, cancellation, user errors, placement, batch job files.

One Ray instance serves the whole module; each test that needs special workers (hooks, GPUs) starts its own
Cluster on it and closes it.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest

import ray  # noqa: E402

import kred.engine as engine  # noqa: E402
from kred.engine.cluster import Cluster, JobFileError, choose_split, make_shards, run_job_file  # noqa: E402
from kred.engine.errors import ArgumentError, BackendError, FormulaError  # noqa: E402
from kred.engine.numpy import Genred  # noqa: E402
from kred.engine.reductions import REDUCTIONS  # noqa: E402
from conftest import start_ray  # noqa: E402
from test_reductions import K, assert_close, dense, genred  # noqa: E402  (the dense oracles)

# Hooks below run inside the workers: ship this module's code by value, workers cannot import test files.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GAUSS = "Exp(-SqDist(x, y)) * b"
GAUSS_ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    # 6 logical CPUs on a 2-core machine: the module's shared Cluster and each test's own one fit side by side
    # (the work per shard is tiny). 4 logical GPUs and 2 units of a custom resource test placement.
    start_ray(num_cpus=6, num_gpus=4, resources={"accel": 2}, object_store_memory=200 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_instance):
    with Cluster(device="cpu", workers=2, threads=1) as cl:
        yield cl


def gaussian_data(n=300, m=400, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3)).astype(dtype), rng.random((m, 3)).astype(dtype), rng.random((m, 2)).astype(dtype))


def dense_gaussian(x, y, b):
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2) @ b.astype(np.float64)


# Sharding --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, m, split", [(10, 7, (3, 2)), (5, 100, (1, 8)), (1, 1, (4, 4)), (0, 5, (2, 2)),
                                         (6, 0, (2, 3))])
def test_shards_cover_the_grid_once(n, m, split):
    cover = np.zeros((n, m), int)
    for shard in make_shards(n, m, split):
        r0, r1 = shard.rows
        for c0, c1 in shard.cols:
            cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()


def test_split_prefers_rows_and_splits_columns_when_rows_are_few():
    assert choose_split(100_000, 100_000, workers=4, shards_per_worker=4) == (16, 1)
    rows, cols = choose_split(300, 1_000_000, workers=4, shards_per_worker=4)
    assert rows == 1 and cols == 16                 # too few rows for 16 row blocks: M is split instead
    assert choose_split(100, 100, workers=8) == (1, 1)          # too small to be worth cutting
    with pytest.raises(ArgumentError, match="split"):
        make_shards(10, 10, (0, 1))


def test_worker_layout_over_nodes():
    from kred.engine.cluster.workers import layout
    a, b, c = ("a" * 56, "b" * 56, "c" * 56)                  # node ids are hex strings
    nodes = [{"NodeID": a, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 8.0}},
             {"NodeID": c, "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    gpus = layout(nodes)                                    # auto: a live node has GPUs
    assert [(s.options["num_gpus"], s.options["num_cpus"], s.options["scheduling_strategy"].node_id)
            for s in gpus] == [(1, 0, a), (1, 0, a)]
    per_node = layout(nodes, device="cpu")
    assert [(s.threads, s.options["num_cpus"], s.options["scheduling_strategy"].node_id) for s in per_node] == \
        [(4, 4, a), (8, 8, b)]
    assert [s.threads for s in layout(nodes, device="cpu", threads=2)] == [2] * 6
    counted = layout(nodes, device="cpu", workers=3)
    assert [(s.threads, s.options["scheduling_strategy"]) for s in counted] == [(4, "SPREAD")] * 3
    small = [{"NodeID": k * 56, "Alive": True, "Resources": {"CPU": 1.0}} for k in "de"]
    assert [s.threads for s in layout(small, device="cpu", workers=1)] == [1]     # fits on one node, not 2 CPUs
    with pytest.raises(BackendError, match="no node of the Ray cluster has a 'accel' resource"):
        layout(nodes, device="gpu", resource="accel")
    with pytest.raises(BackendError, match="device must be"):
        layout(nodes, device="tpu")


# Results ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_every_reduction_sharded_over_i_and_j(cluster, name, axis):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((23, 2)), rng.standard_normal((31, 2))
    op = genred(name, axis)
    single = op(x, y, backend="reference")
    want = dense(name, x, y, axis)
    for split in [(4, 1), (1, 5), (3, 4)]:
        got = cluster.run_plan(op.plan, [x, y], split=split)
        assert_close(got, want, np.float64)
        for g, s in zip(got if isinstance(got, tuple) else (got,), single if isinstance(single, tuple) else (single,)):
            np.testing.assert_allclose(g, s, rtol=1e-12, atol=1e-12)     # same engine, another merge order


def test_float32_gaussian_through_genred_and_engine_run(cluster):
    x, y, b = gaussian_data(dtype=np.float32)
    want = dense_gaussian(x, y, b)
    op = Genred(GAUSS, GAUSS_ALIASES, axis=1)
    got = op(x, y, b, backend="cluster", cluster=cluster)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    out = np.empty_like(got)
    assert op(x, y, b, cluster=cluster, out=out) is out           # cluster= alone routes too
    np.testing.assert_array_equal(out, got)
    a = cluster.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1, split=(2, 3), progress=True)
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_timing(cluster):
    """Column states are merged in a fixed order: two runs of one split agree bit for bit."""
    x, y, b = gaussian_data()
    runs = [cluster.run_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b], split=(3, 5)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_empty_reduction_axis(cluster):
    x, y = np.ones((4, 2)), np.ones((0, 2))
    got = cluster.run_plan(genred("Sum", 1).plan, [x, y], split=(2, 2))
    np.testing.assert_array_equal(got, np.zeros((4, 2)))


def test_results_are_writeable_arrays_of_their_own(cluster):
    x, y, b = gaussian_data()
    got = cluster.run_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b], split=(1, 1))
    assert got.flags.writeable
    got += 1.0


def test_default_cluster_behind_backend_cluster(ray_instance, monkeypatch):
    from kred.engine.cluster import cluster as module
    # the default layout here is one worker per logical GPU: have them compute on the CPU
    monkeypatch.setattr(module, "Cluster", functools.partial(Cluster, backend="reference"))
    x, y, b = gaussian_data(50, 60)
    try:
        got = engine.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1, backend="cluster")
        assert module._default is not None and module._default.workers
    finally:
        if module._default is not None:
            module._default.close()
    np.testing.assert_allclose(got, dense_gaussian(x, y, b), rtol=1e-12)


EMBEDDED = """
import numpy as np, ray
from kred.engine.cluster import Cluster
x = np.arange(12.0).reshape(4, 3)
with Cluster(device="cpu", workers=1, threads=1, ray_options={"num_cpus": 1}) as cl:
    pid = cl.workers[0]["pid"]
    nice = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])
    a = cl.reduce("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], x, x, axis=1)
assert not ray.is_initialized(), "the Cluster started Ray, so closing it stops Ray"
assert nice == 0, nice
assert np.allclose(a[:, 0], ((x[:, None] - x[None]) ** 2).sum(-1).sum(1)), a
"""


def test_embedded_cluster_starts_and_stops_its_own_ray():
    """Cluster() with no Ray running starts one (workers at normal priority, not Ray's nice 15) and stops it."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    subprocess.run([sys.executable, "-c", EMBEDDED], check=True, cwd=Path(__file__).parents[1], env=env,
                   timeout=240)


KILLED = """
import os, time, numpy as np
from kred.engine.cluster import Cluster
from kred.engine.cluster.reaper import descendants
cl = Cluster("local", device="cpu", workers=1, threads=1,
             ray_options={"num_cpus": 1, "object_store_memory": 80 * 2**20})
x = np.arange(12.0).reshape(4, 3)
cl.reduce("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], x, x, axis=1)
print(" ".join(map(str, descendants(os.getpid()))), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"        # a zombie is gone, only not yet reaped
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the watcher reads /proc (Linux)")
def test_no_ray_process_outlives_its_killed_owner():
    """SIGKILL of a process whose Cluster started Ray: Ray's agents (which outlive it on their own) are stopped."""
    owner = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1], env={**os.environ, "RAY_ADDRESS": ""})
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) >= 3                       # gcs, raylet, agents, the worker (and the watcher's kin)
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not any(alive(p) for p in pids), timeout=30)


def test_import_engine_does_not_import_ray():
    code = "import sys, kred.engine, kred.numpy; sys.exit('ray' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# Hooks run in the workers before each shard ----------------------------------------------------------------

class Log:
    """Appends `pid shard` to a file for each shard a worker starts."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self, shard):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {shard.index}\n")

    def lines(self):
        return [tuple(map(int, line.split())) for line in Path(self.path).read_text().splitlines()]


class Slow(Log):
    def __init__(self, path, seconds, only_pid_file=None):
        super().__init__(path)
        self.seconds, self.only_pid_file = seconds, only_pid_file and str(only_pid_file)

    def __call__(self, shard):
        super().__call__(shard)
        if self.only_pid_file is None or Path(self.only_pid_file).read_text() == str(os.getpid()):
            time.sleep(self.seconds)


class ExitOnce(Log):
    """The first worker to reach shard `index` dies on the spot (as a crash or an OOM kill would)."""

    def __init__(self, path, index, marker):
        super().__init__(path)
        self.index, self.marker = index, str(marker)

    def __call__(self, shard):
        super().__call__(shard)
        if shard.index == self.index and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


class FailOn(Log):
    def __init__(self, path, index):
        super().__init__(path)
        self.index = index

    def __call__(self, shard):
        super().__call__(shard)
        if shard.index == self.index:
            raise FormulaError("the formula is wrong in shard %d" % shard.index)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# Faults ----------------------------------------------------------------------------------------------------

def test_worker_exiting_mid_shard_is_retried_exactly(ray_instance, tmp_path):
    x, y, b = gaussian_data()
    plan = Genred(GAUSS, GAUSS_ALIASES, axis=1).plan
    hook = ExitOnce(tmp_path / "log", index=3, marker=tmp_path / "exited")
    # speculate=False: no straggler copy may finish shard 3 first, the lost shard itself must be re-run
    with Cluster(device="cpu", workers=2, threads=1, on_shard=hook, speculate=False) as cl:
        job = cl.submit_plan(plan, [x, y, b], split=(4, 2))
        got = job.result(60)
        assert (tmp_path / "exited").exists() and job.retries >= 1 and cl.pool.replaced == 1
        assert sum(1 for _, index in hook.lines() if index == 3) == 2          # died once, ran again once
        np.testing.assert_array_equal(got, cl.run_plan(plan, [x, y, b], split=(4, 2)))   # bit-exact
    np.testing.assert_allclose(got, dense_gaussian(x, y, b), rtol=1e-12)


def test_worker_killed_mid_job_gives_the_exact_result(ray_instance, tmp_path):
    x, y, b = gaussian_data()
    plan = Genred(GAUSS, GAUSS_ALIASES, axis=1).plan
    with Cluster(device="cpu", workers=2, threads=1, on_shard=Slow(tmp_path / "log", 0.1), speculate=False) as cl:
        want = cl.run_plan(plan, [x, y, b], split=(6, 2))
        job = cl.submit_plan(plan, [x, y, b], split=(6, 2))
        wait_for(lambda: job.progress().done >= 2)
        victim = cl.pool.live[0]
        ray.kill(victim.handle)
        got = job.result(60)
        assert job.progress() == (12, 12) and job.retries >= 1 and cl.pool.replaced >= 1
        np.testing.assert_array_equal(got, want)


def test_shards_of_a_slow_worker_are_taken_over(ray_instance, tmp_path):
    """A worker stuck for a minute on its shards does not hold the job: idle workers take copies."""
    x, y, b = gaussian_data()
    pid_file = tmp_path / "slow_pid"
    pid_file.write_text("none")
    hook = Slow(tmp_path / "log", 60, only_pid_file=pid_file)
    with Cluster(device="cpu", workers=2, threads=1, on_shard=hook) as cl:
        pid_file.write_text(str(cl.workers[0]["pid"]))
        job = cl.submit_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b], split=(8, 1))
        got = job.result(30)          # the slow worker alone would need two minutes
        assert job.duplicates >= 1
    np.testing.assert_allclose(got, dense_gaussian(x, y, b), rtol=1e-12)


def test_user_error_fails_the_job_once_without_retry(ray_instance, tmp_path):
    x, y, b = gaussian_data()
    hook = FailOn(tmp_path / "log", index=2)
    # speculate=False: an idle worker's straggler copy of shard 2 (started before the first copy's error came back)
    # would run it a second time; that is speculation, not a retry, and is not what this test is about
    with Cluster(device="cpu", workers=2, threads=1, on_shard=hook, speculate=False) as cl:
        job = cl.submit_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b], split=(6, 1))
        with pytest.raises(FormulaError, match="the formula is wrong in shard 2"):
            job.result(60)
        assert job.status == "failed" and job.lost == 0 and job.retries == 0 and cl.pool.replaced == 0
        assert sum(1 for _, index in hook.lines() if index == 2) == 1
        # the workers are still fine for the next job
        np.testing.assert_allclose(cl.run_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b]),
                                   dense_gaussian(x, y, b), rtol=1e-12)


def test_errors_found_before_dispatch_and_in_workers(cluster, ray_instance):
    x, y, b = gaussian_data()
    with pytest.raises(ArgumentError, match="b has 3 rows but y has 400"):
        cluster.submit(GAUSS, GAUSS_ALIASES, x, y, b[:3], axis=1)
    with pytest.raises(FormulaError):
        cluster.submit("Exp(-SqDist(x, y) * b", GAUSS_ALIASES, x, y, b, axis=1)
    with Cluster(device="cpu", workers=1, threads=1, backend="no-such-backend") as cl:
        with pytest.raises(BackendError, match="unknown backend 'no-such-backend'"):
            cl.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1, timeout=60)


def test_cancel_stops_outstanding_shards(ray_instance, tmp_path):
    x, y, b = gaussian_data()
    hook = Slow(tmp_path / "log", 0.2)
    with Cluster(device="cpu", workers=2, threads=1, on_shard=hook) as cl:
        job = cl.submit_plan(Genred(GAUSS, GAUSS_ALIASES, axis=1).plan, [x, y, b], split=(30, 1))
        with pytest.raises(TimeoutError):
            job.result(timeout=0.01)
        wait_for(lambda: job.progress().done >= 1)
        assert job.cancel() and job.status == "cancelled" and job.cancelled()
        with pytest.raises(CancelledError):
            job.result()
        started = len(hook.lines())
        time.sleep(0.5)
        assert len(hook.lines()) <= started + 2          # nothing new is dispatched (two may have been queued)
        assert started < 30 and job.progress().done < 30
        finished = cl.submit(GAUSS, GAUSS_ALIASES, x, y, b, axis=1)          # the workers are still fine
        np.testing.assert_allclose(finished.result(60), dense_gaussian(x, y, b), rtol=1e-12)
        assert not finished.cancel() and finished.status == "done"


def test_torch_genred_and_its_gradients_run_on_the_cluster(ray_instance, tmp_path):
    import torch

    from kred.engine.torch import Genred as TorchGenred
    x, y, b = (torch.tensor(a, requires_grad=True) for a in gaussian_data(40, 50))
    hook = Log(tmp_path / "log")
    # the reference backend: the point is the routing of every gradient reduction, not compiling each of them
    with Cluster(device="cpu", workers=1, threads=1, backend="reference", min_shard_pairs=1, on_shard=hook) as cl:
        a = TorchGenred(GAUSS, GAUSS_ALIASES, axis=1)(x, y, b, cluster=cl)
        forward_shards = len(hook.lines())
        w = torch.linspace(-1, 1, a.numel(), dtype=a.dtype).reshape(a.shape)
        grads = torch.autograd.grad((a * w).sum(), [x, y, b], create_graph=True)
        backward_shards = len(hook.lines()) - forward_shards
        second = torch.autograd.grad(grads[0].pow(2).sum(), [y])[0]
    assert forward_shards >= 1 and backward_shards >= 3          # one gradient reduction per input, at least
    xd, yd, bd = (t.detach().clone().requires_grad_() for t in (x, y, b))
    ad = torch.exp(-((xd[:, None, :] - yd[None, :, :]) ** 2).sum(-1)) @ bd            # dense torch autograd
    torch.testing.assert_close(a, ad, rtol=1e-12, atol=1e-12)
    dense_grads = torch.autograd.grad((ad * w).sum(), [xd, yd, bd], create_graph=True)
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, torch.autograd.grad(dense_grads[0].pow(2).sum(), [yd])[0],
                               rtol=1e-10, atol=1e-12)


def test_closing_the_cluster_fails_its_running_jobs(ray_instance, tmp_path):
    x, y, b = gaussian_data()
    cl = Cluster(device="cpu", workers=1, threads=1, on_shard=Slow(tmp_path / "log", 0.2))
    job = cl.submit(GAUSS, GAUSS_ALIASES, x, y, b, axis=1, split=(20, 1))
    wait_for(lambda: job.progress().done >= 1)
    cl.close()
    with pytest.raises(BackendError, match="the Cluster was closed"):
        job.result(30)
    with pytest.raises(BackendError, match="this Cluster is closed"):
        cl.submit(GAUSS, GAUSS_ALIASES, x, y, b, axis=1)


# Placement -------------------------------------------------------------------------------------------------

def test_four_logical_gpus_give_four_actors(ray_instance, tmp_path):
    hook = Log(tmp_path / "log")
    x, y, b = gaussian_data()
    # auto: the node has GPUs. They are logical (there may be fewer real ones), so the workers compute on the CPU.
    with Cluster(device="auto", backend="reference", min_shard_pairs=1, on_shard=hook) as cl:
        workers = cl.workers
        assert len(workers) == 4
        assert sorted(w["cuda_visible_devices"] for w in workers) == ["0", "1", "2", "3"]
        assert sorted(g for w in workers for g in w["gpu_ids"]) == ["0", "1", "2", "3"]
        job = cl.submit(GAUSS, GAUSS_ALIASES, x, y, b, axis=1)
        got = job.result(60)
        assert len(job.shards) == 16                       # 4 shards per device
    assert len({pid for pid, _ in hook.lines()}) >= 2
    np.testing.assert_allclose(got, dense_gaussian(x, y, b), rtol=1e-12)


def test_custom_resource_workers(ray_instance):
    with Cluster(device="gpu", resource="accel", backend="reference") as cl:
        assert len(cl.workers) == 2 and all(w["gpu_ids"] == [] for w in cl.workers)
        x, y, b = gaussian_data(40, 50)
        np.testing.assert_allclose(cl.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1), dense_gaussian(x, y, b),
                                   rtol=1e-12)


def test_unplaceable_workers_fail_clearly(ray_instance):
    with pytest.raises(BackendError, match="did not start"):
        Cluster(device="cpu", workers=1, threads=64, start_timeout=2)
    with pytest.raises(BackendError, match="no node of the Ray cluster has a 'tpu' resource"):
        Cluster(device="gpu", resource="tpu")


# Batch job files -------------------------------------------------------------------------------------------

def write_job(folder: Path, **overrides) -> Path:
    import yaml
    x, y, b = gaussian_data(30, 40, dtype=np.float32)
    np.save(folder / "x.npy", x)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"u": y[:, 0], "v": y[:, 1], "w": y[:, 2], "extra": np.zeros(40, np.float32)}),
                   folder / "y.parquet")
    with pa.OSFile(str(folder / "b.arrow"), "wb") as sink:
        table = pa.table({"b": pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), 2)})
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    job = {"formula": "Exp(-SqDist(x, y) * s) * b", "aliases": GAUSS_ALIASES + ["s = Pm(1)"],
           "inputs": {"x": "x.npy", "y": {"path": "y.parquet", "columns": ["u", "v", "w"]}, "b": "b.arrow",
                      "s": [1.0]},
           "reduction": "Sum", "axis": 1, "output": "out/a.npy",
           "cluster": {"device": "cpu", "workers": 1, "threads": 1}}
    job.update(overrides)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, (x, y, b)


def test_job_file_runs_and_writes_npy(ray_instance, tmp_path):
    path, (x, y, b) = write_job(tmp_path)
    out = run_job_file(path, progress=False)
    assert out == tmp_path / "out" / "a.npy"
    got = np.load(out)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, dense_gaussian(x, y, b), rtol=1e-5, atol=1e-6)


def test_job_file_values_and_indices_to_parquet_and_arrow(ray_instance, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for output in ("a.parquet", "a.arrow"):
        path, (x, y, b) = write_job(tmp_path, formula="SqDist(x, y)", reduction="KMin_ArgKMin", opt_arg=K,
                                    output=output, inputs={"x": "x.npy", "y": {"path": "y.parquet",
                                                                                "columns": ["u", "v", "w"]}},
                                    aliases=["x = Vi(3)", "y = Vj(3)"])
        out = run_job_file(path, progress=False)
        table = pq.read_table(out) if output.endswith("parquet") else pa.ipc.open_file(str(out)).read_all()
        d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
        order = np.argsort(d2, axis=1, kind="stable")[:, :K]
        assert table.column_names == [f"value_{k}" for k in range(K)] + [f"index_{k}" for k in range(K)]
        values = np.column_stack([table.column(f"value_{k}").to_numpy() for k in range(K)])
        index = np.column_stack([table.column(f"index_{k}").to_numpy() for k in range(K)])
        np.testing.assert_array_equal(index, order)
        np.testing.assert_allclose(values, np.take_along_axis(d2, order, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"inputs": {"x": "x.npy"}}, "no input for b, s, y"),
    ({"inputs": {"x": "x.npy", "y": "y.parquet", "b": "b.arrow", "s": [1.0], "z": "x.npy"}}, "z are not in"),
    ({"axis": 2}, "axis"),
    ({"reduction": "KMin_ArgKMin", "opt_arg": 2}, "which one .npy cannot hold"),
    ({"output": "a.csv"}, "must end in"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"formula": "Exp(-SqDist(x, y) * s * b"}, "was never closed"),
])
def test_job_file_errors_are_found_before_running(tmp_path, overrides, message):
    path, _ = write_job(tmp_path, **overrides)
    error = FormulaError if "formula" in overrides else JobFileError
    with pytest.raises(error, match=message):
        run_job_file(path, progress=False)


def test_job_file_bad_inputs(tmp_path, ray_instance):
    path, _ = write_job(tmp_path, inputs={"x": "x.npy", "y": {"path": "y.parquet", "columns": ["u", "nope"]},
                                          "b": "b.arrow", "s": [1.0]})
    with pytest.raises(JobFileError, match="no column nope"):
        run_job_file(path, progress=False)
    path, _ = write_job(tmp_path, inputs={"x": "missing.npy", "y": "y.parquet", "b": "b.arrow", "s": [1.0]})
    with pytest.raises(JobFileError, match="cannot read"):
        run_job_file(path, progress=False)
    path, _ = write_job(tmp_path, inputs={"x": "x.npy", "y": "y.parquet", "b": "b.arrow", "s": [1.0]})
    with pytest.raises(ArgumentError, match=r"y = Vj\(1, 3\): expected shape \(M, 3\), got \(40, 4\)"):
        run_job_file(path, progress=False)         # all four columns of y.parquet


# Block-sparse ranges: one shard per row cluster with its column ranges ---------------------------------------

@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", ["Sum", "ArgKMin", "LogSumExp"])
def test_ranges_on_the_cluster_equal_dense_restricted_to_kept_blocks(cluster, name, axis):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((23, 2)), rng.standard_normal((31, 2))
    n, m = (23, 31) if axis == 1 else (31, 23)          # rows and columns as the plan reduces them
    # row clusters [0,5) [5,12) [15,n) (the gap reduces over nothing), column ranges overlapping and out of order
    clusters = np.array([[0, 5], [5, 12], [15, n]])
    reduced = np.array([[m - 6, m], [0, 4], [2, 9], [4, 4], [0, m]])
    slices = np.array([3, 3, 5])                        # cluster [5,12) visits no column
    zero = (np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    ranges = (clusters, slices, reduced) + zero if axis == 1 else zero + (clusters, slices, reduced)
    mask = np.zeros((n, m))                              # how often each pair is visited (overlaps count twice)
    for (r0, r1), begin, end in zip(clusters, [0, *slices[:-1]], slices):
        for c0, c1 in reduced[begin:end]:
            mask[r0:r1, c0:c1] += 1
    op = genred(name, axis)
    got = engine.run(op.plan, [x, y], cluster=cluster, ranges=ranges)
    want = op(x, y, backend="reference", ranges=ranges)           # the engine's own block-sparse path
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    if name == "Sum":                                  # and the dense sum restricted to the kept pairs
        f = x[:, None, :] * y[None, :, :] - np.sin(y[None, :, :])          # the formula of genred("Sum", ...)
        f = f if axis == 1 else f.transpose(1, 0, 2)
        np.testing.assert_allclose(got, (f * mask[..., None]).sum(1), rtol=1e-12, atol=1e-12)
