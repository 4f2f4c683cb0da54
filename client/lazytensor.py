"""Remote LazyTensors: the symbolic expression is built here, the reduction runs on a kred server.

    from kred.client.torch import LazyTensor          # (or kred.client.numpy)
    with Client(url) as c:
        x_i, y_j = LazyTensor(x[:, None, :], client=c), LazyTensor(y[None, :, :], client=c)
        a = (-((x_i - y_j) ** 2).sum(-1)).exp().sum(dim=1)     # one request; differentiable for the torch binding

A binding (`kred.client.torch.LazyTensor`, `kred.client.numpy.LazyTensor`) is the in-process binding with its
reduction hook replaced: the Plan that `LazyReduction` builds from the formula nodes is turned back into pykeops text
(`request_of`), which the server parses. Which server: the client the first operand was made with
(`LazyTensor(x, client=c)`, or `Vi(x, client=c)`), else the one of an enclosing `with using(c):`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref

from kred.engine.backends import NAMES as BACKEND_NAMES
from kred.engine.errors import ArgumentError
from kred.engine.formula import CATEGORY_NAMES, to_text
from kred.engine.kernel_solve import conjugate_gradient, linear_system
from kred.engine.lazytensor import LazyTensorBase
from kred.engine.plan import Plan, swap_ij
from kred.engine.run import PYKEOPS_BACKENDS
from kred.engine.spec import Spec

_current: contextvars.ContextVar = contextvars.ContextVar("kred_client", default=None)


@contextlib.contextmanager
def using(client):
    """Remote LazyTensors made without `client=` reduce on `client` inside this block."""
    token = _current.set(client)
    try:
        yield client
    finally:
        _current.reset(token)


def request_of(plan: Plan) -> Spec:
    """`plan` as the Spec of a Genred, in the user's orientation (a plan normalises axis=0 by swapping i and j:
    swap them back, so that `axis` and `ranges` keep their pykeops meaning)."""
    user = swap_ij if plan.axis == 0 else (lambda node: node)
    aliases = tuple(f"v{a.pos} = {CATEGORY_NAMES[a.cat]}({a.pos}, {a.dim})" for a in plan.args)
    formula2 = to_text(user(plan.formula2)) if plan.formula2 is not None else None
    return Spec(to_text(user(plan.formula)), aliases, plan.reduction.name, plan.axis, plan.reduction.k, formula2,
                plan.dtype_acc, fast_math=plan.fast_math)


class RemoteLazyTensor(LazyTensorBase):
    """What both remote bindings add to their in-process one: a client, carried by the class.

    `LazyTensor(x, client=c)` is an instance of the subclass bound to `c` (made once per client), so every tensor
    derived from it (`type(self)(...)` in engine.lazytensor) reduces on `c` too.
    """
    client = None
    _bound: weakref.WeakKeyDictionary

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "client" not in cls.__dict__:        # a binding, not a bound class: it keeps its own bound subclasses
            cls._bound = weakref.WeakKeyDictionary()

    def __new__(cls, x=None, axis=None, client=None):
        if client is not None and client is not cls.client:
            cls = cls.bind(client)
        return super().__new__(cls)

    def __init__(self, x=None, axis=None, client=None):
        super().__init__(x, axis)

    @classmethod
    def bind(cls, client) -> type:
        """The subclass of this binding whose reductions go to `client`."""
        base = next(c for c in cls.__mro__ if "client" not in c.__dict__)
        if client not in base._bound:
            base._bound[client] = type(base.__name__, (base,), {"client": client, "__module__": base.__module__,
                                                                "__qualname__": base.__qualname__})
        return base._bound[client]

    @classmethod
    def _server(cls):
        client = cls.client if cls.client is not None else _current.get()
        if client is None:
            raise ArgumentError("a remote LazyTensor needs a server: LazyTensor(x, client=Client(url)), or reduce "
                                "inside `with kred.client.lazytensor.using(client):`")
        return client

    def _with_client_of(self, *others) -> "RemoteLazyTensor":
        """`self`, moved to the bound class of its operands (the engine builds results with the first operand's
        class, so `Pm(p) * LazyTensor(x, client=c)` reduces on c)."""
        classes = {type(o) for o in (self, *others) if isinstance(o, RemoteLazyTensor) and type(o).client is not None}
        if len(classes) > 1:
            raise ArgumentError("these LazyTensors are bound to different clients")
        if not classes or type(self) in classes:
            return self
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.__class__ = classes.pop()
        return out

    def _op(self, op, *others, params=()):
        return super(RemoteLazyTensor, self._with_client_of(*others))._op(op, *others, params=params)

    def _derivative(self, name, v, *rest):
        return super(RemoteLazyTensor, self._with_client_of(v, *rest))._derivative(name, v, *rest)

    def reduction(self, reduction_op, other=None, opt_arg=None, axis=None, dim=None, call=True, **options):
        return super(RemoteLazyTensor, self._with_client_of(other)).reduction(
            reduction_op, other, opt_arg, axis, dim, call, **options)

    @classmethod
    def _call_options(cls, call: dict) -> dict:
        """The call options a server honours: `ranges` (and `out`, filled here). It chooses its own backend: a known
        backend name (pykeops's "CPU", "GPU"... or kred's) or device is a hint it may ignore, as pykeops programs
        pass them; an unknown name is an error, as in process."""
        backend = call.get("backend")
        if backend is not None and backend not in BACKEND_NAMES and backend not in PYKEOPS_BACKENDS:
            raise ArgumentError(f"unknown backend {backend!r}; choose one of "
                                f"{', '.join([*BACKEND_NAMES, *PYKEOPS_BACKENDS])}")
        return {"ranges": call.get("ranges"), "out": call.get("out")}

    @staticmethod
    def _complex_class():
        raise ArgumentError("complex LazyTensors run in-process only (kred.torch / kred.numpy ComplexLazyTensor)")

    @classmethod
    def _kernel_solve_class(cls):
        """`solve` as in process, its products K a computed on the server (conjugate gradient here)."""
        return functools.partial(RemoteKernelSolve, cls)


class RemoteKernelSolve:
    """A KernelSolve whose products K a are remote reductions of `binding` (a bound LazyTensor class): the system is
    parsed and checked for linearity here (engine.kernel_solve), the conjugate gradient runs here, one request per
    step. With torch tensors, gradients flow through the steps (each is a differentiable remote reduction)."""

    def __init__(self, binding, formula: str, aliases, varinvalias: str, axis: int = 0, dtype_acc: str = "auto",
                 use_double_acc: bool = False, use_fast_math: bool = True):
        self.binding = binding
        self.system = linear_system(formula, list(aliases), varinvalias, axis,
                                    "float64" if use_double_acc else dtype_acc, use_fast_math)

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, alpha: float = 1e-10, eps: float = 1e-6,
                 ranges=None):
        plan, pos = self.system.plan, self.system.pos
        if len(args) != plan.nargs:
            raise ArgumentError(f"KernelSolve expects {plan.nargs} arrays, got {len(args)}")
        call = self.binding._call_options({"backend": backend, "device_id": device_id, "ranges": ranges})
        args = list(args)

        def apply(a):
            args[pos] = a
            return self.binding._reduce(plan, list(args), {"ranges": call["ranges"]})

        return conjugate_gradient(apply, args[pos], alpha, eps)


def helpers(binding):
    """`Vi`, `Vj`, `Pm` for a remote binding, taking `client=` like `LazyTensor`."""

    def helper(axis, name):
        def make_variable(x_or_index, dim=None, client=None):
            if dim is None:
                return binding(x_or_index, axis=axis, client=client)
            return binding((x_or_index, dim, axis), client=client)
        make_variable.__name__ = make_variable.__qualname__ = name
        make_variable.__doc__ = (f"{name}(x, client=None): x as a remote LazyTensor; {name}(index, dim): a symbolic "
                                 "one, given when the reduction is called.")
        return make_variable

    return helper(0, "Vi"), helper(1, "Vj"), helper(2, "Pm")
