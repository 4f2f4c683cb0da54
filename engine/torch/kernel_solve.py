"""`KernelSolve` for torch tensors: conjugate gradient on (alpha * I + K) a = b, differentiable to any order.

With a = (alpha I + K)^-1 b and a cotangent G, w = (alpha I + K^T)^-1 G is the gradient with respect to b, and the
gradient with respect to anything else K depends on is -(d(K a) / d theta)^T w with a held fixed: a Genred backward.
Both are built from this Function and from `engine.torch.genred`, so autograd can differentiate them again.
"""
from __future__ import annotations

import torch

from ..errors import ArgumentError
from ..frontend import check_sum_scheme
from ..kernel_solve import LinearSystem, conjugate_gradient, linear_system, transpose
from .genred import Options, reduce, vjp


class KernelSolve:
    """Call-compatible with `pykeops.torch.KernelSolve`.

    >>> solve = KernelSolve("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], "b", axis=1)
    >>> a = solve(x, x, b, alpha=0.1)          # (alpha * I + K_xx) a = b, differentiable in x and b
    """

    def __init__(self, formula: str, aliases, varinvalias: str, axis: int = 0, dtype_acc: str = "auto",
                 use_double_acc: bool = False, sum_scheme="auto", enable_chunks: bool = True, rec_multVar_highdim=None,
                 dtype=None, cuda_type=None, use_fast_math: bool = True):
        # pykeops.torch.KernelSolve's parameters in its order; dtype, cuda_type and the tuning knobs are ignored.
        check_sum_scheme(sum_scheme)
        if use_double_acc:
            dtype_acc = "float64"
        self.formula, self.aliases, self.varinvalias = formula, list(aliases), varinvalias
        self.system = linear_system(formula, self.aliases, varinvalias, axis, dtype_acc, use_fast_math)

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, alpha: float = 1e-10, eps: float = 1e-6,
                 ranges=None):
        if len(args) != self.system.plan.nargs:
            raise ArgumentError(f"KernelSolve expects {self.system.plan.nargs} tensors, got {len(args)}")
        tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        return solve(self.system, tensors, float(alpha), float(eps), Options(backend, device_id, ranges))


def solve(system: LinearSystem, tensors, alpha: float, eps: float, options: Options):
    return _Solve.apply(system, alpha, eps, options, *tensors)


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(system: LinearSystem, alpha: float, eps: float, options: Options, *tensors):
        args = list(tensors)

        def apply(a):
            args[system.pos] = a
            return reduce(system.plan, args, options)

        return conjugate_gradient(apply, tensors[system.pos], alpha, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        system, alpha, eps, options, *tensors = inputs
        ctx.system, ctx.alpha, ctx.eps, ctx.options = system, alpha, eps, options
        ctx.save_for_backward(*tensors, output)

    @staticmethod
    def backward(ctx, cotangent):
        *tensors, a = ctx.saved_tensors
        system, pos = ctx.system, ctx.system.pos
        needs = ctx.needs_input_grad[4:]
        grads = [None] * len(tensors)
        if cotangent is None or not any(needs):
            return (None, None, None, None, *grads)
        transposed = transpose(system)
        w = solve(transposed, [cotangent.contiguous() if k == pos else t for k, t in enumerate(tensors)],
                  ctx.alpha, ctx.eps, ctx.options)
        grads[pos] = w if needs[pos] else None
        with_a = [a if k == pos else t for k, t in enumerate(tensors)]
        for k in range(len(tensors)):
            if k != pos and needs[k]:
                g = vjp(system.plan, k, with_a, w, None, None, ctx.options)
                grads[k] = None if g is None else -g
        return (None, None, None, None, *grads)
