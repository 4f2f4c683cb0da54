"""One request, one meaning: the same table of requests (pykeops spellings: LogSumExp with formula2, aliases with and
without positions, `Var` aliases, numpy integers as K) gives the same result in process (`kred.numpy.Genred`),
through `Cluster.submit`, through a job file and over HTTP, each against a dense float64 computation written here.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray
import yaml

from kred.engine.cluster import Cluster, run_job_file
from kred.engine.numpy import Genred
from kred.engine.spec import Spec, make_plan
from kred.service.app import create_app
from kred.service.schemas import ReductionSpec
from conftest import start_ray
from service_helpers import Running, settings

RNG = np.random.default_rng(7)
X, Y, B = RNG.random((40, 2)), RNG.random((30, 2)), RNG.random((30, 1))
D2 = ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)           # (40, 30), dense, float64


def lse_weighted():        # pykeops: LogSumExp with formula2 is log sum_j exp(f_ij) b_j
    return np.log((np.exp(-D2) * B[:, 0]).sum(1, keepdims=True))


def lse():
    return np.log(np.exp(-D2).sum(1, keepdims=True))


def kmin3():
    return np.sort(D2, axis=1)[:, :3]


def gauss_sum():
    return np.exp(-D2) @ B


# (name, formula, aliases, options, oracle)
TABLE = [
    ("LogSumExp + formula2 = weighted", "-SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"],
     dict(reduction_op="LogSumExp", formula2="b"), lse_weighted),
    ("aliases without spaces or positions", "-SqDist(x,y)", ["x=Vi(2)", "y=Vj(2)"],
     dict(reduction_op="LogSumExp"), lse),
    ("Var aliases, explicit positions", "Exp(-SqDist(x, y)) * b", ["x = Var(0, 2, 0)", "y = Vj(1, 2)", "b=Vj(2,1)"],
     dict(reduction_op="Sum"), gauss_sum),
    ("a numpy integer K", "SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"],
     dict(reduction_op="KMin", opt_arg=np.int64(3)), kmin3),
]
IDS = [row[0] for row in TABLE]


def arrays_for(aliases):
    named = {"x": X, "y": Y, "b": B}
    return [named[a.split("=")[0].strip()] for a in aliases]


def test_spellings_of_one_request_are_one_spec_and_one_plan():
    a = Spec("-SqDist(x, y)", ["x=Vi(2)", "y=Vj(2)", "b=Vj(1)"], "LogSumExp", 1, formula2="b")
    b = Spec("-SqDist(x, y)", ("x = Vi(0, 2)", "y = Var(1, 2, 1)", "b = Vj(2, 1)"), "LogSumExpWeight", 1,
             formula2="b")
    assert a == b and a.key == b.key and a.reduction_op == "LogSumExpWeight"
    assert make_plan(a) is make_plan(b)
    assert Spec("SqDist(x,y)", ["x=Vi(2)", "y=Vj(2)"], "Sum", 1, opt_arg=5).opt_arg is None   # Sum takes no K
    wire = ReductionSpec.model_validate(a.to_json())
    assert wire.spec == a


@pytest.mark.parametrize("name,formula,aliases,options,oracle", TABLE, ids=IDS)
def test_in_process(name, formula, aliases, options, oracle):
    got = Genred(formula, aliases, axis=1, **options)(*arrays_for(aliases), backend="CPU")
    np.testing.assert_allclose(got, oracle(), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def cluster():
    start_ray(num_cpus=2, object_store_memory=100 * 1024 * 1024)
    with Cluster(device="cpu", workers=1, threads=1) as cl:
        yield cl
    ray.shutdown()


@pytest.mark.parametrize("name,formula,aliases,options,oracle", TABLE, ids=IDS)
def test_cluster_submit(cluster, name, formula, aliases, options, oracle):
    got = cluster.submit(formula, aliases, *arrays_for(aliases), axis=1, **options).result(timeout=120)
    np.testing.assert_allclose(got, oracle(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,formula,aliases,options,oracle", TABLE, ids=IDS)
def test_job_file(cluster, tmp_path, name, formula, aliases, options, oracle):
    inputs = {}
    for alias, array in zip(aliases, arrays_for(aliases)):
        alias_name = alias.split("=")[0].strip()
        np.save(tmp_path / f"{alias_name}.npy", array)
        inputs[alias_name] = f"{alias_name}.npy"
    job = {"formula": formula, "aliases": aliases, "inputs": inputs, "axis": 1, "output": "out.npy",
           "cluster": {"device": "cpu", "workers": 1, "threads": 1},
           **{k: (int(v) if isinstance(v, np.integer) else v) for k, v in options.items()}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = run_job_file(tmp_path / "job.yaml", progress=False)
    np.testing.assert_allclose(np.load(out), oracle(), rtol=1e-10, atol=1e-12)


def test_job_files_keep_the_older_reduction_spelling(cluster, tmp_path):
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", Y)
    job = {"formula": "SqDist(x, y)", "aliases": ["x = Vi(2)", "y = Vj(2)"], "reduction": "KMin", "opt_arg": 3,
           "inputs": {"x": "x.npy", "y": "y.npy"}, "axis": 1, "output": "out.npy",
           "cluster": {"device": "cpu", "workers": 1, "threads": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    np.testing.assert_allclose(np.load(run_job_file(tmp_path / "job.yaml", progress=False)), kmin3(), rtol=1e-10)


@pytest.mark.parametrize("name,formula,aliases,options,oracle", TABLE, ids=IDS)
def test_over_http(tmp_path, name, formula, aliases, options, oracle):
    async def main():
        async with Running(create_app(settings(tmp_path))) as running:
            async with running.client(transport="arrow") as c:
                return await c.reduce(formula, aliases, *arrays_for(aliases), axis=1, **options)

    np.testing.assert_allclose(asyncio.run(main()), oracle(), rtol=1e-10, atol=1e-12)
