"""The C steps of each reduction (init, accumulate, merge, finalize), one definition per reduction family.

They mirror the numpy monoids of `engine.reductions.monoids` and use the same state layout (`layout()`), so a state
built in C merges with states from any backend. Each step returns C statements over accessors chosen by the driver:
`state(slot, comp)` -> an lvalue (slot indexes `state_slots`, comp is a C integer expression as a string) and, for
finalize, `out(o, comp)` -> an lvalue for output `o` of `reduction.outputs`. Steps are target-neutral C (CPU and CUDA).

Ordering conventions, identical to the numpy monoids: ties between equal values go to the smaller index, NaN counts
as the most extreme value for Min/Max (first NaN wins); LogSumExp keeps (max, sum of exp(f - max)).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..errors import BackendError
from ..reductions.monoids import Extremum, KMin, LogSumExp, Reduction, Sum

State = Callable[[int, str], str]

_CTYPES = {"acc": "kred_acc", "value": "kred_real", "index": "kred_index"}


class Slot(NamedTuple):
    name: str
    width: int
    ctype: str      # kred_acc, kred_real or kred_index


def state_slots(reduction: Reduction) -> list[Slot]:
    return [Slot(name, width, _CTYPES[kind]) for name, width, kind in reduction.layout()]


def working_slots(reduction: Reduction) -> list[Slot]:
    """The slots with the C type a kernel may keep them in while it accumulates: the max of the LogSumExp family is
    always one of the formula's values (or -inf), so kred_real holds it exactly (and compares faster)."""
    slots = state_slots(reduction)
    if isinstance(reduction, LogSumExp):
        slots[0] = slots[0]._replace(ctype="kred_real")
    return slots


def _family(reduction: Reduction):
    for family in (Sum, Extremum, KMin, LogSumExp):
        if isinstance(reduction, family):
            return _FAMILIES[family]
    raise BackendError(f"reduction {reduction.name} has no C steps; use backend='reference'")


def init_steps(reduction: Reduction, state: State) -> list[str]:
    return _family(reduction).init(reduction, state)


def accumulate_steps(reduction: Reduction, state: State, f: list[str], f2: list[str] | None, j: str) -> list[str]:
    return _family(reduction).accumulate(reduction, state, f, f2, j)


def merge_steps(reduction: Reduction, into: State, other: State) -> list[str]:
    return _family(reduction).merge(reduction, into, other)


def finalize_steps(reduction: Reduction, state: State, out: State) -> list[str]:
    return _family(reduction).finalize(reduction, state, out)


def skip_bound(reduction: Reduction, state: State, comp: int) -> str | None:
    """A C expression b such that a value f of component `comp` with f > b (or NaN) leaves the state unchanged, or
    None. Drivers may test a whole chunk of columns against it before running the accumulate steps."""
    if isinstance(reduction, KMin):
        return state(0, str((reduction.k - 1) * reduction.fdim + comp))
    return None


def _block(lines: list[str]) -> list[str]:
    return ["{"] + ["    " + line for line in lines] + ["}"]


# Sum ------------------------------------------------------------------------------------------------------

class _Sum:
    @staticmethod
    def init(r, s):
        return [f"{s(0, str(k))} = 0;" for k in range(r.fdim)]

    @staticmethod
    def accumulate(r, s, f, f2, j):
        return [f"{s(0, str(k))} += (kred_acc){f[k]};" for k in range(r.fdim)]

    @staticmethod
    def merge(r, a, b):
        return [f"{a(0, str(k))} += {b(0, str(k))};" for k in range(r.fdim)]

    @staticmethod
    def finalize(r, s, out):
        return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(r.fdim)]


# Min / Max and their indices: slots (value, index) -----------------------------------------------------------

class _Extremum:
    @staticmethod
    def init(r, s):
        inf = "KRED_INF" if not r.largest else "-KRED_INF"
        return [line for k in range(r.fdim) for line in (f"{s(0, str(k))} = {inf};", f"{s(1, str(k))} = KRED_NO_INDEX;")]

    @staticmethod
    def accumulate(r, s, f, f2, j):
        cmp = ">" if r.largest else "<"
        lines = []
        for k in range(r.fdim):
            v, i, x = s(0, str(k)), s(1, str(k)), f[k]
            # strict comparison: among equal values the earlier column stays; a NaN replaces a number
            lines += _block([f"const int take = {x} {cmp} {v} || ({x} != {x} && {v} == {v});",
                             f"{v} = take ? {x} : {v};",
                             f"{i} = take ? (kred_index)({j}) : {i};"])
        return lines

    @staticmethod
    def merge(r, a, b):
        cmp = ">" if r.largest else "<"
        lines = []
        for k in range(r.fdim):
            av, ai, bv, bi = a(0, str(k)), a(1, str(k)), b(0, str(k)), b(1, str(k))
            lines += _block([f"const int take = {bv} {cmp} {av} || ({bv} != {bv} && {av} == {av})"
                             f" || (({bv} == {av} || ({bv} != {bv} && {av} != {av})) && {bi} < {ai});",
                             f"{av} = take ? {bv} : {av};",
                             f"{ai} = take ? {bi} : {ai};"])
        return lines

    @staticmethod
    def finalize(r, s, out):
        lines = []
        for o, kind in enumerate(r.emits):
            for k in range(r.fdim):
                if kind == "value":
                    lines.append(f"{out(o, str(k))} = {s(0, str(k))};")
                else:
                    idx = s(1, str(k))
                    lines.append(f"{out(o, str(k))} = {idx} == KRED_NO_INDEX ? -1 : {idx};")
        return lines


