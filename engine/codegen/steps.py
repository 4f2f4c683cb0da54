"""The C steps of a reduction, as the drivers (CPU and CUDA) call them.

Each reduction's steps are part of its one definition in the reduction table (`engine.reductions`: `c_init`,
`c_accumulate`, `c_merge`, `c_finalize`, `c_candidate`), written over the same state layout as its numpy monoid, so a
state built in C merges with states from any backend. This module only gives the drivers one stable entry point per
step and the C types of the state slots.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..reductions import Reduction

State = Callable[[int, str], str]

_CTYPES = {"acc": "kred_acc", "value": "kred_real", "index": "kred_index"}


class Slot(NamedTuple):
    name: str
    width: int
    ctype: str      # kred_acc, kred_real or kred_index


def state_slots(reduction: Reduction) -> list[Slot]:
    return [Slot(name, width, _CTYPES[kind]) for name, width, kind in reduction.layout()]


def working_slots(reduction: Reduction) -> list[Slot]:
    """The slots with the C type a kernel may keep them in while it accumulates (`Reduction.real_slots`: e.g. the
    max of the LogSumExp family is always one of the formula's values, so kred_real holds it exactly)."""
    return [slot._replace(ctype="kred_real") if s in reduction.real_slots else slot
            for s, slot in enumerate(state_slots(reduction))]


def init_steps(reduction: Reduction, state: State, first: str | None = None) -> list[str]:
    """The identity, then (when the driver knows it: `first`, a C expression) the start at the lowest column the
    state will reduce, or KRED_NO_INDEX when it reduces none (Reduction.c_start)."""
    return reduction.c_init(state) + (reduction.c_start(state, first) if first is not None else [])


def accumulate_steps(reduction: Reduction, state: State, f: list[str], f2: list[str] | None, j: str) -> list[str]:
    return reduction.c_accumulate(state, f, f2, j)


def merge_steps(reduction: Reduction, into: State, other: State) -> list[str]:
    return reduction.c_merge(into, other)


def finalize_steps(reduction: Reduction, state: State, out: State) -> list[str]:
    return reduction.c_finalize(state, out)


def candidate_test(reduction: Reduction, state: State, comp: int, value: str) -> str | None:
    """A C condition, false only when `value` of component `comp` (from a later column) leaves the state unchanged;
    None when the reduction has none. Drivers may test a whole chunk of columns with it before accumulating."""
    return reduction.c_candidate(state, comp, value)
