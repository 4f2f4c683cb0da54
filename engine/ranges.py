"""Block-sparse reductions: the pykeops `ranges` 6-tuple, the loop that honours it, and the helpers that build it.

A block-sparse reduction only visits chosen (block of rows) x (block of columns) pairs. pykeops describes them with
six integer arrays:

    (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i)

- `ranges_i` (Ci, 2): the rows [start, end) of each cluster of i points;
- `slices_i` (Ci,): cluster k reduces over `redranges_j[slices_i[k-1]:slices_i[k]]` (with slices_i[-1] read as 0);
- `redranges_j` (Ri, 2): ranges [start, end) of j columns;
- the last three are the same for a reduction over i (`axis=0`): clusters of j and the i ranges they visit.

Rows that no cluster covers get the reduction of an empty set (0 for Sum, -inf for LogSumExp, index -1 ...), which is
what a dense reduction with an all-False mask row gives.

`reduce_blocks` turns the pattern into a grid of the block runtime (`engine.grid`: one row block per cluster with
its column ranges) and hands it to the backend: the CPU kernel takes it whole (CSR, one call); other backends run
it through `Backend.partial` per column range and the reduction's `merge`.
The helpers (`grid_cluster`, `cluster_ranges`, `cluster_ranges_centroids`, `sort_clusters`, `from_matrix`,
`swap_axes`) take numpy arrays or torch tensors and answer in kind, as pykeops.numpy / pykeops.torch do.
"""
from __future__ import annotations

import numpy as np

from .errors import ArgumentError
from .grid import Grid

# Ranges as user input -------------------------------------------------------------------------------------------


