"""Translation-invariant reductions on data far from the origin, on every backend, against float64 written here.

A distance between two points near (o, o, ..., o) depends only on their difference, yet formulas rewritten for speed
(|x|^2 + |y|^2 - 2 x.y) cancel there: the CPU backend's large-D path once lost every digit at o = 1e4 and the GPU
fast path was wrong at 1e3 (issue 22). Here the points are a unit cloud moved to o, some duplicated (distance
exactly 0), in dimensions on both sides of the CPU's blocked-product threshold; the oracle computes in float64 from
the same rounded inputs, so the expected error is that of the reduction itself (float32: 1e-5, the CUDA fast
path: its documented bound, FAST_RTOL).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, float_rtol

from kred.engine.codegen.cpu import DOT_MIN_DIM
from kred.numpy import Genred

DIMS = (3, DOT_MIN_DIM, 3 * DOT_MIN_DIM - 1)
OFFSETS = {np.float32: (1e2, 1e4), np.float64: (1e6,)}


def cloud(d, offset, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (offset + rng.random((97, d))).astype(dtype)
    y = (offset + rng.random((131, d))).astype(dtype)
    y[:4] = x[:4]                               # duplicated points: distance 0
    b = rng.uniform(0.5, 1.5, (131, 1)).astype(dtype)
    return x, y, b


def dense(x, y):
    return ((x[:, None, :].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", DIMS)
def test_distances_far_from_the_origin(backend, dtype, d):
    aliases = [f"x = Vi({d})", f"y = Vj({d})", "b = Vj(1)"]
    scale = 1.0 / d                             # keeps the Gaussian's terms of order 1 at unit spread
    gaussian = Genred(f"Exp(-SqDist(x, y) * {scale!r}) * b", aliases, "Sum", axis=1)
    laplace = Genred("Exp(-Norm2(x - y)) * b", aliases, "Sum", axis=1)
    lse = Genred(f"-SqDist(x, y) * {scale!r}", aliases[:2], "LogSumExp", axis=1)
    knn = Genred("SqDist(x, y)", aliases[:2], "KMin_ArgKMin", axis=1, opt_arg=3)
    rtol = float_rtol(backend, dtype)
    for offset in OFFSETS[dtype]:
        x, y, b = cloud(d, offset, dtype, seed=d)
        d2 = dense(x, y)
        bb = b.astype(np.float64)
        context = f"{backend} {np.dtype(dtype)} D={d} offset={offset:g}"
        np.testing.assert_allclose(gaussian(x, y, b, backend=backend), np.exp(-d2 * scale) @ bb, rtol=rtol,
                                   err_msg=context)
        np.testing.assert_allclose(laplace(x, y, b, backend=backend), np.exp(-np.sqrt(d2)) @ bb, rtol=rtol,
                                   err_msg=context)
        top = (-d2 * scale).max(1, keepdims=True)
        want = top + np.log(np.exp(-d2 * scale - top).sum(1, keepdims=True))
        np.testing.assert_allclose(lse(x, y, backend=backend), want, rtol=rtol, atol=rtol, err_msg=context)
        values, indices = knn(x, y, backend=backend)
        nearest = np.sort(d2, axis=1)[:, :3]
        np.testing.assert_allclose(values, nearest, rtol=rtol, atol=0, err_msg=context)
        np.testing.assert_array_equal(values[:4, 0], 0, err_msg=f"{context}: duplicated points")
        np.testing.assert_allclose(np.take_along_axis(d2, indices.astype(np.int64), 1), nearest, rtol=rtol,
                                   atol=0, err_msg=context)
