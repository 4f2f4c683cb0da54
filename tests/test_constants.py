"""One compile per formula shape: float constants are run-time arguments of the kernels (`Plan.kernel_inputs`), so
formulas that differ only in them share one compiled kernel — in process, over HTTP, on cluster workers and on the
CUDA backend (over the CPU emulation) — and every result is still right (dense numpy, float64, written here).

Compiles are counted where they happen: each C build appends a line to `builds.log` of the kernel cache directory
(any process: the service, Ray workers), each NVRTC build leaves a cubin; every test starts from an empty one.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from kred.engine.backends import get_backend, nvrtc
from kred.engine.codegen import cuda as template
from kred.engine.numpy import Genred
from kred.engine.plan import constant_slots

from kred.numpy import LazyTensor

SCALES = (0.1, 0.2, 0.3, 0.4)
RNG = np.random.default_rng(21)


def builds(cache_dir) -> int:
    """C compiles done so far in `cache_dir` (one line each in builds.log)."""
    log = cache_dir / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache directory; the CPU backend (and its compiler probe) set up before counting."""
    monkeypatch.setenv("KRED_CACHE_DIR", str(tmp_path))
    get_backend("cpu")
    return tmp_path


def gaussian(x, y, b, s):
    d2 = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    return np.exp(-s * d2) @ b.astype(np.float64)


def test_lazytensor_gaussian_scales_compile_one_kernel(fresh_cache):
    # dimension 7: a shape no other test compiles, so the process-wide memo of loaded kernels has not seen it
    x, y, b = RNG.random((60, 7)), RNG.random((50, 7)), RNG.random((50, 2))
    before = builds(fresh_cache)
    for s in SCALES:
        x_i, y_j, b_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :]), LazyTensor(b[None, :, :])
        got = ((-s * ((x_i - y_j) ** 2).sum(-1)).exp() * b_j).sum(1, backend="CPU")
        np.testing.assert_allclose(got, gaussian(x, y, b, s), rtol=1e-12)
    assert builds(fresh_cache) - before == 1


