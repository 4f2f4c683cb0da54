"""Out-of-core jobs on one real local Ray: row-side inputs are Parquet datasets the workers read row group by row
group, the output is a Parquet dataset they write, a cancelled job resumes without recomputing its written blocks,
and the driver's memory stays far below the input's size. Results are checked against dense numpy, chunk by chunk.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from conftest import start_ray
from kred.engine.cluster import Cluster, Dataset, DatasetError
from kred.engine.numpy import Genred

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the hooks run in the workers

GAUSS, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def ray_up():
    # 3 logical CPUs: the module's 2-worker Cluster and a test's own 1-worker one fit side by side
    start_ray(num_cpus=3, object_store_memory=100 * MB)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_up):
    with Cluster(device="cpu", workers=2, threads=1, idle_timeout=None, cache_bytes=1 * MB) as cl:
        yield cl


def points(n, seed):
    return np.random.default_rng(seed).random((n, 3), dtype=np.float32)


def write_points(folder, n, files=2, row_group=10_000, seed=0):
    """x as a Parquet dataset of `files` files (columns u, v, w), written chunk by chunk; returns nothing whole."""
    os.makedirs(folder, exist_ok=True)
    per_file = -(-n // files)
    for f in range(files):
        chunk = points(min(per_file, n - f * per_file), seed + f)
        table = pa.table({"u": chunk[:, 0], "v": chunk[:, 1], "w": chunk[:, 2]})
        pq.write_table(table, os.path.join(folder, f"x-{f}.parquet"), row_group_size=row_group)


def read_x(folder, files=2, n=None):
    return np.concatenate([np.column_stack([pq.read_table(os.path.join(folder, f"x-{f}.parquet")).column(c)
                                            .to_numpy() for c in "uvw"]) for f in range(files)])


def read_output(folder):
    parts = sorted(p for p in os.listdir(folder) if p.startswith("part-"))
    return np.concatenate([pq.read_table(os.path.join(folder, p)).column("value_0").to_numpy() for p in parts])


def dense(x, y, b):
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    return (np.exp(-d2) @ b.astype(np.float64))[:, 0]


@contextlib.contextmanager
def rss_growth():
    """This process's peak RSS growth while the block runs, sampled every 10 ms (a one-item list, filled in)."""
    me, peak, stop = psutil.Process(), [0], threading.Event()
    base = me.memory_info().rss

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss - base)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()


def test_dataset_in_dataset_out(cluster, tmp_path):
    write_points(tmp_path / "x", 30_000, row_group=4_000)
    y, b = points(40, 9), points(40, 10)[:, :1]
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    job = cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x")), y, b], str(tmp_path / "out") + "/")
    assert job.result(120) == str(tmp_path / "out") + "/"
    assert len(job.shards) == 8                      # one per row group: 4 + 4 over two files of 15,000 rows
    got = read_output(tmp_path / "out")
    np.testing.assert_allclose(got, dense(read_x(tmp_path / "x"), y, b), rtol=1e-5)
    # a glob and a file:// URI name the same dataset
    job = cluster.submit_dataset(plan, [Dataset(f"file://{tmp_path}/x/x-*.parquet"), y, b], str(tmp_path / "o2"))
    job.result(120)
    np.testing.assert_array_equal(read_output(tmp_path / "o2"), got)


def test_dataset_errors_name_what_is_wrong(cluster, tmp_path):
    write_points(tmp_path / "x", 100, files=1)
    y, b = points(5, 1), points(5, 2)[:, :1]
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    with pytest.raises(DatasetError, match="does not exist"):
        cluster.submit_dataset(plan, [Dataset(str(tmp_path / "nope")), y, b], str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="has 2 components per row, the alias says 3"):
        cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x"), ("u", "v")), y, b], str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="give it as a Dataset"):
        cluster.submit_dataset(plan, [points(3, 0), y, b], str(tmp_path / "o"))
    cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x")), y, b], str(tmp_path / "o")).result(60)
    with pytest.raises(DatasetError, match="output of another job"):
        cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x")), y * 2, b], str(tmp_path / "o"))


class Record:
    """Appends each shard's block to a file, then sleeps (so that a job can be stopped half-way)."""

    def __init__(self, path, seconds):
        self.path, self.seconds = str(path), seconds

    def __call__(self, shard):
        with open(self.path, "a") as f:
            f.write(f"{shard.block}\n")
        time.sleep(self.seconds)


