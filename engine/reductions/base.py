"""What every reduction definition holds, the semantics they all follow, and the C helpers they share.

A reduction is one class (a row of the reduction table, `engine.reductions.REDUCTIONS`) holding everything about it:

- its **numpy monoid** over partial states (a state is a tuple of arrays whose first axis is the output row):
  `identity(n)`, `tile(f, f2, j0)` (the state of formula values `f` (n, t, dim) whose first column is index j0),
  `merge(a, b)` (associative: used between tiles, kernel parts, GPU blocks, grid items, shards and nodes alike),
  `finalize(state)`;
- its **C steps** over the same state layout (`layout()`), target-neutral C used by the CPU and CUDA drivers:
  `c_init`, `c_start` (run after `c_init` once the lowest column the state will reduce is known), `c_accumulate`,
  `c_merge`, `c_finalize`, and `c_candidate` (the test that lets a driver skip a chunk of columns that cannot change
  the state). A state built in C merges with states from any backend. Drivers call these methods directly
  (`plan.reduction.c_accumulate(...)`), with the slots' C types from `slots()` / `working_slots()`;
- its **CPU strategy** (`strategy`): "lanes" (each SIMD lane accumulates its own state over a chunk of columns, the
  lanes merged at the end: the cheap, data-parallel steps) or "rows" (a group of rows sweeps a chunk, tested first
  with `c_candidate`, and only chunks holding a candidate run the scalar accumulate: the K-best insertion);
- its **output facts**: `outputs` (kind and width of each result), `needs_k`, `weighted` (takes formula2),
  `empty_ok` (may reduce over an empty axis), `linear` (complex formulas give complex results), `weighted_form`
  (what a call with formula2 reduces);
- its **LazyTensor spelling** (`lazy_method`: "sum", "argKmin", ...), from which the LazyTensor front end makes its
  reduction methods (engine.lazytensor);
- its **gradient rule**: `gradient_rule` names the rule of `engine.reductions.gradients` ("sum", "logsumexp",
  "logsumexp_weight", "softmax_weight", "selected", "zero"; None: no gradient), and `indexed` the reduction that also
  returns the selected indices, which a "selected" gradient gathers through.

Semantics, identical on every backend (numpy here, the C steps on CPU and CUDA):
- Selecting reductions (Min, Max, KMin, KMax and their Arg variants) order values with NaN as the most extreme value
  (it is selected before any number); ties (equal values, or two NaNs) go to the lower index, whatever the order in
  which columns or states arrive. Infinities are ordinary values: a column equal to the identity (+inf for Min) is
  still selected with its index (ArgMin over all-+inf values is 0). Index -1 means that no column was reduced.
- LogSumExp family, state (max m, sum of exp(f - m) [, weighted sum]): a NaN term makes m and the sums NaN; +inf
  terms give m = +inf and sum = their count (so LogSumExp = +inf); -inf terms add nothing; no terms (or only -inf):
  m = -inf, sum 0 (LogSumExp = -inf).
- Sum follows IEEE arithmetic, accumulated in `acc` (float64 for float32 input under dtype_acc="auto").

C steps use accessors chosen by the driver: `state(slot, comp)` -> an lvalue (slot indexes `layout()`, comp is a C
integer expression as a string) and, for finalize, `out(o, comp)` -> an lvalue for output `o` of `outputs`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, NamedTuple

import numpy as np

INDEX_DTYPE = np.int64
NO_INDEX = np.iinfo(np.int64).max     # index slot of an empty state; finalized to -1

State = Callable[[int, str], str]

_CTYPES = {"acc": "kred_acc", "value": "kred_real", "index": "kred_index"}


class Slot(NamedTuple):
    """One slot of a state as C sees it."""
    name: str
    width: int
    ctype: str      # kred_acc, kred_real or kred_index


@dataclass(frozen=True)
class Reduction(ABC):
    """A reduction bound to its formula dimensions (and K)."""
    name: str
    fdim: int
    f2dim: int | None = None
    k: int | None = None

    needs_k = False
    weighted = False
    linear: ClassVar[bool] = False              # linear in the formula's values: a complex formula gives complex values
    weighted_form: ClassVar[str | None] = None  # the reduction a pykeops call with formula2 means (LogSumExp's weight)
    empty_ok = True          # may it reduce over an empty axis (giving `identity` finalized)?
    gradient_rule: ClassVar[str | None] = None
    indexed: ClassVar[str | None] = None        # for gradient_rule "selected": the reduction returning indices too
    real_slots: ClassVar[tuple[int, ...]] = ()  # state slots a kernel may hold in kred_real while it accumulates
    strategy: ClassVar[Literal["lanes", "rows"]] = "lanes"  # the CPU driver's loop (see above); "rows" needs c_candidate
    lazy_method: ClassVar[str | None] = None    # pykeops's LazyTensor method for it (also as `<method>_reduction`)

    def __post_init__(self):
        """Subclasses check their dimensions here (the dataclass __init__ calls it only if the base defines it)."""

    @property
    def uses_formula2(self) -> bool:
        return self.weighted

    # What the user gets: a list of (kind, width); kind "value" has the input dtype, "index" is int64.
    @property
    def outputs(self) -> list[tuple[str, int]]:
        return [("value", self.fdim)]

    @property
    def out_dim(self) -> int:
        return sum(width for _, width in self.outputs)

    # numpy monoid ---------------------------------------------------------------------------------------------
    @abstractmethod
    def layout(self) -> list[tuple[str, int, str]]:
        """(name, width, kind) of each state slot; kind is "acc", "value" (input dtype) or "index"."""

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

    # C steps --------------------------------------------------------------------------------------------------
    def slots(self) -> list[Slot]:
        """The state's slots (`layout()`) with their C types."""
        return [Slot(name, width, _CTYPES[kind]) for name, width, kind in self.layout()]

    def working_slots(self) -> list[Slot]:
        """The slots with the C type a kernel may keep them in while it accumulates (`real_slots`: e.g. the max of
        the LogSumExp family is always one of the formula's values, so kred_real holds it exactly)."""
        return [slot._replace(ctype="kred_real") if s in self.real_slots else slot for s, slot in enumerate(self.slots())]

    @abstractmethod
    def c_init(self, state: State) -> list[str]:
        ...

    def c_start(self, state: State, first: str) -> list[str]:
        """Steps run after `c_init` by a driver that knows `first` (a C expression): the lowest column index the
        state will reduce, or KRED_NO_INDEX when it reduces none. Lets a state start as if that column had been
        accumulated with the identity's value, so that accumulate needs no test for ties with the identity."""
        return []

    @abstractmethod
    def c_accumulate(self, state: State, f: list[str], f2: list[str] | None, j: str) -> list[str]:
        """Fold the value f (one C expression per component) of column j (a C expression) into the state. Drivers
        accumulate a state's columns in increasing order (the grid sorts a block's column ranges), so j is larger
        than every index the state already holds; states that met columns in another order meet through merge."""

    @abstractmethod
    def c_merge(self, into: State, other: State) -> list[str]:
        ...

    @abstractmethod
    def c_finalize(self, state: State, out: State) -> list[str]:
        ...

    def c_candidate(self, state: State, comp: int, value: str) -> str | None:
        """A C condition that is false only when `value` (component `comp`) of a later column leaves the state
        unchanged, or None when the reduction has no such test. Drivers test a whole chunk of columns with it
        before running the accumulate steps."""
        return None


