"""k-means clustering: Lloyd's algorithm with an ArgMin reduction, on a million points.

Each iteration assigns every point to its nearest centroid with one `ArgMin` over the centroids (the N x K distance
matrix is never stored) and moves each centroid to the mean of its points. The check recomputes the nearest
centroid of a subsample with dense numpy in float64.

    python examples/kmeans.py --size 1000000 --mode local
"""
from __future__ import annotations

import sys
import time

import numpy as np

from modes import Mode, figure, parser, save_figure

K = 20
ITERATIONS = 10


def blobs(n: int, rng) -> np.ndarray:
    """n points around K random centres in the plane (float32)."""
    centres = rng.uniform(-10, 10, size=(K, 2))
    which = rng.integers(K, size=n)
    return (centres[which] + rng.normal(size=(n, 2)) * rng.uniform(0.5, 1.5, size=(K, 1))[which]).astype(np.float32)


def assign(mode: Mode, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of every point."""
    return mode.reduce("SqDist(x, c)", ["x = Vi(2)", "c = Vj(2)"], x, c, reduction_op="ArgMin", axis=1)[:, 0]


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=1_000_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    x = blobs(args.size, rng)
    c = x[rng.choice(len(x), K, replace=False)].copy()
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        labels = assign(mode, x, c)
        counts = np.bincount(labels, minlength=K)
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=K) for d in range(2)], 1)
        c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c).astype(np.float32)
    labels = assign(mode, x, c)
    print(f"k-means: N={args.size:,} K={K}, {ITERATIONS} Lloyd iterations in {time.perf_counter() - start:.2f} s "
          f"({args.mode})")

    # Check: the nearest centroid of a subsample, by dense float64 numpy (ties: any of the closest is right)
    sample = rng.choice(len(x), min(len(x), 5000), replace=False)
    d = ((x[sample, None].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    chosen = d[np.arange(len(sample)), labels[sample]]
    ok = np.all(chosen <= d.min(1) * (1 + 1e-5) + 1e-6)
    mode.check("nearest centroids", ok, f"{len(sample)} sampled points agree with dense numpy")

    fig, ax = figure(figsize=(6, 6))
    shown = sample[:3000]
    ax.scatter(*x[shown].T, c=labels[shown], s=3, cmap="tab20")
    ax.scatter(*c.T, c="black", marker="x", s=60)
    ax.set_title(f"k-means, K={K}, N={args.size:,}")
    save_figure(fig, args.out, "kmeans")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
