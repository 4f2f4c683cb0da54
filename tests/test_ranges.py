"""Block-sparse `ranges` on every backend against the dense reduction with the same mask, and the helpers that build
ranges (grid_cluster, cluster_ranges_centroids, sort_clusters, from_matrix) against dense computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import ArgumentError
from kred.engine.numpy import (Genred, LazyTensor, cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster,
                          sort_clusters, swap_axes)
from kred.engine.torch import LazyTensor as TorchLazyTensor
from kred.engine.torch import from_matrix as torch_from_matrix
from kred.engine.torch import grid_cluster as torch_grid_cluster

N, M = 10, 12
RNG = np.random.default_rng(11)
X = RNG.standard_normal((N, 2))
Y = RNG.standard_normal((M, 2))
B = RNG.standard_normal((M, 2))

# A hand-written pattern: row clusters [0,3) [3,6) [8,10) (rows 6, 7 in no cluster, cluster [3,6) visits nothing),
# column ranges not adjacent and out of order; and its transpose, for reductions over i.
RANGES_I = np.array([[0, 3], [3, 6], [8, 10]], dtype=np.int32)
SLICES_I = np.array([2, 2, 4], dtype=np.int32)
REDRANGES_J = np.array([[7, 12], [0, 2], [2, 5], [9, 11]], dtype=np.int32)


def mask_of(clusters, slices, reduced, n, m):
    """The dense (n, m) mask that a (clusters, slices, reduced ranges) triple describes."""
    mask = np.zeros((n, m), dtype=bool)
    start = 0
    for (r0, r1), end in zip(clusters, slices):
        for c0, c1 in reduced[start:end]:
            mask[r0:r1, c0:c1] = True
        start = end
    return mask


def transposed_triple(mask):
    """(ranges_j, slices_j, redranges_i) for `mask`, one j point per cluster and one i point per range."""
    clusters = np.stack([np.arange(mask.shape[1]), np.arange(1, mask.shape[1] + 1)], 1)
    rows = [np.nonzero(mask[:, j])[0] for j in range(mask.shape[1])]
    reduced = np.array([[i, i + 1] for r in rows for i in r]).reshape(-1, 2)
    return clusters, np.cumsum([len(r) for r in rows]), reduced


MASK = mask_of(RANGES_I, SLICES_I, REDRANGES_J, N, M)
RANGES = (RANGES_I, SLICES_I, REDRANGES_J) + transposed_triple(MASK)


def dense_reductions(values, mask, axis):
    """Sum, LogSumExp, Min_ArgMin and KMin_ArgKMin (K=2) of `values` (N, M, D) restricted to `mask`, over `axis`."""
    if axis == 0:
        values, mask = values.transpose(1, 0, 2), mask.T
    m = mask[..., None]
    summed = np.where(m, values, 0).sum(1)
    with np.errstate(divide="ignore"):
        lse = np.log(np.where(m, np.exp(values), 0).sum(1))
    masked = np.where(m, values, np.inf)
    order = np.argsort(masked, axis=1, kind="stable")
    sorted_values = np.take_along_axis(masked, order, 1)
    index = np.where(np.isinf(sorted_values), -1, order)
    return {"Sum": summed, "LogSumExp": lse, "Min_ArgMin": (sorted_values[:, 0], index[:, 0]),
            "KMin_ArgKMin": (sorted_values[:, :2].reshape(len(values), -1), index[:, :2].reshape(len(values), -1))}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reduction", ["Sum", "LogSumExp", "Min_ArgMin", "KMin_ArgKMin"])
def test_genred_ranges_match_dense_masked_reduction(backend, reduction, axis):
    smooth = reduction in ("Sum", "LogSumExp")
    op = Genred("-SqDist(x, y) * b" if smooth else "SqDist(x, y) - b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(2)"],
                reduction_op=reduction, axis=axis, opt_arg=2 if "KMin" in reduction else None)
    sqdist = ((X[:, None] - Y[None]) ** 2).sum(-1, keepdims=True)
    values = -sqdist * B[None] if smooth else sqdist - B[None]
    expected = dense_reductions(values, MASK, axis)[reduction]
    got = op(X, Y, B, backend=backend, ranges=RANGES)
    for g, e in zip(*((got, expected) if isinstance(got, tuple) else ((got,), (expected,)))):
        if e.dtype.kind == "i":
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=1e-12)


def test_lazytensor_ranges_attribute_transpose_and_keyword():
    x_i, y_j = LazyTensor(X[:, None, :]), LazyTensor(Y[None, :, :])
    K = (-((x_i - y_j) ** 2).sum(-1)).exp()
    dense = np.exp(-((X[:, None] - Y[None]) ** 2).sum(-1)) * MASK
    np.testing.assert_allclose(K.sum(dim=1, ranges=RANGES), dense.sum(1, keepdims=True), rtol=1e-12)
    K.ranges = RANGES
    b_j = LazyTensor(B[None])
    np.testing.assert_allclose((K * b_j).sum(dim=1), dense @ B, rtol=1e-12)     # kept through operations
    np.testing.assert_allclose(K.sum(dim=0), dense.sum(0)[:, None], rtol=1e-12)
    np.testing.assert_allclose(K.t() @ X, dense.T @ X, rtol=1e-12)             # ranges swapped with the axes
    assert K.t().ranges[0] is RANGES[3]
    with pytest.raises(ArgumentError, match="different ranges"):
        _with_ranges(K, swap_axes(RANGES))


def _with_ranges(K, ranges):
    other = LazyTensor(X[:, None, :1])
    other.ranges = ranges
    return K + other


def test_torch_ranges_with_autograd_match_dense_masked():
    x = torch.tensor(X, requires_grad=True)
    y = torch.tensor(Y, requires_grad=True)
    b = torch.tensor(B, requires_grad=True)
    ranges = tuple(torch.as_tensor(r) for r in RANGES)
    x_i, y_j, b_j = TorchLazyTensor(x[:, None]), TorchLazyTensor(y[None]), TorchLazyTensor(b[None])
    K = (-((x_i - y_j) ** 2).sum(-1)).exp()
    visited = torch.as_tensor(MASK.any(0))          # log-sum-exp of no point is -inf: leave those columns out
    out = (K * b_j).sum(dim=1, ranges=ranges) + K.logsumexp(dim=0, ranges=ranges)[visited].sum()
    dense_k = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1))
    mask = torch.as_tensor(MASK)
    dense_lse = torch.where(mask, dense_k, torch.tensor(-torch.inf, dtype=x.dtype)).logsumexp(0)
    expected = (dense_k * mask) @ b + dense_lse[visited].sum()
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, y, b))
    dense_grads = torch.autograd.grad(expected.square().sum(), (x, y, b))
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want)


# Helpers -------------------------------------------------------------------------------------------------------

def test_grid_cluster_labels_cells_in_lexicographic_order():
    points = RNG.uniform(-3, 3, size=(200, 3))
    labels = grid_cluster(points, 1.5)
    cells = [tuple(np.floor(p / 1.5).astype(int)) for p in points]
    numbering = {cell: k for k, cell in enumerate(sorted(set(cells)))}
    np.testing.assert_array_equal(labels, [numbering[c] for c in cells])
    # one cell size per coordinate, and any dimension
    sizes = np.array([0.5, 1.0, 2.0, 4.0])
    points4 = RNG.uniform(-2, 2, size=(50, 4))
    cells4 = [tuple(np.floor(p / sizes).astype(int)) for p in points4]
    numbering4 = {cell: k for k, cell in enumerate(sorted(set(cells4)))}
    np.testing.assert_array_equal(grid_cluster(points4, sizes), [numbering4[c] for c in cells4])
    labels_t = torch_grid_cluster(torch.tensor(points), 1.5)
    assert labels_t.dtype == torch.int32
    np.testing.assert_array_equal(labels_t.numpy(), labels)


def test_sort_clusters_ranges_and_centroids():
    points = RNG.standard_normal((40, 2))
    weights = RNG.uniform(0.5, 2, size=40)
    labels = RNG.integers(0, 5, size=40)
    (sorted_points, sorted_weights), sorted_labels = sort_clusters((points, weights), labels)
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(sorted_points, points[order])
    np.testing.assert_array_equal(sorted_weights, weights[order])
    np.testing.assert_array_equal(sorted_labels, labels[order])
    ranges, centroids, masses = cluster_ranges_centroids(sorted_points, sorted_labels, weights=sorted_weights)
    for k in range(5):
        members = sorted_labels == k
        r0, r1 = ranges[k]
        assert np.all(sorted_labels[r0:r1] == k) and r1 - r0 == members.sum()
        np.testing.assert_allclose(masses[k], weights[labels == k].sum())
        np.testing.assert_allclose(centroids[k], np.average(points[labels == k], axis=0, weights=weights[labels == k]))
    np.testing.assert_array_equal(cluster_ranges(sorted_labels), ranges)
    unweighted = cluster_ranges_centroids(sorted_points, sorted_labels)[1]
    np.testing.assert_allclose(unweighted[2], points[labels == 2].mean(0))


def test_from_matrix_describes_the_block_mask():
    ranges_i = np.array([[0, 2], [2, 7], [7, 10]])
    ranges_j = np.array([[0, 5], [5, 6], [6, 12]])
    keep = np.array([[True, False, True], [False, False, False], [True, True, True]])
    ranges = from_matrix(ranges_i, ranges_j, keep)
    block = np.zeros((N, M), dtype=bool)
    for k, (r0, r1) in enumerate(ranges_i):
        for l, (c0, c1) in enumerate(ranges_j):
            block[r0:r1, c0:c1] = keep[k, l]
    np.testing.assert_array_equal(mask_of(*ranges[:3], N, M), block)
    np.testing.assert_array_equal(mask_of(*ranges[3:], M, N), block.T)
    assert swap_axes(ranges)[0] is ranges[3] and swap_axes(None) is None
    torch_ranges = torch_from_matrix(torch.as_tensor(ranges_i), torch.as_tensor(ranges_j), torch.as_tensor(keep))
    assert all(isinstance(r, torch.Tensor) and r.dtype == torch.int32 for r in torch_ranges)
    for a, b in zip(torch_ranges, ranges):
        np.testing.assert_array_equal(a.numpy(), b)


def test_clustered_gaussian_pipeline(backend):
    """The pykeops recipe: cluster, sort, keep the blocks whose centroids are close, reduce block-sparsely."""
    x = RNG.uniform(0, 4, size=(300, 2))
    y = RNG.uniform(0, 4, size=(250, 2))
    b = RNG.standard_normal((250, 1))
    x_labels, y_labels = grid_cluster(x, 1.0), grid_cluster(y, 1.0)
    x, x_labels = sort_clusters(x, x_labels)
    (y, b), y_labels = sort_clusters((y, b), y_labels)
    x_ranges, x_centroids, _ = cluster_ranges_centroids(x, x_labels)
    y_ranges, y_centroids, _ = cluster_ranges_centroids(y, y_labels)
    keep = ((x_centroids[:, None] - y_centroids[None]) ** 2).sum(-1) < 1.6 ** 2
    assert 0 < keep.mean() < 1
    ranges = from_matrix(x_ranges, y_ranges, keep)
    x_i, y_j, b_j = LazyTensor(x[:, None]), LazyTensor(y[None]), LazyTensor(b[None])
    a = ((-((x_i - y_j) ** 2).sum(-1) * 4).exp() * b_j).sum(dim=1, ranges=ranges, backend=backend)
    mask = keep[x_labels][:, y_labels]
    dense = np.exp(-4 * ((x[:, None] - y[None]) ** 2).sum(-1)) * mask
    np.testing.assert_allclose(a, dense @ b, rtol=1e-11, atol=1e-13)


def test_ranges_errors_name_the_problem():
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], axis=1, reduction_op="Sum")
    with pytest.raises(ArgumentError, match="6-tuple"):
        op(X, Y, ranges=RANGES[:3])
    with pytest.raises(ArgumentError, match="ranges_i holds a range outside"):
        op(X, Y, ranges=(np.array([[0, 11]]),) + RANGES[1:])
    with pytest.raises(ArgumentError, match="redranges_j must have shape"):
        op(X, Y, ranges=RANGES[:2] + (np.zeros(4, dtype=int),) + RANGES[3:])
    with pytest.raises(ArgumentError, match="slices_i must"):
        op(X, Y, ranges=(RANGES_I, np.array([2, 1, 4]), REDRANGES_J) + RANGES[3:])
    with pytest.raises(ArgumentError, match="integers"):
        op(X, Y, ranges=(RANGES_I.astype(float),) + RANGES[1:])
    with pytest.raises(ArgumentError, match="batch"):
        op(X[None].repeat(2, 0), Y, ranges=RANGES)
