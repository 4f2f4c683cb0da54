"""`Genred` for torch tensors, differentiable to any order.

A reduction is a `torch.autograd.Function` whose backward builds the gradient plans of
engine/reductions/gradients.py and runs them through this same Function. The backward is therefore made of torch
operations and reductions that autograd records again, so `create_graph=True` gives second, third, ... derivatives,
each one a reduction that never builds the N x M matrix and runs on the same backends as the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError
from ..formula import P
from ..frontend import GenredBase
from ..plan import Plan
from ..reductions.gradients import with_indices
from ..reductions.vjp import ArrayOps
from ..reductions.vjp import vjp as shared_vjp
from ..run import run
from .forward import tangent


@dataclass(frozen=True)
class Options:
    """How to run: what `op(..., backend=, device_id=, ranges=, cluster=)` said. Travels with every backward
    reduction (so gradients run on the same engine.cluster.Cluster as the forward pass)."""
    backend: str = "auto"
    device_id: int = -1
    ranges: Any = None
    cluster: Any = None


class Genred(GenredBase):
    """A reduction `reduction_op_j formula(x_i, y_j, p)` (axis=1) or over i (axis=0) on torch tensors, with autograd.

    >>> op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    >>> a = op(x, y, b)                    # (N, 1); differentiable with respect to x, y and b, to any order
    """

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, ranges=None, out=None, cluster=None):
        return reduce(self.plan, args, Options(backend, device_id, ranges, cluster), out=out)


def reduce(plan: Plan, args, options: Options = Options(), out=None):
    """Run `plan` on tensors with autograd: what Genred calls, and what its backward calls again."""
    tensors = [_as_tensor(a) for a in args]
    emits = [kind for kind, _ in plan.reduction.outputs]
    outputs = _Reduce.apply(plan, options, *tensors)
    results = outputs[:len(emits)]          # a selecting reduction also returned indices for its backward
    result = results[0] if len(results) == 1 else tuple(results)
    if out is not None:
        if isinstance(result, tuple) or not isinstance(out, torch.Tensor) or out.shape != result.shape:
            raise ArgumentError(f"out= must be a tensor of shape {tuple(result.shape)}")
        with torch.no_grad():
            out.copy_(result)
        return out
    return result


class _Reduce(torch.autograd.Function):
    """forward: the engine's reduction; backward: more reductions through this Function (so it nests)."""

    @staticmethod
    def forward(plan: Plan, options: Options, *tensors):
        runs = with_indices(plan)
        device = tensors[0].device if tensors else torch.device("cpu")
        # CUDA tensors go to the engine as they are: the cuda backend reads them in place and answers with CuPy
        # arrays on the same device (wrapped back through DLPack); other backends copy them to the host.
        arrays = [t.detach() if t.is_cuda else _to_numpy(t) for t in tensors]
        result = run(runs, arrays, backend=options.backend, ranges=options.ranges, device_id=options.device_id,
                     cluster=options.cluster)
        results = result if isinstance(result, tuple) else (result,)
        return tuple(_to_tensor(r, device) for r in results)

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan, options, *tensors = inputs
        ctx.plan, ctx.options = plan, options
        kinds = _output_kinds(plan)
        ctx.mark_non_differentiable(*[o for o, kind in zip(output, kinds) if kind == "index"])
        value = next((o for o, kind in zip(output, kinds) if kind == "value"), None)
        index = next((o for o, kind in zip(output, kinds) if kind == "index"), None)
        ctx.save_for_backward(*tensors, value, index)
        ctx.save_for_forward(*tensors, value)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, _plan, _options, *tangents):
        """Forward mode: the tangent of the result is a reduction too (engine/torch/forward.py)."""
        plan: Plan = ctx.plan
        *tensors, value = ctx.saved_tensors
        kinds = _output_kinds(plan)
        moving = tuple(k for k, t in enumerate(tangents) if t is not None)
        rule = tangent(plan, moving) if moving else None
        if rule is None:                    # the result does not depend on the moving arguments
            result = torch.zeros_like(value)
        else:
            result = reduce(rule.plan, [*tensors, *(tangents[k].to(tensors[k].dtype).contiguous() for k in moving)],
                            ctx.options)
            a, b = result[..., :rule.split], result[..., rule.split:]
            if rule.combine == "ratio":
                result = a / b
            elif rule.combine == "centred":
                result = a - value * b
        return tuple(result if kind == "value" else None for kind in kinds)

    @staticmethod
    def vmap(info, in_dims, plan: Plan, options: Options, *tensors):
        """torch.func.vmap: the mapped axis becomes a leading batch dimension, which the engine runs natively."""
        if info.batch_size == 1:        # a (1, D) parameter would read as unbatched: run the single item
            items = [t if d is None else t.select(d, 0) for t, d in zip(tensors, in_dims[2:])]
            outputs = _Reduce.apply(plan, options, *items)
            return tuple(o.unsqueeze(0) for o in outputs), (0,) * len(outputs)
        moved = []
        for spec, tensor, dim in zip(plan.args, tensors, in_dims[2:]):
            if dim is not None:
                tensor = tensor.movedim(dim, 0)
                if spec.cat == P and tensor.numel() == info.batch_size * spec.dim:
                    tensor = tensor.reshape(info.batch_size, spec.dim)  # (B, D), also from (B,) or (B, 1, D)
                elif spec.cat != P and tensor.dim() == 2:
                    tensor = tensor.unsqueeze(-1)                       # a 1-D variable of dimension 1
            moved.append(tensor)
        # The mapped axis is the outermost batch axis: the arguments' own (pykeops) batch axes stay inside it, so a
        # mapped argument with fewer of them gets size-1 axes after the mapped one (batch axes align on the right).
        ranks = [max(0, t.dim() - (1 if spec.cat == P else 2) - (d is not None))
                 for spec, t, d in zip(plan.args, moved, in_dims[2:])]
        inner = max(ranks, default=0)
        moved = [t.reshape(t.shape[:1] + (1,) * (inner - rank) + t.shape[1:]) if d is not None else t
                 for t, d, rank in zip(moved, in_dims[2:], ranks)]
        outputs = _Reduce.apply(plan, options, *moved)
        return outputs, (0,) * len(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        plan: Plan = ctx.plan
        *tensors, value, index = ctx.saved_tensors
        kinds = _output_kinds(plan)
        cotangent = next((g for g, kind in zip(grad_outputs, kinds) if kind == "value"), None)
        grads = [None] * len(tensors)
        if cotangent is not None:
            for pos, tensor in enumerate(tensors):
                if ctx.needs_input_grad[2 + pos]:
                    grads[pos] = vjp(plan, pos, tensors, cotangent, value, index, ctx.options)
        return (None, None, *grads)


def _output_kinds(plan: Plan) -> list[str]:
    """What `_Reduce.forward` returns for `plan`: the user's outputs, plus indices for a selecting reduction."""
    runs = with_indices(plan)
    return [kind for kind, _ in runs.reduction.outputs]


# Backward ---------------------------------------------------------------------------------------------------

TORCH = ArrayOps(
    zeros=lambda shape, like: torch.zeros(shape, dtype=like.dtype, device=like.device),
    arange=lambda n, like: torch.arange(n, device=like.device), where=torch.where,
    gather=lambda t, index: t.index_select(0, index), repeat=lambda t, k: t.repeat_interleave(k, dim=0),
    scatter_add=lambda zeros, index, rows: zeros.index_add(0, index, rows),
    cast=lambda t, like: t.to(like.dtype).contiguous(), stack=torch.stack)


def vjp(plan: Plan, pos: int, tensors, cotangent, value, index, options: Options):
    """sum_r <cotangent_r, d result_r / d tensors[pos]> (engine/reductions/vjp.py), its reductions run through
    `reduce`, so the result is differentiable again."""
    pointwise = Options(options.backend, options.device_id, None, options.cluster)     # no ranges: one column
    return shared_vjp(plan, pos, list(tensors), cotangent, lambda p, args: reduce(p, args, options), TORCH,
                      output=value, index=index, run_pairs=lambda p, args: reduce(p, args, pointwise))


# Tensors <-> arrays -------------------------------------------------------------------------------------------

def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().resolve_conj().resolve_neg().numpy()


def _to_tensor(result, device: torch.device) -> torch.Tensor:
    if isinstance(result, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(result)).to(device)
    return torch.from_dlpack(result)            # a CuPy array from the cuda backend: no copy
