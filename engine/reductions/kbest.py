"""The K smallest (KMin) or K largest (KMax) values per component, sorted, with their indices.

State (value, index), each of width K * dim: entry [q * dim + c] is the q-th selected value of component c (the numpy
state has shape (n, K, dim)). The order is the selection order of `engine.reductions.base` (NaN first, ties to the
lower index), so the C insertion and the numpy sort agree element by element.
"""
from __future__ import annotations

import numpy as np

from .base import INDEX_DTYPE, NO_INDEX, Reduction, block, c_before, sort_key

UNROLLED_K = 16     # up to this K, insertion uses constant indices only: the list stays in registers on a GPU


class KBest(Reduction):
    needs_k = True
    empty_ok = False
    largest = False
    emits = ("value",)
    strategy = "rows"       # almost every column fails the K-th-best test (c_candidate): skip chunks, insert rarely

    @property
    def outputs(self):
        return [(kind, self.k * self.fdim) for kind in self.emits]

    def layout(self):
        return [("value", self.k * self.fdim, "value"), ("index", self.k * self.fdim, "index")]

    # numpy ----------------------------------------------------------------------------------------------------
    def identity(self, n, dtype, acc):
        fill = -np.inf if self.largest else np.inf
        return (np.full((n, self.k, self.fdim), fill, dtype), np.full((n, self.k, self.fdim), NO_INDEX, INDEX_DTYPE))

    def tile(self, f, f2, j0, acc):
        idx = np.broadcast_to(np.arange(j0, j0 + f.shape[1], dtype=INDEX_DTYPE)[None, :, None], f.shape)
        return self._sorted(f, idx)

    def merge(self, a, b):
        return self._sorted(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1))

    def _sorted(self, values, index):
        rank, key = sort_key(values, self.largest)
        order = np.lexsort((index, key, rank), axis=1)[:, :self.k, :]
        values, index = np.take_along_axis(values, order, 1), np.take_along_axis(index, order, 1)
        short = self.k - values.shape[1]
        if short > 0:
            n, _, d = values.shape
            fill = -np.inf if self.largest else np.inf
            values = np.concatenate([values, np.full((n, short, d), fill, values.dtype)], 1)
            index = np.concatenate([index, np.full((n, short, d), NO_INDEX, INDEX_DTYPE)], 1)
        return values, index

    def finalize(self, state, dtype):
        n = state[0].shape[0]
        value, index = state[0].reshape(n, -1), state[1].reshape(n, -1)
        out = {"value": value.astype(dtype, copy=False), "index": np.where(index == NO_INDEX, -1, index)}
        results = tuple(out[kind] for kind in self.emits)
        return results[0] if len(results) == 1 else results

    # C ----------------------------------------------------------------------------------------------------------
    def _before(self, v, i, w, wi, eager=False):
        return c_before(v, i, w, wi, self.largest, eager)

    def c_init(self, s):
        inf = "-KRED_INF" if self.largest else "KRED_INF"
        return [f"for (int q = 0; q < {self.k * self.fdim}; q++) {{ {s(0, 'q')} = {inf}; {s(1, 'q')} = KRED_NO_INDEX; }}"]

    def c_candidate(self, s, comp, value):
        # a later column has a larger index, so it enters only if better than the K-th or equal to it (the K-th may
        # be the identity), or NaN: the negated comparison is true for all of these in one (unordered) test
        last = s(0, str((self.k - 1) * self.fdim + comp))
        return f"!({value} {'<' if self.largest else '>'} {last})"

    def c_accumulate(self, s, f, f2, j):
        k, d = self.k, self.fdim
        lines = []
        for c in range(d):
            def at(q):
                return f"({q}) * {d} + {c}" if d > 1 else str(q)
            # One comparison against the K-th best rejects almost every column once the list has filled; on that
            # path nothing else runs (the index is formed, and the list touched, only inside the branch).
            insertion = ([f"const kred_index ix = (kred_index)({j});",
                          f"if ({self._before('v', 'ix', s(0, at(k - 1)), s(1, at(k - 1)))}) {{"]
                         + ["    " + line for line in (self._shift(s, at) if k <= UNROLLED_K
                                                       else self._shift_loop(s, at))]
                         + ["}"])
            lines += block([f"const kred_real v = {f[c]};", f"if ({self.c_candidate(s, c, 'v')}) {{"]
                           + ["    " + line for line in insertion] + ["}"])
        return lines

    def _shift(self, s, at) -> list[str]:
        """Insert (v, ix), known to sort before the K-th entry, by a bounded shift over constant slots (the list
        stays in registers on a GPU): from the top, slot q takes slot q-1 if (v, ix) sorts before it, else (v, ix)
        if (v, ix) sorts before slot q itself, else keeps its entry. Selects only: no branch, no divergence."""
        lines = ["int below = 1;   /* (v, ix) sorts before the old entry of the slot being written */"]
        for q in range(self.k - 1, 0, -1):
            up, here = at(q - 1), at(q)
            lines += [f"{{ const int up = {self._before('v', 'ix', s(0, up), s(1, up), eager=True)};",
                      f"  {s(0, here)} = up ? {s(0, up)} : below ? v : {s(0, here)};",
                      f"  {s(1, here)} = up ? {s(1, up)} : below ? ix : {s(1, here)};",
                      "  below = up; }"]
        lines += [f"if (below) {{ {s(0, at(0))} = v; {s(1, at(0))} = ix; }}"]
        return lines

    def _shift_loop(self, s, at) -> list[str]:
        """The same insertion for large K, with a variable slot (the list lives in memory then)."""
        return [f"int p = {self.k - 1};",
                f"while (p > 0 && {self._before('v', 'ix', s(0, at('p - 1')), s(1, at('p - 1')))}) {{",
                f"    {s(0, at('p'))} = {s(0, at('p - 1'))}; {s(1, at('p'))} = {s(1, at('p - 1'))}; p--;",
                "}",
                f"{s(0, at('p'))} = v; {s(1, at('p'))} = ix;"]

    def c_merge(self, a, b):
        k, d = self.k, self.fdim
        at = (lambda q: f"({q}) * {d} + c") if d > 1 else (lambda q: q)
        return block([
            f"for (int c = 0; c < {d}; c++) {{" if d > 1 else "{",
            f"    kred_real tv[{k}]; kred_index ti[{k}]; int p = 0, q = 0;",
            f"    for (int t = 0; t < {k}; t++) {{",
            f"        const int fromb = {self._before(b(0, at('q')), b(1, at('q')), a(0, at('p')), a(1, at('p')))};",
            f"        tv[t] = fromb ? {b(0, at('q'))} : {a(0, at('p'))};",
            f"        ti[t] = fromb ? {b(1, at('q'))} : {a(1, at('p'))};",
            "        q += fromb; p += !fromb;",
            "    }",
            f"    for (int t = 0; t < {k}; t++) {{ {a(0, at('t'))} = tv[t]; {a(1, at('t'))} = ti[t]; }}",
            "}"])

    def c_finalize(self, s, out):
        n = self.k * self.fdim
        lines = []
        for o, kind in enumerate(self.emits):
            if kind == "value":
                lines.append(f"for (int q = 0; q < {n}; q++) {out(o, 'q')} = {s(0, 'q')};")
            else:
                lines.append(f"for (int q = 0; q < {n}; q++) "
                             f"{out(o, 'q')} = {s(1, 'q')} == KRED_NO_INDEX ? -1 : {s(1, 'q')};")
        return lines


class KMin(KBest):
    lazy_method = "Kmin"
    gradient_rule, indexed = "selected", "KMin_ArgKMin"


class ArgKMin(KBest):
    lazy_method = "argKmin"
    emits, gradient_rule = ("index",), "zero"


class KMin_ArgKMin(KBest):
    lazy_method = "Kmin_argKmin"
    emits = ("value", "index")
    gradient_rule, indexed = "selected", "KMin_ArgKMin"


class KMax(KBest):
    lazy_method = "Kmax"
    largest = True
    gradient_rule, indexed = "selected", "KMax_ArgKMax"


class ArgKMax(KBest):
    lazy_method = "argKmax"
    largest, emits, gradient_rule = True, ("index",), "zero"


class KMax_ArgKMax(KBest):
    lazy_method = "Kmax_argKmax"
    largest, emits = True, ("value", "index")
    gradient_rule, indexed = "selected", "KMax_ArgKMax"
