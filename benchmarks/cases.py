"""Benchmark cases: a formula, its aliases, a reduction, the sizes to run, and how to check the answer.

A case is data only; any impl that understands formulas (the engine backends, pykeops) runs every case without
case-specific code. To add a case, build a `Case` and pass it to `register_case` (in a module given to
`python -m benchmarks.run --plugin your.module`).

Each case carries its own float64 `reference`, written with plain numpy, which the harness runs on a subset of the
rows to report every impl's error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    formula: str
    aliases: Callable[[int], list[str]]          # D -> alias list
    reduction: str
    data: Callable                               # (rng, n, m, d) -> float64 arrays in alias order
    reference: Callable                          # (float64 arrays restricted to some rows) -> float64 result
    error: Callable                              # (result rows, reference rows) -> one number, 0 is perfect
    error_kind: str = "max rel. error"
    opt_arg: int | None = None
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)          # N = M
    quick_sizes: tuple[int, ...] = (1_000, 2_000)
    dims: tuple[int, ...] = (3, 100)
    formula2: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"benchmark case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


# Shared pieces -----------------------------------------------------------------------------------------

def points(rng, n, m, d):
    """x (n, d) and y (m, d) with entries of variance 1/d, so |x - y|^2 is about 2 whatever D is."""
    return rng.standard_normal((n, d)) / np.sqrt(d), rng.standard_normal((m, d)) / np.sqrt(d)


def sqdist(x, y):
    """Exact squared distances (float64, by differences: no cancellation), shape (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def chunked_rows(fn, x, *rest, budget=1 << 24):
    """fn applied to blocks of rows of x so that each block's n x m x d temporary stays near `budget` numbers."""
    m, d = rest[0].shape
    step = max(1, budget // max(1, m * d))
    return np.concatenate([fn(x[k:k + step], *rest) for k in range(0, len(x), step)], axis=0)


def max_relative_error(got, want):
    """max |got - want| / max |want| over the compared rows (one number, scale-free)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def knn_miss_rate(got, want):
    """1 - recall of the true K nearest neighbours (index sets compared row by row; robust to order)."""
    got, want = np.asarray(got), np.asarray(want)
    hits = sum(len(set(g) & set(w)) for g, w in zip(got.tolist(), want.tolist()))
    return 1.0 - hits / want.size


def _logsumexp_rows(x, y):
    f = -sqdist(x, y)
    top = f.max(1, keepdims=True)
    return top + np.log(np.exp(f - top).sum(1, keepdims=True))


# The core cases --------------------------------------------------------------------------------------------

register_case(Case(
    name="gaussian_sum",
    formula="Exp(-SqDist(x, y)) * b",
    aliases=lambda d: [f"x = Vi({d})", f"y = Vj({d})", "b = Vj(1)"],
    reduction="Sum",
    data=lambda rng, n, m, d: (*points(rng, n, m, d), rng.standard_normal((m, 1))),
    reference=lambda x, y, b: chunked_rows(lambda xs, y, b: np.exp(-sqdist(xs, y)) @ b, x, y, b),
    error=max_relative_error,
))

register_case(Case(
    name="logsumexp",
    formula="-SqDist(x, y)",
    aliases=lambda d: [f"x = Vi({d})", f"y = Vj({d})"],
    reduction="LogSumExp",
    data=lambda rng, n, m, d: points(rng, n, m, d),
    reference=lambda x, y: chunked_rows(_logsumexp_rows, x, y),
    error=max_relative_error,
))

register_case(Case(
    name="argkmin",
    formula="SqDist(x, y)",
    aliases=lambda d: [f"x = Vi({d})", f"y = Vj({d})"],
    reduction="ArgKMin",
    opt_arg=10,
    data=lambda rng, n, m, d: points(rng, n, m, d),
    reference=lambda x, y: chunked_rows(lambda xs, y: np.argsort(sqdist(xs, y), axis=1, kind="stable")[:, :10], x, y),
    error=knn_miss_rate,
    error_kind="k-NN miss rate",
))
