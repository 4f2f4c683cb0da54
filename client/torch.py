"""A remote Genred for torch: the forward pass and the backward pass both run on a kred server.

    from kred.client.torch import Genred
    op = Genred("Exp(-SqDist(x,y))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], axis=1, url="http://127.0.0.1:8000")
    a = op(x, y, b)            # x.requires_grad: a.sum().backward() asks the server for d a / d x

The backward of a Sum or LogSumExp reduction is itself a reduction, written in the formula language as pykeops
writes it: `Sum Grad(f, v, g)` over the same axis (v indexed like the output, or a parameter) or over the other axis
(v indexed like the reduced variable), with the cotangent `g` as one more argument; for LogSumExp, f is replaced by
`Exp(f - out)` with the forward output `out` as one more argument. That reduction is sent through another remote
`Genred`, whose backward is built the same way, so gradients of any order work over HTTP. The server parses every
formula; the client only asks it (`/v1/formulas/validate`, once per op) which arguments are indexed how.
The other reductions (Min, Max, KMin, ...) are differentiated once, by the server's `grad` request.

`LazyTensor` (with `Vi`, `Vj`, `Pm`) is kred.torch's LazyTensor whose reductions are sent through this Genred
(see client/lazytensor.py): pykeops-style code, differentiable the same way, computed on a server.
"""
from __future__ import annotations

import weakref

try:
    import torch
except ModuleNotFoundError as e:    # the light client ('kred[client]') has no torch
    raise ModuleNotFoundError("kred.client.torch needs torch: pip install 'kred[client,torch]'", name="torch") from e

from kred.engine.torch.lazytensor import LazyTensor as _LocalLazyTensor

from .client import DEFAULT_URL, Client
from kred.engine.reductions import REDUCTIONS
from kred.engine.spec import Spec

from .lazytensor import RemoteLazyTensor, helpers, request_of, using

FORMULA_GRADIENTS = ("sum", "logsumexp")     # gradient rules written here as a Grad formula reduced remotely


def _rule(reduction_op: str) -> str | None:
    known = REDUCTIONS.get(reduction_op)
    return known.gradient_rule if known is not None else None


class Genred:
    """pykeops-style Genred whose calls go to a server; `client=` shares one Client between several ops."""

    def __init__(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, *,
                 client: Client | None = None, url: str = DEFAULT_URL, token: str | None = None, **options):
        self.client = client if client is not None else Client(url, token)
        self.op = self.client.Genred(formula, aliases, reduction_op, axis, **options)
        self.spec: Spec = self.op.spec
        self.formula, self.aliases = formula, list(self.spec.aliases)
        self.reduction_op, self.axis = self.spec.reduction_op, self.spec.axis
        self._signature: dict | None = None
        self._gradients: dict[int, Genred] = {}

    def __call__(self, *args, ranges=None):
        tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        return _Remote.apply(self, ranges, *tensors)

    # The gradient as a reduction ----------------------------------------------------------------------------
    def signature(self) -> dict:
        """The server's reading of the reduction: its arguments (name, position, category as written) and outputs."""
        if self._signature is None:
            self._signature = self.client.validate(self.formula, self.aliases, **self.spec.options())
        return self._signature

    def gradient(self, pos: int) -> "Genred":
        """The remote Genred of  sum_r <g_r, d result_r / d arg_pos>  (arguments: this op's, g, [the output])."""
        if pos not in self._gradients:
            args = self.signature()["args"]
            names = {a["name"] for a in args}
            target = next(a for a in args if a["position"] == pos)
            if target["name"] not in {alias.split("=")[0].strip() for alias in self.aliases}:
                raise ValueError(f"argument {pos} has no alias name, so its gradient cannot be written")
            rows = "Vi" if self.axis == 1 else "Vj"               # the category of the output's index, as written
            cotangent, output = _fresh("g", names), _fresh("out", names)
            dim = self.signature()["outputs"][0]["dim"]
            aliases = [*self.aliases, f"{cotangent} = {rows}({len(args)}, {dim})"]
            weighted = self.formula
            if _rule(self.reduction_op) == "logsumexp":                   # d LSE = softmax-weighted df: Exp(f - out) df
                aliases.append(f"{output} = {rows}({len(args) + 1}, {dim})")
                weighted = f"Exp(({self.formula}) - {output})"
            # indexed like the output (or a parameter): reduce as the forward pass; like the reduced axis: the other way
            axis = self.axis if target["category"] in (rows, "Pm") else 1 - self.axis
            # the caller's numeric options (dtype_acc, fast_math) carry over to the gradient's reduction
            self._gradients[pos] = Genred(f"Grad({weighted}, {target['name']}, {cotangent})", aliases, "Sum", axis,
                                          dtype_acc=self.spec.dtype_acc, fast_math=self.spec.fast_math,
                                          client=self.client)
        return self._gradients[pos]


