"""Remote numpy front end: `Genred` and `LazyTensor` as in kred.numpy, computed on a kred server.

    from kred.client.numpy import LazyTensor
    x_i = LazyTensor(x[:, None, :], client=c); y_j = LazyTensor(y[None, :, :])
    a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(axis=1)       # one /v1/reduce request

The expression is built here (client/lazytensor.py); the reduction travels as pykeops text, which the server parses.
"""
from __future__ import annotations

from kred.engine.lazytensor.numpy import LazyTensor as _LocalLazyTensor

from .client import DEFAULT_URL, Client, RemoteGenred
from .lazytensor import RemoteLazyTensor, helpers, request_of, using


def Genred(formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, *, client: Client | None = None,
           url: str = DEFAULT_URL, token: str | None = None, **options) -> RemoteGenred:
    """pykeops-style Genred on numpy arrays whose calls go to a server (`client=`, or a new Client(url, token));
    `options` are the fields of `kred.engine.spec.Spec` (opt_arg, formula2, dtype_acc, fast_math)."""
    client = client if client is not None else Client(url, token)
    return client.Genred(formula, aliases, reduction_op, axis, **options)


class LazyTensor(RemoteLazyTensor, _LocalLazyTensor):
    """kred.numpy's LazyTensor, reduced on a server: `LazyTensor(x[:, None, :], client=c)`."""

    @classmethod
    def _reduce(cls, plan, args, call):
        call = cls._call_options(call)
        spec = request_of(plan)
        result = cls._server().reduce(spec.formula, spec.aliases, *args, ranges=call["ranges"], **spec.options())
        out = call["out"]
        if out is None:
            return result
        if isinstance(result, tuple) or getattr(out, "shape", None) != result.shape:
            raise ValueError(f"out= must be an array of shape {result.shape}")
        out[...] = result
        return out


Vi, Vj, Pm = helpers(LazyTensor)

__all__ = ["Genred", "LazyTensor", "Pm", "Vi", "Vj", "using"]
