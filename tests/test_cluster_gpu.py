"""engine.cluster on the real GPUs of this machine: one actor per GPU running the cuda backend (inputs copied to
each GPU once per job), results against dense numpy. Runs whenever a GPU is visible."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu         # conftest skips these only when no GPU is visible


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray

    from kred.engine.backends.cuda import gpu_count
    from kred.engine.cluster import Cluster
    from conftest import start_ray
    start_ray(num_cpus=2, num_gpus=gpu_count())
    try:
        with Cluster(device="gpu") as cl:
            yield cl
    finally:
        ray.shutdown()


@pytest.mark.parametrize("split", [None, (4, 1), (2, 3)])
def test_gaussian_sum_on_every_gpu(gpu_cluster, split):
    from kred.engine.backends.cuda import gpu_count
    workers = gpu_cluster.workers
    assert len(workers) == gpu_count() and all(w["backend"] == "cuda" for w in workers)
    rng = np.random.default_rng(0)
    x, y, b = rng.random((3000, 3)), rng.random((2000, 3)), rng.random((2000, 2))
    got = gpu_cluster.reduce("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], x, y, b, axis=1,
                             split=split)
    want = np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)) @ b
    np.testing.assert_allclose(got, want, rtol=1e-10)
