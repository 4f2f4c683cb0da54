"""The `grad` request form: sum_r <cotangent_r, d result_r / d argument>, computed with numpy and any executor.

The rules (which reductions to run) are engine/reductions/gradients.py's; this is their numpy assembly, the twin of
`engine.torch.genred.vjp` without autograd: every reduction it needs goes through the service's executor, so
gradients run on the cluster like any other request.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from kred.engine.errors import ArgumentError
from kred.engine.formula import P
from kred.engine.plan import Plan
from kred.engine.reductions.gradients import COTANGENT, LOGSUMEXP, OUTPUT, ZERO, ReducedGradient, gradient, with_indices


def check_cotangent(plan: Plan, cotangent: np.ndarray, rows: int, dtype) -> np.ndarray:
    if cotangent.dtype.kind != "f":
        raise ArgumentError(f"the cotangent must be float32 or float64, got {cotangent.dtype}")
    expected = (rows, plan.out_dim)
    if cotangent.shape != expected and not (cotangent.ndim == 1 and plan.out_dim == 1 and cotangent.size == rows):
        raise ArgumentError(f"the cotangent must have the result's shape {expected}, got {cotangent.shape}")
    return np.ascontiguousarray(cotangent.reshape(expected), dtype=dtype)


def vjp(plan: Plan, pos: int, arrays: list[np.ndarray], cotangent: np.ndarray, run: Callable) -> np.ndarray:
    """The gradient with respect to argument `pos`, shaped like `arrays[pos]` (arrays as `Plan.check_args` made)."""
    target = arrays[pos]
    rule = gradient(plan, pos)
    if rule is ZERO or rule.plan.formula.op == "Zero":     # index-valued, or the formula ignores this argument
        return np.zeros_like(target)
    if isinstance(rule, ReducedGradient):
        extras = {COTANGENT: lambda: cotangent, OUTPUT: lambda: run(plan, arrays),
                  LOGSUMEXP: lambda: run(rule.logsumexp, arrays)}
        result = run(rule.plan, [*arrays, *(extras[name]() for name in rule.extras)])
        if rule.sum_rows:
            result = result.sum(0)
        return result.reshape(target.shape).astype(target.dtype, copy=False)
    return _selected(rule, plan, pos, arrays, cotangent, run)


def _selected(rule, plan, pos, arrays, cotangent, run) -> np.ndarray:
    """Evaluate Grad(f, v, e) at the (row, selected column) pairs, then add each pair's share where it belongs."""
    _, index = run(with_indices(plan), arrays)
    rows, slots = index.shape
    valid = index >= 0                                  # -1: a row that selected nothing
    flat = np.where(valid, index, 0).reshape(-1)
    args = []
    for spec, array, gathered in zip(rule.plan.args, arrays, rule.gathered):
        if spec.cat == P:
            args.append(array)
        else:
            args.append(np.ascontiguousarray(array[flat] if gathered else np.repeat(array, slots, axis=0)))
    # Slot s of a row holds component s % fdim of the formula: its cotangent is that component alone.
    mask = (np.arange(slots) % rule.fdim)[:, None] == np.arange(rule.fdim)[None, :]
    g = cotangent.reshape(rows, slots) * valid
    e = np.ascontiguousarray((g[:, :, None] * mask).reshape(rows * slots, rule.fdim), dtype=cotangent.dtype)
    pairs = run(rule.plan, [*args, e]).reshape(rows * slots, -1)
    target = arrays[pos]
    if rule.role == "rows":
        result = pairs.reshape(rows, slots, -1).sum(1)
    elif rule.role == "reduced":
        result = np.zeros((target.shape[0], pairs.shape[-1]), pairs.dtype)
        np.add.at(result, flat, pairs)
    else:
        result = pairs.sum(0)
    return result.reshape(target.shape).astype(target.dtype, copy=False)
