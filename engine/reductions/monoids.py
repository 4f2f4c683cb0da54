"""Reductions as monoids over partial states.

A state is a tuple of arrays whose first axis is the output row. Every reduction has
- `identity(n)`: the state of an empty reduction for n rows,
- `tile(f, f2, j0)`: the state of one tile of formula values `f` (n, t, dim) whose first column is global index j0,
- `merge(a, b)`: combine two states (associative; used between tiles, GPU blocks, shards and nodes alike),
- `finalize(state)`: the user-facing result.
`layout` names the state's arrays with their width and kind, which is what the C emitter and the cluster transport
need to know. Sums accumulate in `acc` (float64 for float32 input under dtype_acc="auto").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import DimensionError

INDEX_DTYPE = np.int64
NO_INDEX = np.iinfo(np.int64).max     # index slot of an empty state; finalized to -1


@dataclass(frozen=True)
class Reduction(ABC):
    """A reduction bound to its formula dimensions (and K)."""
    name: str
    fdim: int
    f2dim: int | None = None
    k: int | None = None

    uses_formula2 = False
    needs_k = False
    empty_ok = True        # may it reduce over an empty axis (giving `identity` finalized)?
    differentiable = True

    def __post_init__(self):
        """Subclasses check their dimensions here (the dataclass __init__ calls it only if the base defines it)."""

    # What the user gets: a list of (kind, width); kind "value" has the input dtype, "index" is int64.
    @property
    def outputs(self) -> list[tuple[str, int]]:
        return [("value", self.fdim)]

    @property
    def out_dim(self) -> int:
        return sum(width for _, width in self.outputs)

    @abstractmethod
    def layout(self) -> list[tuple[str, int, str]]:
        ...

    @abstractmethod
    def identity(self, n: int, dtype, acc) -> tuple:
        ...

    @abstractmethod
    def tile(self, f, f2, j0: int, acc) -> tuple:
        ...

    @abstractmethod
    def merge(self, a: tuple, b: tuple) -> tuple:
        ...

    @abstractmethod
    def finalize(self, state: tuple, dtype):
        ...


def merge_all(reduction: Reduction, states: list[tuple]) -> tuple:
    """Merge any number of states pairwise (a balanced tree keeps float error low)."""
    while len(states) > 1:
        states = [reduction.merge(states[k], states[k + 1]) if k + 1 < len(states) else states[k]
                  for k in range(0, len(states), 2)]
    return states[0]


# Sum ------------------------------------------------------------------------------------------------

class Sum(Reduction):
    def layout(self):
        return [("sum", self.fdim, "acc")]

    def identity(self, n, dtype, acc):
        return (np.zeros((n, self.fdim), acc),)

    def tile(self, f, f2, j0, acc):
        return (f.sum(axis=1, dtype=acc),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def finalize(self, state, dtype):
        return state[0].astype(dtype, copy=False)


# Min / Max and their indices -------------------------------------------------------------------------

class Extremum(Reduction):
    """Min, Max, ArgMin, ArgMax, Min_ArgMin, Max_ArgMax: elementwise over the formula's components."""
    largest = False
    emits = ("value",)       # which of value / index the user gets

    @property
    def outputs(self):
        return [(kind, self.fdim) for kind in self.emits]

    @property
    def empty_ok(self):
        return "index" not in self.emits

    def layout(self):
        return [("value", self.fdim, "value"), ("index", self.fdim, "index")]

    def identity(self, n, dtype, acc):
        fill = -np.inf if self.largest else np.inf
        return (np.full((n, self.fdim), fill, dtype), np.full((n, self.fdim), NO_INDEX, INDEX_DTYPE))

    def tile(self, f, f2, j0, acc):
        pick = np.argmax if self.largest else np.argmin
        idx = pick(f, axis=1)
        value = np.take_along_axis(f, idx[:, None, :], axis=1)[:, 0, :]
        return (value, idx.astype(INDEX_DTYPE) + j0)

    def merge(self, a, b):
        better = (b[0] > a[0]) if self.largest else (b[0] < a[0])
        tie = (b[0] == a[0]) & (b[1] < a[1])            # ties go to the smaller index, whatever the order
        take_b = better | tie | (np.isnan(b[0]) & ~np.isnan(a[0]))
        return (np.where(take_b, b[0], a[0]), np.where(take_b, b[1], a[1]))

    def finalize(self, state, dtype):
        value, index = state
        index = np.where(index == NO_INDEX, -1, index)
        out = {"value": value.astype(dtype, copy=False), "index": index}
        results = tuple(out[kind] for kind in self.emits)
        return results[0] if len(results) == 1 else results


class Min(Extremum):
    pass


class Max(Extremum):
    largest = True


class ArgMin(Extremum):
    emits = ("index",)
    differentiable = False


class ArgMax(Extremum):
    largest, emits, differentiable = True, ("index",), False


class Min_ArgMin(Extremum):
    emits = ("value", "index")


class Max_ArgMax(Extremum):
    largest, emits = True, ("value", "index")


# K smallest -------------------------------------------------------------------------------------------