def check_ranges(ranges, axis: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (row clusters, slices, column ranges) triple that a reduction over `axis` uses, validated.

    Rows are i for `axis=1` (reduce over j) and j for `axis=0`; `n` rows, `m` columns, as the plan normalises them.
    Every index is checked, since compiled backends trust the bounds they are given.
    """
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 6:
        raise ArgumentError("ranges must be the pykeops 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, "
                            "slices_j, redranges_i)")
    names = ("ranges_i", "slices_i", "redranges_j", "ranges_j", "slices_j", "redranges_i")
    start = 0 if axis == 1 else 3
    arrays = [_as_index_array(ranges[start + k], names[start + k]) for k in range(3)]
    clusters, slices, reduced = arrays
    names = names[start:start + 3]
    row_index, col_index = ("i", "j") if axis == 1 else ("j", "i")
    _check_pairs(clusters, names[0], n, row_index)
    _check_pairs(reduced, names[2], m, col_index)
    if slices.ndim != 1 or len(slices) != len(clusters):
        raise ArgumentError(f"{names[1]} must have one entry per row of {names[0]} ({len(clusters)}), "
                            f"got shape {slices.shape}")
    if len(slices) and (slices[0] < 0 or np.any(np.diff(slices) < 0) or slices[-1] > len(reduced)):
        raise ArgumentError(f"{names[1]} must be non-decreasing end offsets into {names[2]} (0..{len(reduced)})")
    return clusters, slices, reduced


def _as_index_array(value, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):     # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ArgumentError(f"ranges: {name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_pairs(pairs: np.ndarray, name: str, size: int, index: str) -> None:
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ArgumentError(f"ranges: {name} must have shape (count, 2), got {pairs.shape}")
    if len(pairs) and (pairs.min() < 0 or pairs.max() > size or np.any(pairs[:, 0] > pairs[:, 1])):
        raise ArgumentError(f"ranges: {name} holds a range outside [0, {size}], the {size} points indexed by "
                            f"{index} (or a range whose start exceeds its end)")


# The block-sparse reduction -------------------------------------------------------------------------------------


def ranges_grid(ranges, axis: int, n: int, m: int) -> Grid:
    """The block runtime's grid (engine.grid) of a validated `ranges` 6-tuple: one row block per cluster."""
    clusters, slices, reduced = check_ranges(ranges, axis, n, m)
    return Grid.from_ranges(clusters, slices, reduced, n)


def reduce_blocks(backend, plan, arrays: list[np.ndarray], n: int, m: int, ranges):
    """The finished result of `plan` visiting only the blocks that `ranges` names."""
    return backend.reduce_grid(plan, arrays, ranges_grid(ranges, plan.axis, n, m))


# Helpers to build ranges (pykeops semantics) ------------------------------------------------------------------


def swap_axes(ranges):
    """The ranges of the transposed problem: (ranges_j, slices_j, redranges_i, ranges_i, slices_i, redranges_j)."""
    return None if ranges is None else tuple(ranges[3:6]) + tuple(ranges[0:3])


def grid_cluster(x, size):
    """Labels 0..C-1 of the cubic cells of side `size` (a number or one per coordinate) that the points `x` fall in.

    Cells are numbered in lexicographic order of their integer coordinates, as pykeops numbers them; unlike pykeops
    this is exact in any dimension (no packing of coordinates into one integer).
    """
    frame = _Frame(x)
    points = frame.numpy(x)
    if points.ndim != 2:
        raise ArgumentError(f"grid_cluster: x must have shape (N, D), got {points.shape}")
    cell = np.floor(points / np.asarray(frame.numpy(size), dtype=points.dtype)).astype(np.int64)
    _, labels = np.unique(cell, axis=0, return_inverse=True)
    return frame.back(labels.reshape(-1), index=True)


def cluster_ranges(labels, n_labels=None):
    """(C, 2) ranges [start, end) of each label in an array sorted by label (label k owns its count of rows)."""
    frame = _Frame(labels)
    counts = _counts(frame.numpy(labels), n_labels)
    return frame.back(_ranges_from_counts(counts), index=True)


def cluster_ranges_centroids(x, labels, weights=None, min_weight: float = 1e-9):
    """(ranges, centroids, cluster weights) of the points `x` grouped by `labels`.

    Centroids are weighted means (weights default to 1; a cluster's weight is clamped below by `min_weight` before
    dividing), cluster weights are sums of the point weights; ranges are those of `cluster_ranges`.
    """
    frame = _Frame(x)
    points, labels_np = frame.numpy(x), frame.numpy(labels).reshape(-1)
    if points.ndim != 2 or len(points) != len(labels_np):
        raise ArgumentError(f"cluster_ranges_centroids: x {points.shape} needs one label per row, "
                            f"got {labels_np.shape}")
    w = np.ones(len(points), points.dtype) if weights is None else frame.numpy(weights).reshape(-1)
    n_labels = int(labels_np.max()) + 1 if len(labels_np) else 0
    mass = np.bincount(labels_np, weights=w, minlength=n_labels)
    sums = np.zeros((n_labels, points.shape[1]), np.float64)
    np.add.at(sums, labels_np, points * w[:, None])
    centroids = (sums / np.maximum(mass, min_weight)[:, None]).astype(points.dtype)
    ranges = _ranges_from_counts(_counts(labels_np, n_labels))
    return frame.back(ranges, index=True), frame.back(centroids), frame.back(mass.astype(points.dtype))


def sort_clusters(x, labels):
    """(x sorted by label, sorted labels); `x` may be one array or a tuple/list of arrays sorted alike."""
    frame = _Frame(labels)
    labels_np = frame.numpy(labels).reshape(-1)
    order = np.argsort(labels_np, kind="stable")
    if isinstance(x, (tuple, list)):
        return type(x)(_take(a, order) for a in x), frame.back(labels_np[order], index=True)
    return _take(x, order), frame.back(labels_np[order], index=True)


def from_matrix(ranges_i, ranges_j, keep):
    """The 6-tuple that visits block (k, l) of rows `ranges_i[k]` and columns `ranges_j[l]` where `keep[k, l]`."""
    frame = _Frame(keep)
    keep_np = frame.numpy(keep).astype(bool)
    rows, cols = frame.numpy(ranges_i).astype(np.int64), frame.numpy(ranges_j).astype(np.int64)
    if keep_np.shape != (len(rows), len(cols)):
        raise ArgumentError(f"from_matrix: keep must have shape ({len(rows)}, {len(cols)}), got {keep_np.shape}")
    ii, jj = np.nonzero(keep_np)              # row-major: blocks of each i cluster, in column order
    jt, it = np.nonzero(keep_np.T)            # the same, cluster of j by cluster of j
    result = (rows, np.cumsum(keep_np.sum(1)), cols[jj], cols, np.cumsum(keep_np.sum(0)), rows[it])
    return tuple(frame.back(a, index=True) for a in result)


def _counts(labels: np.ndarray, n_labels) -> np.ndarray:
    labels = labels.reshape(-1).astype(np.int64)
    return np.bincount(labels, minlength=0 if n_labels is None else int(n_labels))


def _ranges_from_counts(counts: np.ndarray) -> np.ndarray:
    pivots = np.concatenate([[0], np.cumsum(counts)])
    return np.stack([pivots[:-1], pivots[1:]], axis=1)


def _take(a, order: np.ndarray):
    if _is_torch(a):
        import torch
        return a[torch.as_tensor(order, device=a.device)]
    return np.asarray(a)[order]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class _Frame:
    """Remembers whether the caller used torch (and on which device) so helpers answer in the caller's type."""

    def __init__(self, like):
        self.torch_device = like.device if _is_torch(like) else None

    def numpy(self, x) -> np.ndarray:
        if _is_torch(x):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def back(self, array: np.ndarray, index: bool = False):
        if index:
            # pykeops gives int32 ranges and labels in torch; numpy callers get numpy's default integer.
            array = array.astype(np.int32 if self.torch_device is not None else np.int64)
        if self.torch_device is None:
            return array
        import torch
        return torch.as_tensor(array).to(self.torch_device)
