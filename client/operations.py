"""The public operations of `Client` and `AsyncClient`, written once. Each runs one protocol flow through the
driver's `_drive`, which returns the result (Client) or an awaitable of it (AsyncClient); `then` shapes the
result (a Job around a job's status) in either case."""
from __future__ import annotations

from kred.engine.spec import Spec

from .jobs import AsyncJob, Job
from .protocol import Protocol


class Operations:
    _flows: Protocol
    _job_class: type = Job

    def _drive(self, flow, then=None):
        raise NotImplementedError

    # Reductions -----------------------------------------------------------------------------------------
    def reduce(self, formula: str, aliases, *args, ranges=None, **options):
        """`reduction_op` over `axis` of `formula` on the server (pykeops Genred semantics: leading batch
        dimensions, block-sparse `ranges`). `options` are the fields of `kred.engine.spec.Spec`: reduction_op,
        axis, opt_arg, formula2, dtype_acc, fast_math."""
        return self._drive(self._flows.reduce(formula, aliases, args, ranges, options))

    def grad(self, formula: str, aliases, *args, wrt, cotangent, **options):
        """sum_r <cotangent_r, d result_r / d arg[wrt]> (a vector-Jacobian product), shaped like that argument."""
        return self._drive(self._flows.reduce(formula, aliases, [*args, cotangent], options=options, grad=wrt))

    def Genred(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, **options) -> RemoteGenred:
        """A remote Genred: `op = c.Genred(...); op(x, y, b)` (awaitable calls with an AsyncClient)."""
        return RemoteGenred(self, formula, aliases, reduction_op=reduction_op, axis=axis, **options)

    def validate(self, formula: str, aliases=(), **options):
        """The normalised formula, arguments and outputs; raises FormulaError (with the column) when wrong."""
        return self._drive(self._flows.validate(formula, aliases, options))

    # Jobs -----------------------------------------------------------------------------------------------
    def submit(self, formula: str, aliases, *args, ranges=None, **options):
        """Queue a reduction as a job on the server; returns (a Job) at once."""
        return self._drive(self._flows.submit(formula, aliases, args, ranges, options),
                           then=lambda done: self._job_class(self, *done))

    def submit_dataset(self, formula: str, aliases, inputs: dict, output: str, **options):
        """Queue an out-of-core job on the server's cluster: `inputs` maps each alias name to a Parquet dataset
        the server can read (a path or URI, or {"uri": ..., "columns": [...]}) or, for a parameter, a list of
        numbers; the workers write the result to the Parquet dataset `output`, which the finished job names."""
        return self._drive(self._flows.submit_dataset(formula, aliases, inputs, output, options),
                           then=lambda info: self._job_class(self, info))

    def job(self, job_id: str):
        """The job `job_id` (its status asked now)."""
        return self._drive(self._flows.job_status(job_id), then=lambda info: self._job_class(self, info))

    def jobs(self, limit: int = 100, state: str | None = None):
        return self._drive(self._flows.jobs(limit, state))

    # The server -----------------------------------------------------------------------------------------
    def health(self):
        return self._drive(self._flows.get("/healthz"))


class AsyncOperations(Operations):
    _job_class = AsyncJob

    def shared_memory(self):
        """Whether arrays go through shared memory (asks the server the first time)."""
        return self._drive(self._flows.shared_memory())


class RemoteGenred:
    """`Client.Genred`: a reduction bound to a server, called like `engine.numpy.Genred`."""

    def __init__(self, client, formula, aliases, reduction_op="Sum", axis=0, **options):
        self.client = client
        self.spec = Spec(formula, aliases, reduction_op, axis, **options)     # checked once, here
        self.formula, self.aliases = formula, list(self.spec.aliases)
        self.options = self.spec.options()

    def __call__(self, *args, ranges=None):
        return self.client.reduce(self.formula, self.aliases, *args, ranges=ranges, **self.options)

    def grad(self, *args, wrt, cotangent):
        return self.client.grad(self.formula, self.aliases, *args, wrt=wrt, cotangent=cotangent, **self.options)

    def submit(self, *args, ranges=None):
        return self.client.submit(self.formula, self.aliases, *args, ranges=ranges, **self.options)
