"""Sum: state (sum,) in the accumulator type."""
from __future__ import annotations

import numpy as np

from .base import Reduction


class Sum(Reduction):
    gradient_rule = "sum"
    lazy_method = "sum"
    linear = True

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

    def c_init(self, s):
        return [f"{s(0, str(k))} = 0;" for k in range(self.fdim)]

    def c_accumulate(self, s, f, f2, j):
        return [f"{s(0, str(k))} += (kred_acc){f[k]};" for k in range(self.fdim)]

    def c_merge(self, a, b):
        return [f"{a(0, str(k))} += {b(0, str(k))};" for k in range(self.fdim)]

    def c_finalize(self, s, out):
        return [f"{out(0, str(k))} = (kred_real){s(0, str(k))};" for k in range(self.fdim)]
