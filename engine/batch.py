"""Batch dimensions: leading axes in front of the arrays of a reduction, broadcast against each other as in pykeops.

An i or j variable of shape (*B, N, D) and a parameter of shape (*B, D) carry batch shape B; axes of size 1 (or
missing on the left) broadcast, exactly as numpy broadcasts. The result has shape (*B, N, out). A parameter given as
(1, D) keeps its usual meaning (one parameter, no batch), so unbatched calls behave as before.

The engine runs one ordinary reduction per batch item, on views of the arrays (no copies), so every backend supports
batches without code of its own.
"""
from __future__ import annotations

import numpy as np

from .errors import ArgumentError
from .formula import P


def leading_shape(cat: int, dim: int, shape) -> tuple[int, ...]:
    """The batch axes in front of one argument: (*B, N, D) for an i or j variable, (*B, D) for a parameter (whose
    (1, D) is one parameter, no batch). The one reading of the rule: the engine, the service's planner and the client
    (sizing a shared-memory reply) all call it."""
    shape = tuple(shape)
    if cat == P:
        return shape[:-1] if len(shape) >= 2 and shape != (1, dim) else ()
    return shape[:-2] if len(shape) >= 3 else ()


def broadcast_batch(leads, names) -> tuple[int, ...]:
    """The batch shape of arguments with leading shapes `leads` (numpy broadcasting); () when none has any."""
    shapes = [lead for lead in leads if lead]
    if not shapes:
        return ()
    try:
        batch = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        described = ", ".join(f"{name}: {lead}" for name, lead in zip(names, leads) if lead)
        raise ArgumentError(f"batch dimensions do not broadcast together ({described})") from None
    if 0 in batch:
        raise ArgumentError(f"batch shape {batch} is empty")
    return batch


def batch_shape(plan, args) -> tuple[int, ...]:
    """The broadcast batch shape of `args` for `plan`; () when no argument has leading batch axes."""
    if len(args) != plan.nargs:
        return ()               # Plan.check_args reports the count
    return broadcast_batch(_leading_shapes(plan, args), [spec.name for spec in plan.args])


def batch_items(plan, args, batch: tuple[int, ...]):
    """The argument lists of each batch item, in C order: views of the arrays, size-1 batch axes broadcast."""
    leads = _leading_shapes(plan, args)
    for index in np.ndindex(*batch):
        item = []
        for value, lead in zip(args, leads):
            if not lead:
                item.append(value)
                continue
            own = index[len(batch) - len(lead):]
            item.append(value[tuple(0 if size == 1 else k for size, k in zip(lead, own))])
        yield item


def stack_items(batch: tuple[int, ...], results: list):
    """Stack per-item results (arrays, or tuples of arrays for value/index reductions) into (*batch, ...)."""
    if isinstance(results[0], tuple):
        return tuple(stack_items(batch, [r[k] for r in results]) for k in range(len(results[0])))
    return np.stack(results).reshape(batch + results[0].shape)


def _leading_shapes(plan, args) -> list[tuple[int, ...]]:
    leads = []
    for spec, value in zip(plan.args, args):
        shape = getattr(value, "shape", None)
        leads.append(leading_shape(spec.cat, spec.dim, shape if shape is not None else np.shape(value)))
    return leads
