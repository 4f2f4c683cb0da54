"""From a request to work: build the plan (cached, within the limits and the compile-time budget), check the arrays,
and describe how to compute the outputs with any executor.
"""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kred.engine.backends.compile_limit import CompileTimeout, time_limit
from kred.engine.batch import batch_items, batch_shape, stack_items
from kred.engine.errors import ArgumentError
from kred.engine.formula import I, J
from kred.engine.limits import BoundedLRU
from kred.engine.plan import Plan
from kred.engine.spec import Spec, cached_plan, keep_plan
from kred.engine.reductions.gradients import gradient

from . import gradients, limits
from .errors import ApiError
from .plan_workers import PlanWorkers, TimedOut
from .schemas import ReductionSpec
from .settings import Settings

Runner = Callable[..., object]        # Executor.run


@dataclass
class Work:
    """Checked inputs and the way to turn them into the named outputs."""
    plan: Plan
    arrays: list[np.ndarray]
    rows: int
    cols: int
    names: list[str]
    compute: Callable[[Runner], list[np.ndarray]]

    @property
    def pairs(self) -> int:
        return self.rows * self.cols


class Planner:
    COMPILERS = 2         # kernels compiled at once (each a C compiler process, or NVRTC in a thread)
    SLACK_S = 5.0         # past compile_timeout_s, the wait for work that cannot be killed (code generation, NVRTC)

    def __init__(self, settings: Settings):
        self.settings = settings
        self._admitted = BoundedLRU(4096, 4096)   # (Spec.key, wrt) that passed this server's limits
        self._pool = ThreadPoolExecutor(self.COMPILERS, thread_name_prefix="kred-compile")
        self._workers = PlanWorkers.shared(2, warm=(__name__,))
        self._compiled: set[tuple] = set()
        self.hits = self.misses = 0

    async def plan(self, request: ReductionSpec) -> Plan:
        """The plan of the request's Spec: from the engine's plan cache (by `Spec.key`, the one key of a request) once
        this server admitted it, else built and checked against the limits in a plan worker within
        `compile_timeout_s`, and kept. A `grad` request is also differentiated there (once per argument), so that its
        gradient plans are within the limits too."""
        spec = request.spec
        wrt = request.grad.wrt if request.grad is not None else None
        plan = cached_plan(spec)
        if plan is not None and self._admitted.get((spec.key, wrt)):
            self.hits += 1
            return plan
        self.misses += 1
        limits.check_text(spec, self.settings)
        try:           # in a worker process: one past the limit is killed, not left computing (see plan_workers)
            plan = await self._workers.call(build, spec, wrt, self.settings, timeout=self.settings.compile_timeout_s)
        except TimedOut:
            raise ApiError(422, "limit", f"building the plan took longer than {self.settings.compile_timeout_s} s "
                                         "(compile_timeout_s); it was stopped") from None
        keep_plan(spec, plan)
        self._admitted[spec.key, wrt] = True
        return plan

    async def compile(self, executor, plan: Plan, arrays: list[np.ndarray]) -> None:
        """Have the executor compile `plan` for the arrays' dtype (once per plan) in one of the COMPILERS compile
        threads, within `compile_timeout_s` from when it starts: a compiler still running then is killed
        (engine.backends.compile_limit). A compile that found no free thread within that time is a 429."""
        dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
        if dtype.kind != "f" or (plan.key, dtype) in self._compiled:
            return                        # (a wrong dtype is reported by the argument checks)
        limit, started = self.settings.compile_timeout_s, []
        job = self._pool.submit(_prepare, executor, plan, dtype, limit, started)
        waiting = asyncio.wrap_future(job)
        done, _ = await asyncio.wait({waiting}, timeout=limit)
        if not done and job.cancel():     # still queued behind other compiles
            raise ApiError(429, "too_busy", f"{self.COMPILERS} formulas were being compiled for {limit} s "
                                            "(compile_timeout_s); retry later", {"Retry-After": "5"})
        if not done:                      # it stops at its own limit (SLACK_S: for what cannot be killed)
            left = (started[0] if started else time.monotonic()) + limit + self.SLACK_S - time.monotonic()
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, left))
        if not done:
            raise ApiError(422, "limit", f"compiling the formula took longer than {limit} s (compile_timeout_s)")
        try:
            waiting.result()
        except CompileTimeout:
            raise ApiError(422, "limit", f"compiling the formula took longer than {limit} s (compile_timeout_s); "
                                         "the compiler was stopped") from None
        self._compiled.add((plan.key, dtype))

    def build(self, spec: ReductionSpec) -> Plan:
        """`plan(spec)` from a thread with no event loop (the job workers' restart path): the same cache, killable
        worker process and `compile_timeout_s`."""
        return asyncio.run(self.plan(spec))

    def bind(self, plan: Plan, spec: ReductionSpec, arrays: list[np.ndarray], pair_limit: float,
             limit_name: str) -> Work:
        """Check the arrays against the plan and admit the request's budget (limits.admit: bytes in and out, pairs,
        work, batch items; the job limits when `limit_name` is max_pairs_per_job, else the request limits), before
        any work; then check the data (blocking: it reads the data once for NaN). `pair_limit` overrides the
        settings' pair limit of that scope (its name is `limit_name`)."""
        scope = "job" if limit_name == "max_pairs_per_job" else "request"
        settings = self.settings.model_copy(update={limit_name: pair_limit})
        received = sum(a.nbytes for a in arrays)
        ranges = None
        if spec.ranges:
            if len(arrays) < 6:
                raise ArgumentError(f"ranges=true: the last six arrays are the ranges 6-tuple; got {len(arrays)} "
                                    "arrays in all")
            arrays, ranges = arrays[:-6], arrays[-6:]
        if spec.grad is not None:
            if ranges is not None:
                raise ArgumentError("a grad request cannot take ranges: send the gradient's reduction itself")
            return self._gradient(plan, spec, arrays, settings, scope, received)
        names = [kind for kind, _ in plan.reduction.outputs]
        batch = batch_shape(plan, arrays)
        if batch:                       # leading batch dimensions: one reduction per item, as engine.run does
            if ranges is not None:
                raise ArgumentError("ranges (block-sparse reductions) cannot be combined with batch dimensions")
            count = math.prod(batch)
            if count > settings.max_batch_items:      # before a list of items is built
                limits.admit(limits.Budget(received, 0, 0, 0, count), settings, scope)
            items = [plan.check_args(item) for item in batch_items(plan, arrays, batch)]   # views, no copies
            _, dtype, rows, cols = items[0]
            limits.admit(limits.budget(plan, rows, cols, count, received, np.dtype(dtype).itemsize), settings, scope)
            if self.settings.reject_nonfinite:
                for item, *_ in items:
                    limits.check_finite([a.name for a in plan.args], item)
            return Work(plan, arrays, rows * count, cols, names, lambda run: as_list(stack_items(
                batch, [run(plan, item, shape=(n, m)) for item, _, n, m in items])))
        checked, dtype, rows, cols = plan.check_args(arrays)
        pairs = limits.ranges_pairs(ranges, plan.axis, rows, cols) if ranges is not None else None
        limits.admit(limits.budget(plan, rows, cols, 1, received, np.dtype(dtype).itemsize, pairs), settings, scope)
        if self.settings.reject_nonfinite:
            limits.check_finite([a.name for a in plan.args], checked)
        # the arrays are checked here, once: `shape` tells the executor not to check them again. (The engine checks
        # every index of the ranges.)
        return Work(plan, checked, rows, cols, names,
                    lambda run: as_list(run(plan, checked, ranges=ranges, shape=(rows, cols))))

    def _gradient(self, plan, spec, arrays, settings, scope, received) -> Work:
        if len(arrays) != plan.nargs + 1:
            raise ArgumentError(f"a grad request sends the reduction's {plan.nargs} arrays and then the cotangent; "
                                f"got {len(arrays)} arrays")
        *args, cotangent = arrays
        checked, dtype, rows, cols = plan.check_args(args)
        pos = argument_index(plan, spec.grad.wrt)
        arg = plan.args[pos]
        length = {I: rows, J: cols}.get(arg.cat, 1)
        limits.admit(limits.budget(plan, length, cols, 1, received, np.dtype(dtype).itemsize,
                                   pairs=float(rows) * cols, output_widths=[("value", arg.dim)]), settings, scope)
        cotangent = gradients.check_cotangent(plan, cotangent, rows, dtype)
        if self.settings.reject_nonfinite:
            limits.check_finite([a.name for a in plan.args] + ["the cotangent"], checked + [cotangent])
        name = f"grad_{plan.args[pos].name}"
        return Work(plan, checked, rows, cols, [name],
                    lambda run: [gradients.vjp(plan, pos, checked, cotangent, run)])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _prepare(executor, plan: Plan, dtype, seconds: float, started: list[float]) -> None:
    """`executor.prepare` with compilers killed after `seconds` (a compile thread's task); appends its start time
    to `started`."""
    started.append(time.monotonic())
    with time_limit(seconds):
        executor.prepare(plan, dtype)


def build(spec: Spec, wrt: str | int | None, settings: Settings) -> Plan:
    """Parse, check and differentiate (blocking: run in a plan worker process by `Planner.plan`)."""
    limits.check_text(spec, settings)
    plan = spec.plan()
    limits.check_plan(plan, settings)
    if wrt is not None:              # differentiate now, within the compile-time budget (rules are cached)
        rule = gradient(plan, argument_index(plan, wrt))
        for derived in (getattr(rule, "plan", None), getattr(rule, "logsumexp", None)):
            if derived is not None:
                limits.check_plan(derived, settings)
    return plan


def as_list(result) -> list[np.ndarray]:
    return list(result) if isinstance(result, tuple) else [result]


def argument_index(plan: Plan, wrt: str | int) -> int:
    """The position of the argument named (or numbered) `wrt`."""
    for spec in plan.args:
        if wrt == spec.pos or wrt == spec.name:
            return spec.pos
    names = ", ".join(a.name for a in plan.args)
    raise ArgumentError(f"grad.wrt = {wrt!r} names no argument of this reduction (arguments: {names})")