# K smallest: slots (value, index) of width K * fdim, entry [q * fdim + c] is the q-th smallest of component c -----

def _before(v, i, w, wi):
    """(v, i) sorts before (w, wi): by value, ties by index."""
    return f"({v} < {w} || ({v} == {w} && {i} < {wi}))"


UNROLLED_K = 16     # up to this K, insertion uses constant indices only: the list stays in registers on a GPU


def _unrolled_insertion(s, at, k: int) -> list[str]:
    """Insert (v, ix) into the sorted list, top slot first: each slot takes its upper neighbour while (v, ix) sorts
    before it, then (v, ix) itself. The same result as the shifting loop, written without a variable index."""
    lines = ["int placed = 0;"]
    for q in range(k - 1, 0, -1):
        lines += [f"if (!placed) {{",
                  f"    if ({_before('v', 'ix', s(0, at(q - 1)), s(1, at(q - 1)))}) "
                  f"{{ {s(0, at(q))} = {s(0, at(q - 1))}; {s(1, at(q))} = {s(1, at(q - 1))}; }}",
                  f"    else {{ {s(0, at(q))} = v; {s(1, at(q))} = ix; placed = 1; }}",
                  "}"]
    lines.append(f"if (!placed) {{ {s(0, at(0))} = v; {s(1, at(0))} = ix; }}")
    return lines


class _KMin:
    @staticmethod
    def init(r, s):
        n = r.k * r.fdim
        return [f"for (int q = 0; q < {n}; q++) {{ {s(0, 'q')} = KRED_INF; {s(1, 'q')} = KRED_NO_INDEX; }}"]

    @staticmethod
    def accumulate(r, s, f, f2, j):
        k, d = r.k, r.fdim
        lines = []
        for c in range(d):
            def at(q):
                return f"({q}) * {d} + {c}" if d > 1 else str(q)
            last_v, last_i = s(0, at(k - 1)), s(1, at(k - 1))
            if k <= UNROLLED_K:
                lines += _block([f"const kred_real v = {f[c]};", f"const kred_index ix = (kred_index)({j});",
                                 f"if ({_before('v', 'ix', last_v, last_i)}) {{",
                                 *["    " + line for line in _unrolled_insertion(s, at, k)], "}"])
                continue
            # insertion into the sorted list; the first test rejects almost every candidate after a few columns
            lines += _block([
                f"const kred_real v = {f[c]};",
                f"const kred_index ix = (kred_index)({j});",
                f"if ({_before('v', 'ix', last_v, last_i)}) {{",
                f"    int p = {k - 1};",
                f"    while (p > 0 && {_before('v', 'ix', s(0, at('p - 1')), s(1, at('p - 1')))}) {{",
                f"        {s(0, at('p'))} = {s(0, at('p - 1'))}; {s(1, at('p'))} = {s(1, at('p - 1'))}; p--;",
                "    }",
                f"    {s(0, at('p'))} = v; {s(1, at('p'))} = ix;",
                "}"])
        return lines

    @staticmethod
    def merge(r, a, b):
        k, d = r.k, r.fdim
        at = (lambda q: f"({q}) * {d} + c") if d > 1 else (lambda q: q)
        return _block([
            f"for (int c = 0; c < {d}; c++) {{" if d > 1 else "{",
            f"    kred_real tv[{k}]; kred_index ti[{k}]; int p = 0, q = 0;",
            f"    for (int t = 0; t < {k}; t++) {{",
            f"        const int fromb = {_before(b(0, at('q')), b(1, at('q')), a(0, at('p')), a(1, at('p')))};",
            f"        tv[t] = fromb ? {b(0, at('q'))} : {a(0, at('p'))};",
            f"        ti[t] = fromb ? {b(1, at('q'))} : {a(1, at('p'))};",
            "        q += fromb; p += !fromb;",
            "    }",
            f"    for (int t = 0; t < {k}; t++) {{ {a(0, at('t'))} = tv[t]; {a(1, at('t'))} = ti[t]; }}",
            "}"])

    @staticmethod
    def finalize(r, s, out):
        n = r.k * r.fdim
        lines = []
        for o, kind in enumerate(r.emits):
            if kind == "value":
                lines.append(f"for (int q = 0; q < {n}; q++) {out(o, 'q')} = {s(0, 'q')};")
            else:
                lines.append(f"for (int q = 0; q < {n}; q++) "
                             f"{out(o, 'q')} = {s(1, 'q')} == KRED_NO_INDEX ? -1 : {s(1, 'q')};")
        return lines


