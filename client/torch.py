"""A remote Genred for torch: the forward pass and the backward pass both run on a kred server.

    from kred.client.torch import Genred
    op = Genred("Exp(-SqDist(x,y))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], axis=1, url="http://127.0.0.1:8000")
    a = op(x, y, b)            # x.requires_grad: a.sum().backward() asks the server for d a / d x
    
The backward of each input is one `grad` request (a vector-Jacobian product computed by the server's reductions).
It is differentiable once (first-order gradients); for higher orders use `engine.torch.Genred` in-process.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .client import DEFAULT_URL, Client


class Genred:
    """pykeops-style Genred whose calls go to a server; `client=` shares one Client between several ops."""

    def __init__(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, *, opt_arg=None,
                 formula2: str | None = None, dtype_acc: str = "auto", client: Client | None = None,
                 url: str = DEFAULT_URL, token: str | None = None):
        self.client = client if client is not None else Client(url, token)
        self.op = self.client.Genred(formula, aliases, reduction_op, axis, opt_arg=opt_arg, formula2=formula2,
                                     dtype_acc=dtype_acc)

    def __call__(self, *args):
        tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        outputs = _Remote.apply(self.op, *tensors)
        return outputs


class _Remote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *tensors):
        result = op(*[t.detach() for t in tensors])
        ctx.op = op
        ctx.save_for_backward(*tensors)
        results = result if isinstance(result, tuple) else (result,)
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        ctx.set_materialize_grads(False)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        cotangent = grad_outputs[0]                 # the values' cotangent (indices have none)
        grads = [None] * len(tensors)
        if cotangent is not None:
            for pos, tensor in enumerate(tensors):
                if ctx.needs_input_grad[1 + pos]:
                    grads[pos] = ctx.op.grad(*tensors, wrt=pos, cotangent=cotangent.to(tensor.dtype))
        return (None, *grads)