def _fresh(stem: str, taken: set[str]) -> str:
    name, k = f"kred_{stem}", 0
    while name in taken:
        k += 1
        name = f"kred_{stem}{k}"
    return name


class _Remote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: Genred, ranges, *tensors):
        result = op.op(*[t.detach() for t in tensors], ranges=ranges)
        results = result if isinstance(result, tuple) else (result,)
        ctx.op, ctx.ranges = op, ranges
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        ctx.save_for_backward(*tensors, results[0])
        ctx.set_materialize_grads(False)
        return result

    @staticmethod
    def backward(ctx, *grad_outputs):
        op: Genred = ctx.op
        *tensors, output = ctx.saved_tensors
        cotangent = grad_outputs[0]                 # the values' cotangent (indices have none)
        grads = [None] * len(tensors)
        if cotangent is None:
            return (None, None, *grads)
        for pos, tensor in enumerate(tensors):
            if not ctx.needs_input_grad[2 + pos]:
                continue
            if _rule(op.reduction_op) in FORMULA_GRADIENTS:
                extras = [cotangent.to(tensor.dtype)] + ([output] if _rule(op.reduction_op) == "logsumexp" else [])
                grad = op.gradient(pos)(*tensors, *extras, ranges=ctx.ranges)
                if next(a for a in op.signature()["args"] if a["position"] == pos)["category"] == "Pm":
                    grad = grad.sum(-2)             # one row per output row: a parameter's gradient is their sum
                grads[pos] = _fit(grad, tensor.shape)
            elif torch.is_grad_enabled():
                raise RuntimeError(f"{op.reduction_op} is differentiated once over HTTP (by the server's grad "
                                   "request); higher orders are for Sum and LogSumExp, or kred.torch in-process")
            else:
                grads[pos] = op.op.grad(*tensors, wrt=pos, cotangent=cotangent.to(tensor.dtype))
        return (None, None, *grads)


def _fit(grad: torch.Tensor, shape) -> torch.Tensor:
    """A gradient reshaped or summed to its argument's shape ((1, D) or (D,) parameters, broadcast batch axes)."""
    shape = torch.Size(shape)
    if grad.shape == shape:
        return grad
    if grad.numel() == shape.numel():
        return grad.reshape(shape)
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    return grad.sum_to_size(shape)


# Remote LazyTensor -----------------------------------------------------------------------------------------------

_genreds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()      # client -> {Spec: Genred}


def _remote_genred(client: Client, spec: Spec) -> Genred:
    """One Genred per client and spec, so that its signature and gradient ops are asked for once."""
    ops = _genreds.setdefault(client, {})
    if spec not in ops:
        ops[spec] = Genred(spec.formula, spec.aliases, client=client, **spec.options())
    return ops[spec]


class LazyTensor(RemoteLazyTensor, _LocalLazyTensor):
    """kred.torch's LazyTensor, reduced on a server: `LazyTensor(x[:, None, :], client=c)`; differentiable (any
    order for Sum and LogSumExp reductions, once for the others)."""

    @classmethod
    def _reduce(cls, plan, args, call):
        call = cls._call_options(call)
        result = _remote_genred(cls._server(), request_of(plan))(*args, ranges=call["ranges"])
        out = call["out"]
        if out is None:
            return result
        if isinstance(result, tuple) or not isinstance(out, torch.Tensor) or out.shape != result.shape:
            raise ValueError(f"out= must be a tensor of shape {tuple(result.shape)}")
        with torch.no_grad():
            out.copy_(result)
        return out


Vi, Vj, Pm = helpers(LazyTensor)

__all__ = ["Genred", "LazyTensor", "Pm", "Vi", "Vj", "using"]
