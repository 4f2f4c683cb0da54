"""The vector-Jacobian product of a reduction, assembled once for every array framework.

`gradient(plan, pos)` (gradients.py) says which reductions give  sum_r <cotangent_r, d result_r / d arg_pos>;
`vjp` runs them and puts the pieces together. It is written against a handful of array primitives (`ArrayOps`),
so the same code serves numpy (the service's `grad` request, with any executor's `run`) and torch (the autograd
backward of engine.torch.Genred, whose `run` is the differentiable reduction itself, so the backward nests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..batch import batch_items, batch_shape
from ..formula import P
from .gradients import COTANGENT, LOGSUMEXP, OUTPUT, ZERO, ReducedGradient, SelectedGradient, gradient, with_indices


@dataclass(frozen=True)
class ArrayOps:
    """What `vjp` needs of an array framework beyond operators, `.reshape` and `.sum`."""
    zeros: Callable[[tuple, Any], Any]              # (shape, like) -> zeros with like's dtype and device
    arange: Callable[[int, Any], Any]               # (n, like) -> 0..n-1 on like's device
    where: Callable[[Any, Any, Any], Any]
    gather: Callable[[Any, Any], Any]               # rows of an array at integer indices
    repeat: Callable[[Any, int], Any]               # each row repeated k times, in place
    scatter_add: Callable[[Any, Any, Any], Any]     # (zeros, indices, rows) -> zeros with rows added at indices
    cast: Callable[[Any, Any], Any]                 # (array, like) -> array in like's dtype, contiguous
    stack: Callable[[list], Any]


def _np_scatter_add(zeros, index, rows):
    np.add.at(zeros, index, rows)
    return zeros


NUMPY = ArrayOps(
    zeros=lambda shape, like: np.zeros(shape, like.dtype), arange=lambda n, like: np.arange(n), where=np.where,
    gather=lambda a, index: a[index], repeat=lambda a, k: np.repeat(a, k, axis=0), scatter_add=_np_scatter_add,
    cast=lambda a, like: np.ascontiguousarray(a, dtype=like.dtype), stack=np.stack)


def fit(grad, shape):
    """A gradient reshaped / summed to an argument's shape (a 1-D variable of dim 1, a (1, D) parameter, batch
    dimensions of size 1 that broadcast)."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    if math.prod(grad.shape) == math.prod(shape):
        return grad.reshape(shape)
    while len(grad.shape) > len(shape):
        grad = grad.sum(0)
    for axis, (have, want) in enumerate(zip(grad.shape, shape)):
        if have != want:                 # a broadcast axis of size 1
            grad = grad.sum(axis, keepdims=True) if isinstance(grad, np.ndarray) else grad.sum(axis, keepdim=True)
    return grad


def vjp(plan, pos: int, arrays: list, cotangent, run: Callable, ops: ArrayOps = NUMPY, output=None, index=None,
        run_pairs: Callable | None = None):
    """sum_r <cotangent_r, d result_r / d arrays[pos]>, shaped like `arrays[pos]`.

    `run(plan, arrays)` computes a reduction with the forward pass's options (`ranges` included); `run_pairs` the
    one-column reductions over selected pairs (no `ranges`; default `run`). `output` (the forward values) and `index` (the indices a selecting
    reduction chose, from `with_indices(plan)`) are reused when the caller kept them, else computed with `run`.
    """
    target = arrays[pos]
    rule = gradient(plan, pos)
    if rule is ZERO or rule.plan.formula.op == "Zero":     # index-valued, or the formula ignores this argument
        return ops.zeros(tuple(target.shape), target)
    if isinstance(rule, ReducedGradient):
        return _reduced(rule, arrays, cotangent, run, ops, target, plan, output)
    if index is None:
        index = run(with_indices(plan), arrays)[1]
    run = run_pairs or run
    batch = batch_shape(plan, arrays)
    if not batch:
        return fit(ops.cast(_selected(rule, arrays, cotangent, index, pos, run, ops), target), target.shape)
    flat_g = cotangent.reshape((-1,) + tuple(cotangent.shape[len(batch):]))
    flat_i = index.reshape((-1,) + tuple(index.shape[len(batch):]))
    parts = [fit(_selected(rule, args, flat_g[k], flat_i[k], pos, run, ops), args[pos].shape)
             for k, args in enumerate(batch_items(plan, arrays, batch))]
    return fit(ops.cast(ops.stack(parts).reshape(batch + tuple(parts[0].shape)), target), target.shape)


def _reduced(rule: ReducedGradient, arrays, cotangent, run, ops, target, plan, output):
    extras = {COTANGENT: lambda: ops.cast(cotangent, target),
              OUTPUT: lambda: output if output is not None else run(plan, arrays),
              LOGSUMEXP: lambda: run(rule.logsumexp, arrays)}
    result = run(rule.plan, [*arrays, *(extras[name]() for name in rule.extras)])
    if rule.sum_rows:                    # a parameter: one gradient per output row, added up
        result = result.sum(-2)
    return fit(ops.cast(result, target), target.shape)


def _selected(rule: SelectedGradient, arrays, cotangent, index, pos, run, ops):
    """Evaluate Grad(f, v, e) at the (row, selected column) pairs, then add each pair's share where it belongs."""
    rows, slots = index.shape
    valid = index >= 0                                  # -1 marks a row that selected nothing (an empty range)
    flat = ops.where(valid, index, 0 * index).reshape(-1)
    args = []
    for spec, array, gathered in zip(rule.plan.args, arrays, rule.gathered):
        if spec.cat == P:
            args.append(array)
        else:
            args.append(ops.gather(array, flat) if gathered else ops.repeat(array, slots))
    # Slot s of a row holds component s % fdim of the formula: its cotangent is that component alone.
    mask = (ops.arange(slots, index) % rule.fdim)[:, None] == ops.arange(rule.fdim, index)[None, :]
    g = cotangent.reshape(rows, slots) * valid
    e = ops.cast((g[:, :, None] * mask).reshape(rows * slots, rule.fdim), cotangent)
    pairs = run(rule.plan, [*args, e]).reshape(rows * slots, -1)
    if rule.role == "rows":
        return pairs.reshape(rows, slots, -1).sum(1)
    if rule.role == "reduced":
        return ops.scatter_add(ops.zeros((arrays[pos].shape[0], pairs.shape[-1]), pairs), flat, pairs)
    return pairs.sum(0)