class KMin(Reduction):
    """The K smallest values per component, sorted, with their indices. Output layout [k * dim + c]."""
    needs_k = True
    empty_ok = False
    emits = ("value",)

    @property
    def outputs(self):
        return [(kind, self.k * self.fdim) for kind in self.emits]

    def layout(self):
        return [("value", self.k * self.fdim, "value"), ("index", self.k * self.fdim, "index")]

    def identity(self, n, dtype, acc):
        return (np.full((n, self.k, self.fdim), np.inf, dtype),
                np.full((n, self.k, self.fdim), NO_INDEX, INDEX_DTYPE))

    def tile(self, f, f2, j0, acc):
        n, t, d = f.shape
        idx = np.broadcast_to(np.arange(j0, j0 + t, dtype=INDEX_DTYPE)[None, :, None], f.shape)
        if t > self.k:  # keep the K smallest of the tile before sorting
            part = np.argpartition(f, self.k - 1, axis=1)[:, :self.k, :]
            f, idx = np.take_along_axis(f, part, 1), np.take_along_axis(idx, part, 1)
        return self._sorted(f, idx)

    def merge(self, a, b):
        return self._sorted(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1))

    def _sorted(self, values, index):
        order = np.lexsort((index, values), axis=1)[:, :self.k, :]     # by value, ties by index
        values, index = np.take_along_axis(values, order, 1), np.take_along_axis(index, order, 1)
        short = self.k - values.shape[1]
        if short > 0:
            n, _, d = values.shape
            values = np.concatenate([values, np.full((n, short, d), np.inf, values.dtype)], 1)
            index = np.concatenate([index, np.full((n, short, d), NO_INDEX, INDEX_DTYPE)], 1)
        return values, index

    def finalize(self, state, dtype):
        n = state[0].shape[0]
        value, index = state[0].reshape(n, -1), state[1].reshape(n, -1)
        out = {"value": value.astype(dtype, copy=False), "index": np.where(index == NO_INDEX, -1, index)}
        results = tuple(out[kind] for kind in self.emits)
        return results[0] if len(results) == 1 else results


class ArgKMin(KMin):
    emits = ("index",)
    differentiable = False


class KMin_ArgKMin(KMin):
    emits = ("value", "index")


# Log-sum-exp family -----------------------------------------------------------------------------------

class LogSumExp(Reduction):
    """State (max m, sum of exp(f - m)[, sum of exp(f - m) * f2]): stable in any merge order."""
    weighted = False

    def __post_init__(self):
        if self.weighted and self.fdim != 1:
            raise DimensionError(f"{self.name}: the formula must be scalar (dimension 1), not {self.fdim}")

    @property
    def uses_formula2(self):
        return self.weighted

    @property
    def outputs(self):
        return [("value", self.fdim)]

    def layout(self):
        parts = [("max", self.fdim, "acc"), ("sum", self.fdim, "acc")]
        return parts + ([("weighted", self.f2dim, "acc")] if self.weighted else [])

    def identity(self, n, dtype, acc):
        state = (np.full((n, self.fdim), -np.inf, acc), np.zeros((n, self.fdim), acc))
        return state + ((np.zeros((n, self.f2dim), acc),) if self.weighted else ())

    def tile(self, f, f2, j0, acc):
        f = f.astype(acc, copy=False)
        m = f.max(axis=1)
        e = np.exp(f - _shift(m)[:, None, :])
        state = (m, e.sum(axis=1))
        return state + (((e * f2).sum(axis=1),) if self.weighted else ())

    def merge(self, a, b):
        m = np.maximum(a[0], b[0])
        shift = _shift(m)
        wa, wb = np.exp(a[0] - shift), np.exp(b[0] - shift)
        return (m,) + tuple(x * wa + y * wb for x, y in zip(a[1:], b[1:]))

    def finalize(self, state, dtype):
        with np.errstate(divide="ignore"):
            return (state[0] + np.log(state[1])).astype(dtype, copy=False)


def _shift(m):
    """The max used to shift exponents: 0 where the max is -inf (an empty or all -inf row)."""
    return np.where(np.isneginf(m), 0, m)


class LogSumExpWeight(LogSumExp):
    weighted = True

    @property
    def outputs(self):
        return [("value", self.f2dim)]

    def finalize(self, state, dtype):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (state[0] + np.log(state[2])).astype(dtype, copy=False)


class SumSoftMaxWeight(LogSumExp):
    weighted = True
    empty_ok = False

    @property
    def outputs(self):
        return [("value", self.f2dim)]

    def finalize(self, state, dtype):
        return (state[2] / state[1]).astype(dtype, copy=False)


class Max_SumShiftExp(LogSumExp):
    @property
    def outputs(self):
        return [("value", 2 * self.fdim)]

    def finalize(self, state, dtype):
        return np.concatenate([state[0], state[1]], axis=1).astype(dtype, copy=False)


class Max_SumShiftExpWeight(LogSumExp):
    weighted = True

    @property
    def outputs(self):
        return [("value", self.fdim + self.f2dim)]

    def finalize(self, state, dtype):
        return np.concatenate([state[0], state[2]], axis=1).astype(dtype, copy=False)


REDUCTIONS: dict[str, type[Reduction]] = {cls.__name__: cls for cls in (
    Sum, LogSumExp, LogSumExpWeight, SumSoftMaxWeight, Max_SumShiftExp, Max_SumShiftExpWeight,
    Min, Max, ArgMin, ArgMax, Min_ArgMin, Max_ArgMax, KMin, ArgKMin, KMin_ArgKMin)}
