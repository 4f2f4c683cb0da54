"""POST /v1/reduce: one synchronous reduction (or its gradient), arrays by Arrow stream or shared memory."""
from __future__ import annotations

import time
from functools import partial

import anyio
from fastapi import APIRouter, Request

from .. import transport
from kred.wire.arrow import CONTENT_TYPE
from ..context import ServiceDep
from ..errors import ApiError
from ..executors import Cancelled
from ..schemas import ErrorBody, ReduceRequest, SharedResult

router = APIRouter(prefix="/v1", tags=["reductions"])

BODY = {
    "required": True,
    "content": {
        CONTENT_TYPE: {"schema": {"type": "string", "format": "binary",
                                  "description": "Arrow IPC stream: the request JSON in the schema metadata under "
                                                 "'kred', one column per argument array"}},
        transport.JSON: {"schema": ReduceRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    },
}
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 408, 413, 415, 422, 429, 500, 503, 504)}


@router.post("/reduce", openapi_extra={"requestBody": BODY},
             responses={200: {"content": {CONTENT_TYPE: {}}, "model": SharedResult,
                              "description": "Arrow stream of the outputs, or where they were written in shared "
                                             "memory"}} | ERRORS)
async def reduce(request: Request, service: ServiceDep):
    """Compute `reduction_op` of `formula` over axis `axis` (or its gradient when `grad` is given)."""
    start = time.perf_counter()
    spec, arrays, segments = await transport.read_request(request, service.settings)
    receive_s = time.perf_counter() - start
    try:
        plan = await service.planner.plan(spec)
        await service.planner.compile(service.executor, plan, arrays)
        plan_s = time.perf_counter() - start - receive_s

        def compute():
            settings = service.settings
            work = service.planner.bind(plan, spec, arrays, settings.max_pairs_per_request, "max_pairs_per_request")
            began = time.perf_counter()
            deadline = time.monotonic() + settings.compute_timeout_s
            try:          # the executor stops at its next check past the deadline (between blocks, items, shards)
                outputs = work.compute(partial(service.executor.run, cancelled=lambda: time.monotonic() > deadline))
            except Cancelled:
                raise ApiError(504, "timeout", f"the reduction was still computing after {settings.compute_timeout_s}"
                                               " s (compute_timeout_s); it was stopped") from None
            compute_s = time.perf_counter() - began
            return work, outputs, compute_s, transport.write_shared(spec, segments, outputs)

        work, outputs, compute_s, refs = await anyio.to_thread.run_sync(compute, limiter=service.limiter)
    finally:
        arrays = None
        if segments is not None:
            segments.close()
    service.metrics.reduced("request", work.pairs, compute_s)
    meta = {"names": work.names, "rows": work.rows, "cols": work.cols,
            "timings": {"receive_s": receive_s, "plan_s": plan_s, "compute_s": compute_s}}
    return transport.reply(meta, outputs, refs)