def test_a_stopped_job_resumes_without_recomputing_written_blocks(ray_up, tmp_path):
    write_points(tmp_path / "x", 20_000, files=1, row_group=1_000)
    y, b = points(30, 3), points(30, 4)[:, :1]
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    inputs, out = [Dataset(str(tmp_path / "x")), y, b], str(tmp_path / "out")
    with Cluster(device="cpu", workers=1, threads=1, idle_timeout=None, on_shard=Record(tmp_path / "a", 0.2)) as cl:
        job = cl.submit_dataset(plan, inputs, out)
        deadline = time.monotonic() + 60
        while len([p for p in os.listdir(out) if p.startswith("part-")]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert job.cancel()
    written = {int(p[5:11]) for p in os.listdir(out) if p.startswith("part-")}
    assert 3 <= len(written) < 20
    with Cluster(device="cpu", workers=1, threads=1, idle_timeout=None, on_shard=Record(tmp_path / "b", 0)) as cl:
        job = cl.submit_dataset(plan, inputs, out)
        job.result(120)
        assert job.skipped == sorted(written)
    rerun = {int(line) for line in (tmp_path / "b").read_text().split()}
    assert rerun == set(range(20)) - written                 # only the missing blocks were computed
    np.testing.assert_allclose(read_output(out), dense(read_x(tmp_path / "x", files=1), y, b), rtol=1e-5)


def test_input_much_larger_than_a_workers_cache_with_bounded_driver_memory(cluster, tmp_path):
    n = 3_000_000                                   # 36 MB of float32 points; workers cache 1 MB of blocks
    write_points(tmp_path / "x", n, files=3, row_group=100_000)
    y, b = points(8, 5), points(8, 6)[:, :1]
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    with rss_growth() as peak:
        job = cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x")), y, b], str(tmp_path / "out"))
        job.result(300)
    assert peak[0] < 12 * MB, peak[0]                # the input is 36 MB, the output 12 MB: neither was held
    assert max(job.bytes_fetched.values()) < 36 * MB
    for f in range(3):                               # checked file by file, against dense numpy
        part = read_output(tmp_path / "out")[f * n // 3:(f + 1) * n // 3]
        x = np.column_stack([pq.read_table(tmp_path / "x" / f"x-{f}.parquet").column(c).to_numpy() for c in "uvw"])
        np.testing.assert_allclose(part, dense(x, y, b), rtol=1e-5)


def test_job_file_with_dataset_input_and_output(ray_up, tmp_path):
    import yaml

    from kred.engine.cluster import run_job_file
    write_points(tmp_path / "x", 5_000, row_group=1_000)
    y, b = points(20, 7), points(20, 8)[:, :1]
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "b.npy", b)
    job = {"formula": "Exp(-SqDist(x, y) * s) * b", "aliases": ALIASES + ["s = Pm(1)"],       # s: inline, float32
           "inputs": {"x": {"path": "x/", "columns": ["u", "v", "w"]}, "y": "y.npy", "b": "b.npy", "s": [1.0]},
           "axis": 1, "output": "out/", "cluster": {"device": "cpu", "workers": 1, "threads": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = run_job_file(tmp_path / "job.yaml", progress=False)
    assert out == f"{tmp_path}/out/"
    np.testing.assert_allclose(read_output(tmp_path / "out"), dense(read_x(tmp_path / "x"), y, b), rtol=1e-5)
    # the same dataset read whole, into one output file
    job["output"] = "a.npy"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    got = np.load(run_job_file(tmp_path / "job.yaml", progress=False))[:, 0]
    np.testing.assert_allclose(got, read_output(tmp_path / "out"), rtol=1e-6)


def write_columns(folder, m, row_group, seed):
    """y (columns u, v, w) and b (column b) in one Parquet dataset of 3 files, written chunk by chunk."""
    os.makedirs(folder, exist_ok=True)
    for f in range(3):
        chunk = points(m // 3, seed + f)
        table = pa.table({"u": chunk[:, 0], "v": chunk[:, 1], "w": chunk[:, 2], "b": chunk[:, 0] * chunk[:, 1]})
        pq.write_table(table, os.path.join(folder, f"y-{f}.parquet"), row_group_size=row_group)


def read_columns(folder):
    tables = [pq.read_table(os.path.join(folder, f"y-{f}.parquet")) for f in range(3)]
    y = np.concatenate([np.column_stack([t.column(c).to_numpy() for c in "uvw"]) for t in tables])
    return y, np.concatenate([t.column("b").to_numpy() for t in tables])[:, None]


def test_column_side_datasets_are_read_by_the_workers_block_by_block(cluster, tmp_path):
    m = 3_000_000                   # y and b: 48 MB of float32, read by the workers 200,000 rows at a time
    write_points(tmp_path / "x", 200, files=1, row_group=100)
    write_columns(tmp_path / "y", m, row_group=200_000, seed=20)
    plan = Genred(GAUSS, ALIASES, axis=1).plan
    inputs = [Dataset(str(tmp_path / "x")), Dataset(str(tmp_path / "y"), ("u", "v", "w")),
              Dataset(str(tmp_path / "y"), ("b",))]
    with rss_growth() as peak:
        job = cluster.submit_dataset(plan, inputs, str(tmp_path / "out"))
        job.result(300)
    assert peak[0] < 12 * MB, peak[0]                # y and b are 48 MB: the driver held neither
    assert len(job.shards) == 2 and len(job.shards[0].cols) == 15          # 15 row groups of y: column blocks
    x, (y, b) = read_x(tmp_path / "x", files=1), read_columns(tmp_path / "y")
    want = sum(dense(x, y[c:c + 250_000], b[c:c + 250_000]) for c in range(0, m, 250_000))
    np.testing.assert_allclose(read_output(tmp_path / "out"), want, rtol=1e-4)


def test_column_blocks_give_global_indices(cluster, tmp_path):
    write_points(tmp_path / "x", 300, files=1, row_group=100)
    write_columns(tmp_path / "y", 3_000, row_group=250, seed=30)       # 12 column blocks
    plan = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="ArgKMin", axis=1, opt_arg=3).plan
    job = cluster.submit_dataset(plan, [Dataset(str(tmp_path / "x")), Dataset(str(tmp_path / "y"), ("u", "v", "w"))],
                                 str(tmp_path / "out"))
    job.result(120)
    parts = sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("part-"))
    tables = [pq.read_table(tmp_path / "out" / p) for p in parts]
    got = np.concatenate([np.column_stack([t.column(k).to_numpy() for k in t.column_names]) for t in tables])
    x, (y, _) = read_x(tmp_path / "x", files=1), read_columns(tmp_path / "y")
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(got, np.argsort(d2, axis=1, kind="stable")[:, :3])
