"""The `grad` request form: sum_r <cotangent_r, d result_r / d argument>, computed with numpy and any executor.

The assembly is engine/reductions/vjp.py's (the same code as the torch backward); every reduction it needs goes
through the service's executor, so gradients run on the cluster like any other request.
"""
from __future__ import annotations

import numpy as np

from kred.engine.errors import ArgumentError
from kred.engine.plan import Plan
from kred.engine.reductions.vjp import vjp

__all__ = ["check_cotangent", "vjp"]


def check_cotangent(plan: Plan, cotangent: np.ndarray, rows: int, dtype) -> np.ndarray:
    if cotangent.dtype.kind != "f":
        raise ArgumentError(f"the cotangent must be float32 or float64, got {cotangent.dtype}")
    expected = (rows, plan.out_dim)
    if cotangent.shape != expected and not (cotangent.ndim == 1 and plan.out_dim == 1 and cotangent.size == rows):
        raise ArgumentError(f"the cotangent must have the result's shape {expected}, got {cotangent.shape}")
    return np.ascontiguousarray(cotangent.reshape(expected), dtype=dtype)