# Log-sum-exp family: slots (max m, sum of exp(f - m)[, sum of exp(f - m) * f2]) ----------------------------------

class _LogSumExp:
    @staticmethod
    def init(r, s):
        lines = [f"{s(0, str(k))} = -KRED_ACC_INF; {s(1, str(k))} = 0;" for k in range(r.fdim)]
        if r.weighted:
            lines += [f"{s(2, str(c))} = 0;" for c in range(r.f2dim)]
        return lines

    @staticmethod
    def accumulate(r, s, f, f2, j):
        # One exponential per column: whichever of (old max, new value) is smaller is scaled by exp(-|d|).
        # The exponential is taken in kred_real: its argument carries the rounding of the formula value anyway,
        # and a float32 exp is several times cheaper than a float64 one; the sums stay in kred_acc.
        lines = []
        for k in range(r.fdim):
            m, total = s(0, str(k)), s(1, str(k))
            # The max is always one of the formula's values (or -inf), so it is exact in kred_real: comparisons and
            # the exponent are computed in kred_real, only the sums in kred_acc.
            body = [f"const kred_real v = {f[k]};",
                    f"const kred_real mo = (kred_real){m};",
                    "const int up = v > mo;",
                    "const kred_real d = up ? mo - v : v - mo;   /* <= 0, NaN for inf - inf */",
                    "kred_acc e = (kred_acc)kred_exp(d);",
                    "e = v == -KRED_INF ? (kred_acc)0 : e;   /* exp(-inf - m) is 0 even when m = -inf */",
                    f"{m} = up ? v : mo;",
                    f"{total} = up ? {total} * e + 1 : {total} + e;"]
            if r.weighted:
                for c in range(r.f2dim):
                    w = s(2, str(c))
                    body.append(f"{w} = up ? {w} * e + (kred_acc){f2[c]} : {w} + e * (kred_acc){f2[c]};")
            lines += _block(body)
        return lines

    @staticmethod
    def merge(r, a, b):
        lines = []
        for k in range(r.fdim):
            am, bm = a(0, str(k)), b(0, str(k))
            body = [f"const kred_acc m = kred_acc_max({am}, {bm});",
                    "const kred_acc shift = m == -KRED_ACC_INF ? (kred_acc)0 : m;",
                    f"const kred_acc wa = kred_acc_exp({am} - shift), wb = kred_acc_exp({bm} - shift);",
                    f"{a(1, str(k))} = {a(1, str(k))} * wa + {b(1, str(k))} * wb;"]
            if r.weighted:
                body += [f"{a(2, str(c))} = {a(2, str(c))} * wa + {b(2, str(c))} * wb;" for c in range(r.f2dim)]
            body.append(f"{am} = m;")
            lines += _block(body)
        return lines

    @staticmethod
    def finalize(r, s, out):
        name, d, d2 = r.name, r.fdim, r.f2dim
        if name == "LogSumExp":
            return [f"{out(0, str(k))} = (kred_real)({s(0, str(k))} + kred_acc_log({s(1, str(k))}));" for k in range(d)]
        if name == "LogSumExpWeight":
            return [f"{out(0, str(c))} = (kred_real)({s(0, '0')} + kred_acc_log({s(2, str(c))}));" for c in range(d2)]
        if name == "SumSoftMaxWeight":
            return [f"{out(0, str(c))} = (kred_real)({s(2, str(c))} / {s(1, '0')});" for c in range(d2)]
        if name == "Max_SumShiftExp":
            return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(d)] + \
                   [f"{out(0, str(d + k))} = (kred_real){s(1, str(k))};" for k in range(d)]
        if name == "Max_SumShiftExpWeight":
            return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(d)] + \
                   [f"{out(0, str(d + c))} = (kred_real){s(2, str(c))};" for c in range(d2)]
        raise BackendError(f"reduction {name} has no C finalize step; use backend='reference'")


_FAMILIES = {Sum: _Sum, Extremum: _Extremum, KMin: _KMin, LogSumExp: _LogSumExp}
