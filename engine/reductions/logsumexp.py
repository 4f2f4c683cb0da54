"""The log-sum-exp family: state (max m, sum of exp(f - m) [, sum of exp(f - m) * f2]), stable in any merge order.

The reductions differ only in their finalize (and gradient rule). NaN and infinities: see engine.reductions.base.
"""
from __future__ import annotations

import numpy as np

from ..errors import DimensionError
from .base import Reduction, block


class LogSumExp(Reduction):
    gradient_rule = "logsumexp"
    weighted_form = "LogSumExpWeight"      # pykeops reads formula2 of a LogSumExp as its weight
    lazy_method = "logsumexp"              # (with weight=, the weighted form)
    real_slots = (0,)      # the max is always one of the formula's values (or -inf): exact in kred_real

    def __post_init__(self):
        if self.weighted and self.fdim != 1:
            raise DimensionError(f"{self.name}: the formula must be scalar (dimension 1), not {self.fdim}")

    def layout(self):
        parts = [("max", self.fdim, "acc"), ("sum", self.fdim, "acc")]
        return parts + ([("weighted", self.f2dim, "acc")] if self.weighted else [])

    # numpy ----------------------------------------------------------------------------------------------------
    def identity(self, n, dtype, acc):
        state = (np.full((n, self.fdim), -np.inf, acc), np.zeros((n, self.fdim), acc))
        return state + ((np.zeros((n, self.f2dim), acc),) if self.weighted else ())

    def tile(self, f, f2, j0, acc):
        f = f.astype(acc, copy=False)
        m = f.max(axis=1)                                   # NaN if any term is NaN
        shift = _shift(m)[:, None, :]
        with np.errstate(invalid="ignore"):
            e = np.exp(np.where(f == shift, 0, f - shift))  # f == m == +inf counts 1, not exp(inf - inf)
        state = (m, e.sum(axis=1))
        return state + (((e * f2).sum(axis=1),) if self.weighted else ())

    def merge(self, a, b):
        m = np.maximum(a[0], b[0])
        shift = _shift(m)
        with np.errstate(invalid="ignore"):
            wa = np.exp(np.where(a[0] == shift, 0, a[0] - shift))
            wb = np.exp(np.where(b[0] == shift, 0, b[0] - shift))
        return (m,) + tuple(x * wa + y * wb for x, y in zip(a[1:], b[1:]))

    def finalize(self, state, dtype):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (state[0] + np.log(state[1])).astype(dtype, copy=False)

    # C ----------------------------------------------------------------------------------------------------------
    def c_init(self, s):
        lines = [f"{s(0, str(k))} = -KRED_ACC_INF; {s(1, str(k))} = 0;" for k in range(self.fdim)]
        if self.weighted:
            lines += [f"{s(2, str(c))} = 0;" for c in range(self.f2dim)]
        return lines

    def c_accumulate(self, s, f, f2, j):
        # One exponential per column: whichever of (old max, new value) is smaller is scaled by exp(-|d|).
        # The exponential is taken in kred_real: its argument carries the rounding of the formula value anyway,
        # and a float32 exp is several times cheaper than a float64 one; the sums stay in kred_acc.
        lines = []
        for k in range(self.fdim):
            m, total = s(0, str(k)), s(1, str(k))
            body = [f"const kred_real v = {f[k]};",
                    f"const kred_real mo = (kred_real){m};",
                    "const int up = v > mo || v != v;           /* a NaN becomes the max: NaN from here on */",
                    "kred_real d = up ? mo - v : v - mo;        /* <= 0 */",
                    "d = v == mo ? (kred_real)0 : d;            /* +inf after +inf counts 1, not exp(NaN) */",
                    "kred_acc e = (kred_acc)kred_exp(d);",
                    "e = v == -KRED_INF ? (kred_acc)0 : e;     /* exp(-inf - m) is 0 even when m = -inf */",
                    f"{m} = up ? v : mo;",
                    f"{total} = up ? {total} * e + 1 : {total} + e;"]
            if self.weighted:
                for c in range(self.f2dim):
                    w = s(2, str(c))
                    body.append(f"{w} = up ? {w} * e + (kred_acc){f2[c]} : {w} + e * (kred_acc){f2[c]};")
            lines += block(body)
        return lines

    def c_merge(self, a, b):
        lines = []
        for k in range(self.fdim):
            am, bm = a(0, str(k)), b(0, str(k))
            body = [f"const kred_acc m = kred_acc_max({am}, {bm});",
                    "const kred_acc shift = m == -KRED_ACC_INF ? (kred_acc)0 : m;",
                    f"const kred_acc wa = {am} == shift ? (kred_acc)1 : kred_acc_exp({am} - shift);",
                    f"const kred_acc wb = {bm} == shift ? (kred_acc)1 : kred_acc_exp({bm} - shift);",
                    f"{a(1, str(k))} = {a(1, str(k))} * wa + {b(1, str(k))} * wb;"]
            if self.weighted:
                body += [f"{a(2, str(c))} = {a(2, str(c))} * wa + {b(2, str(c))} * wb;" for c in range(self.f2dim)]
            body.append(f"{am} = m;")
            lines += block(body)
        return lines

    def c_finalize(self, s, out):
        return [f"{out(0, str(k))} = (kred_real)({s(0, str(k))} + kred_acc_log({s(1, str(k))}));"
                for k in range(self.fdim)]


