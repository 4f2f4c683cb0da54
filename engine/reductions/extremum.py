"""Min, Max and their indices, elementwise over the formula's components: state (value, index)."""
from __future__ import annotations

import numpy as np

from .base import INDEX_DTYPE, NO_INDEX, Reduction, block, c_before


class Extremum(Reduction):
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
        pick = np.argmax if self.largest else np.argmin      # the first NaN, else the first extreme value
        idx = pick(f, axis=1)
        value = np.take_along_axis(f, idx[:, None, :], axis=1)[:, 0, :]
        return (value, idx.astype(INDEX_DTYPE) + j0)

    def merge(self, a, b):
        (av, ai), (bv, bi) = a, b
        a_nan, b_nan = np.isnan(av), np.isnan(bv)
        better = (bv > av) if self.largest else (bv < av)
        tie = ((bv == av) | (a_nan & b_nan)) & (bi < ai)
        take_b = better | (b_nan & ~a_nan) | tie
        return (np.where(take_b, bv, av), np.where(take_b, bi, ai))

    def finalize(self, state, dtype):
        value, index = state
        out = {"value": value.astype(dtype, copy=False), "index": np.where(index == NO_INDEX, -1, index)}
        results = tuple(out[kind] for kind in self.emits)
        return results[0] if len(results) == 1 else results

    def c_init(self, s):
        inf = "-KRED_INF" if self.largest else "KRED_INF"
        return [line for k in range(self.fdim) for line in (f"{s(0, str(k))} = {inf};", f"{s(1, str(k))} = KRED_NO_INDEX;")]

    def c_start(self, s, first):
        # (identity, first column): right whenever the result stays the identity (every column equal to it gives
        # the lowest index), so the strict comparison below needs no tie test with the identity
        return [f"{s(1, str(k))} = {first};" for k in range(self.fdim)]

    def c_accumulate(self, s, f, f2, j):
        # j is larger than the state's index (see Reduction.c_accumulate): a tie keeps the state, a NaN state stays
        cmp = ">" if self.largest else "<"
        lines = []
        for k in range(self.fdim):
            v, i = s(0, str(k)), s(1, str(k))
            lines += block([f"const kred_real sel_v = {f[k]};",
                            f"const int take = sel_v {cmp} {v} || (sel_v != sel_v && {v} == {v});",
                            f"{v} = take ? sel_v : {v};", f"{i} = take ? (kred_index)({j}) : {i};"])
        return lines

    def c_merge(self, a, b):
        lines = []
        for k in range(self.fdim):
            av, ai, bv, bi = a(0, str(k)), a(1, str(k)), b(0, str(k)), b(1, str(k))
            lines += block([f"const int take = {c_before(bv, bi, av, ai, self.largest)};",
                            f"{av} = take ? {bv} : {av};", f"{ai} = take ? {bi} : {ai};"])
        return lines

    def c_finalize(self, s, out):
        lines = []
        for o, kind in enumerate(self.emits):
            for k in range(self.fdim):
                if kind == "value":
                    lines.append(f"{out(o, str(k))} = {s(0, str(k))};")
                else:
                    idx = s(1, str(k))
                    lines.append(f"{out(o, str(k))} = {idx} == KRED_NO_INDEX ? -1 : {idx};")
        return lines


class Min(Extremum):
    lazy_method = "min"
    gradient_rule, indexed = "selected", "Min_ArgMin"


class Max(Extremum):
    lazy_method = "max"
    largest = True
    gradient_rule, indexed = "selected", "Max_ArgMax"


class ArgMin(Extremum):
    lazy_method = "argmin"
    emits, gradient_rule = ("index",), "zero"


class ArgMax(Extremum):
    lazy_method = "argmax"
    largest, emits, gradient_rule = True, ("index",), "zero"


class Min_ArgMin(Extremum):
    lazy_method = "min_argmin"
    emits = ("value", "index")
    gradient_rule, indexed = "selected", "Min_ArgMin"


class Max_ArgMax(Extremum):
    lazy_method = "max_argmax"
    largest, emits = True, ("value", "index")
    gradient_rule, indexed = "selected", "Max_ArgMax"