def merge_all(reduction: Reduction, states: list[tuple]) -> tuple:
    """Merge any number of states pairwise (a balanced tree keeps float error low)."""
    while len(states) > 1:
        states = [reduction.merge(states[k], states[k + 1]) if k + 1 < len(states) else states[k]
                  for k in range(0, len(states), 2)]
    return states[0]


def block(lines: list[str]) -> list[str]:
    """C statements in their own scope."""
    return ["{"] + ["    " + line for line in lines] + ["}"]


def c_before(v: str, i: str, w: str, wi: str, largest: bool, eager: bool = False) -> str:
    """C: (v, i) is selected before (w, wi) (see the semantics above): more extreme, NaN first, ties by index.
    `eager` evaluates every comparison (bitwise operators on their 0/1 results): predicates, no branches."""
    cmp = ">" if largest else "<"
    lor, land = (" | ", " & ") if eager else (" || ", " && ")
    return (f"(({v} {cmp} {w}){lor}(({v} != {v}){land}({w} == {w})){lor}"
            f"((({v} == {w}){lor}(({v} != {v}){land}({w} != {w}))){land}({i} < {wi})))")


def sort_key(values: np.ndarray, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """numpy: (rank, key) arrays such that ordering by rank, then key, then index is the selection order."""
    return ~np.isnan(values), (-values if largest else values)