def _shift(m):
    """The max used to shift exponents: 0 where the max is -inf (an empty or all -inf row)."""
    return np.where(np.isneginf(m), 0, m)


class LogSumExpWeight(LogSumExp):
    weighted = True
    gradient_rule = "logsumexp_weight"
    lazy_method = None                      # LazyTensor.logsumexp(weight=)

    @property
    def outputs(self):
        return [("value", self.f2dim)]

    def finalize(self, state, dtype):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (state[0] + np.log(state[2])).astype(dtype, copy=False)

    def c_finalize(self, s, out):
        return [f"{out(0, str(c))} = (kred_real)({s(0, '0')} + kred_acc_log({s(2, str(c))}));"
                for c in range(self.f2dim)]


class SumSoftMaxWeight(LogSumExp):
    weighted = True
    empty_ok = False
    gradient_rule = "softmax_weight"
    lazy_method = "sumsoftmaxweight"

    @property
    def outputs(self):
        return [("value", self.f2dim)]

    def finalize(self, state, dtype):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (state[2] / state[1]).astype(dtype, copy=False)

    def c_finalize(self, s, out):
        return [f"{out(0, str(c))} = (kred_real)({s(2, str(c))} / {s(1, '0')});" for c in range(self.f2dim)]


class Max_SumShiftExp(LogSumExp):
    gradient_rule = None      # a building block: no gradient rule
    weighted_form = lazy_method = None

    @property
    def outputs(self):
        return [("value", 2 * self.fdim)]

    def finalize(self, state, dtype):
        return np.concatenate([state[0], state[1]], axis=1).astype(dtype, copy=False)

    def c_finalize(self, s, out):
        d = self.fdim
        return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(d)] + \
               [f"{out(0, str(d + k))} = (kred_real){s(1, str(k))};" for k in range(d)]


class Max_SumShiftExpWeight(LogSumExp):
    weighted = True
    gradient_rule = lazy_method = None

    @property
    def outputs(self):
        return [("value", self.fdim + self.f2dim)]

    def finalize(self, state, dtype):
        return np.concatenate([state[0], state[2]], axis=1).astype(dtype, copy=False)

    def c_finalize(self, s, out):
        d = self.fdim
        return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(d)] + \
               [f"{out(0, str(d + c))} = (kred_real){s(2, str(c))};" for c in range(self.f2dim)]
