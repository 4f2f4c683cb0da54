"""k-nearest-neighbour classification with an ArgKMin reduction.

Every query point gets the K nearest training points from one `ArgKMin` (no N x M distance matrix) and the
majority label among them. The check compares neighbours and predictions of a subsample of queries with
scikit-learn's brute-force KNeighborsClassifier, and the accuracy on held-out points with scikit-learn's.

    python examples/knn.py --size 1000000 --mode local
"""
from __future__ import annotations

import sys
import time

import numpy as np

from modes import Mode, figure, parser, save_figure

K = 10
CLASSES = 3


def spirals(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Three noisy interleaved spirals in the plane: points (float32) and labels."""
    label = rng.integers(CLASSES, size=n)
    t = rng.uniform(0.2, 1, size=n) ** 0.5 * 3 * np.pi
    angle = t + label * 2 * np.pi / CLASSES
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], 1) + rng.normal(scale=0.6, size=(n, 2))
    return x.astype(np.float32), label


def classify(mode: Mode, queries, train, train_labels) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest training points of every query, and their majority label."""
    nearest = mode.reduce("SqDist(q, t)", ["q = Vi(2)", "t = Vj(2)"], queries, train, reduction_op="ArgKMin",
                          opt_arg=K, axis=1)
    votes = np.zeros((len(queries), CLASSES), np.int64)
    np.add.at(votes, (np.arange(len(queries))[:, None], train_labels[nearest]), 1)
    return nearest, votes.argmax(1)


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=1_000_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    train, train_labels = spirals(args.size, rng)
    test, test_labels = spirals(max(args.size // 10, 100), rng)
    start = time.perf_counter()
    nearest, predicted = classify(mode, test, train, train_labels)
    accuracy = (predicted == test_labels).mean()
    print(f"k-NN: {len(test):,} queries against {len(train):,} training points, K={K}: "
          f"{time.perf_counter() - start:.2f} s ({args.mode}), accuracy {accuracy:.3f}")

    # Check: scikit-learn's brute-force neighbours on a subsample of the queries
    from sklearn.neighbors import KNeighborsClassifier
    sample = rng.choice(len(test), min(len(test), 500), replace=False)
    reference = KNeighborsClassifier(K, algorithm="brute").fit(train.astype(np.float64), train_labels)
    distances, theirs = reference.kneighbors(test[sample].astype(np.float64))
    ours = np.sort(((test[sample, None].astype(np.float64) - train[nearest[sample]]) ** 2).sum(-1), 1)
    same_sets = np.mean([set(a) == set(b) for a, b in zip(nearest[sample], theirs)])
    mode.check("neighbours", np.allclose(np.sqrt(ours), distances, rtol=1e-4, atol=1e-4) and same_sets >= 0.99,
               f"K-th distances equal to scikit-learn's on {len(sample)} queries, same sets for {same_sets:.1%}")
    their_accuracy = (reference.predict(test[sample].astype(np.float64)) == test_labels[sample]).mean()
    our_accuracy = (predicted[sample] == test_labels[sample]).mean()
    mode.check("accuracy", abs(our_accuracy - their_accuracy) <= 0.01,
               f"{our_accuracy:.3f} here, {their_accuracy:.3f} with scikit-learn, on the subsample")

    fig, ax = figure(figsize=(6, 6))
    grid = np.stack(np.meshgrid(np.linspace(-12, 12, 120), np.linspace(-12, 12, 120)), -1).reshape(-1, 2)
    _, region = classify(mode, grid.astype(np.float32), train, train_labels)
    ax.imshow(region.reshape(120, 120), origin="lower", extent=(-12, 12, -12, 12), cmap="Pastel1", alpha=0.8)
    shown = rng.choice(len(train), min(len(train), 3000), replace=False)
    ax.scatter(*train[shown].T, c=train_labels[shown], s=2, cmap="Set1")
    ax.set_title(f"{K}-NN classes, N={args.size:,}, accuracy {accuracy:.3f}")
    save_figure(fig, args.out, "knn")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