def test_constants_and_folding():
    """Float constants are lifted after simplification: 0*x and 1*x still fold, integers stay in the kernel."""
    aliases = ["x = Vi(2)", "y = Vj(2)"]
    plan = Genred("Exp(-SqDist(x, y) * 0.25) * Pow(x - y, 3) * 2", aliases, axis=1).plan
    assert [c.params[0] for c in constant_slots(plan)] == [-0.25]           # -(c*x) = (-c)*x folded first
    assert all(n.op != "Const" for n in plan.lifted.formula.postorder())
    assert any(n.op == "IntCst" for n in plan.lifted.formula.postorder())   # the factor 2 stays structural
    folded = Genred("SqDist(x, y) * 1.0 + 0.0 * Sum(x)", aliases, axis=1).plan
    assert folded.lifted is folded and not folded.lifted_values
    # the same shape with other constants: another plan (its own values), one lifted key
    other = Genred("Exp(-SqDist(x, y) * 0.5) * Pow(x - y, 3) * 2", aliases, axis=1).plan
    assert other.key != plan.key and other.lifted.key == plan.lifted.key
    assert other.lifted_values == (-0.5,)
    assert other.lifted.formula is plan.lifted.formula          # hash-consed: the very same nodes
    # a different integer is a different kernel
    cube = Genred("Exp(-SqDist(x, y) * 0.5) * Pow(x - y, 4) * 2", aliases, axis=1).plan
    assert cube.lifted.key != plan.lifted.key


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_and_gradients_with_lifted_constants(backend, dtype):
    """Forward and gradient (a derived plan, its own constants) against torch autograd in float64."""
    torch = pytest.importorskip("torch")
    from kred.engine.torch.genred import Genred as TorchGenred

    x, y, b = RNG.random((30, 3)), RNG.random((20, 3)), RNG.random((20, 1))
    for s, t in ((0.3, 1.7), (0.45, -2.5)):
        formula = f"Exp(-SqDist(x, y) * {s}) * Powf(b + {t * t}, {t}) + Sin(x * {t})"
        op = TorchGenred(formula, ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
        xt = torch.tensor(x, dtype=torch.float64 if dtype == np.float64 else torch.float32, requires_grad=True)
        yt, bt = (torch.tensor(a, dtype=xt.dtype) for a in (y, b))
        got = op(xt, yt, bt, backend=backend)
        (gx,) = torch.autograd.grad(got.sum(), xt)
        x64 = torch.tensor(x, requires_grad=True)
        y64, b64 = torch.tensor(y), torch.tensor(b)
        dense = (torch.exp(-((x64[:, None] - y64[None]) ** 2).sum(-1, keepdim=True) * s)
                 * (b64[None] + t * t) ** t + torch.sin(x64 * t)[:, None]).sum(1)
        (want_gx,) = torch.autograd.grad(dense.sum(), x64)
        tol = 1e-10 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(got.detach().double().numpy(), dense.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(gx.double().numpy(), want_gx.numpy(), rtol=tol, atol=tol)


def test_over_http_one_compile(fresh_cache, tmp_path):
    from kred.service.app import create_app
    from service_helpers import Running, settings

    x, y, b = RNG.random((40, 5)), RNG.random((30, 5)), RNG.random((30, 1))
    aliases = ["x = Vi(5)", "y = Vj(5)", "b = Vj(1)"]

    async def main():
        async with Running(create_app(settings(tmp_path / "service", backend="cpu"))) as running, \
                running.client(transport="arrow") as c:
            return [await c.reduce(f"Exp(-SqDist(x, y) * {s}) * b", aliases, x, y, b, axis=1) for s in SCALES]

    before = builds(fresh_cache)
    results = asyncio.run(main())
    assert builds(fresh_cache) - before == 1
    for s, got in zip(SCALES, results):
        np.testing.assert_allclose(got, gaussian(x, y, b, s), rtol=1e-12)


def test_cluster_one_compile(fresh_cache):
    """Workers get the plan (constants included) and compile its lifted form once: the Ray workers inherit the
    empty cache directory from this process."""
    import ray
    from conftest import start_ray
    from kred.engine.cluster import Cluster

    x, y, b = RNG.random((40, 6)), RNG.random((30, 6)), RNG.random((30, 1))
    aliases = ["x = Vi(6)", "y = Vj(6)", "b = Vj(1)"]
    start_ray(num_cpus=2, object_store_memory=100 * 1024 * 1024)
    try:
        with Cluster(device="cpu", workers=1, threads=1) as cluster:
            before = builds(fresh_cache)
            for s in SCALES:
                got = cluster.submit(f"Exp(-SqDist(x, y) * {s}) * b", aliases, x, y, b, axis=1).result(timeout=120)
                np.testing.assert_allclose(got, gaussian(x, y, b, s), rtol=1e-12)
            assert builds(fresh_cache) - before == 1
    finally:
        ray.shutdown()


def test_cuda_source_is_one_for_every_constant():
    """The generated CUDA of two constants is the same text, and NVRTC compiles it."""
    aliases = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]
    plans = [Genred(f"Exp(-SqDist(x, y) * {s}) * b + {s} * Sum(x)", aliases, axis=1).plan for s in (0.1, 0.7)]
    for dtype in (np.float32, np.float64):
        first, second = (template.build(p.kernel_inputs([], dtype)[0], dtype, p.acc_dtype(dtype)).source
                         for p in plans)
        assert first == second and "0.1" not in first and "0.7" not in first
        nvrtc.compile_source(first, "sm_90")
    # float16 keeps its constants as literals (a float16 argument would round them)
    assert plans[0].kernel_inputs([], np.float16)[0] is plans[0]


def test_cuda_emulation_one_cubin_right_values(emulated_gpu, tmp_path):  # noqa: F811
    x, y, b = (RNG.random(s).astype(np.float32) for s in ((70, 3), (90, 3), (90, 1)))
    for s in SCALES:
        got = Genred(f"Exp(-SqDist(x, y) * {s}) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)(
            x, y, b, backend="cuda")
        np.testing.assert_allclose(got, gaussian(x, y, b, s), rtol=2e-5)
    assert len(list((tmp_path / "cuda").glob("*.sm_90.cubin"))) == 1


@pytest.mark.gpu
def test_gpu_scales_compile_one_module(fresh_cache):
    x, y, b = (RNG.random(s).astype(np.float32) for s in ((700, 3), (900, 3), (900, 1)))
    for s in SCALES:
        got = Genred(f"Exp(-SqDist(x, y) * {s}) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)(
            x, y, b, backend="cuda")
        np.testing.assert_allclose(got, gaussian(x, y, b, s), rtol=2e-5)
    assert len(list((fresh_cache / "cuda").glob("*.cubin"))) == 1
