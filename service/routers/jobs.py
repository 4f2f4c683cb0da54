"""Jobs: POST /v1/jobs (202 + id), GET /v1/jobs[/{id}], GET /v1/jobs/{id}/result, DELETE /v1/jobs/{id} (cancel)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from .. import transport
from kred.wire.arrow import CONTENT_TYPE
from ..auth import TenantDep
from ..context import ServiceDep
from ..schemas import ErrorBody, JobInfo
from .reductions import BODY

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 507)}


@router.post("", status_code=202, response_model=JobInfo, openapi_extra={"requestBody": BODY}, responses=ERRORS)
async def submit(request: Request, service: ServiceDep, tenant: TenantDep):
    """Queue a reduction; its inputs are stored before the id is returned, so a restart does not lose it. A JSON
    body with dataset URIs and an `output` (DatasetJobRequest) is an out-of-core job run by the cluster's workers.
    The job belongs to the caller's tenant: other tenants get 404 for it."""
    spec, arrays, segments = await transport.read_request(request, service.settings, datasets=True)
    try:
        info = await service.jobs.submit(spec, arrays, tenant)
    finally:
        arrays = None
        if segments is not None:
            segments.close()
    return JSONResponse(info.model_dump(), 202, headers={"Location": f"/v1/jobs/{info.id}"})


@router.get("", response_model=list[JobInfo])
async def list_jobs(service: ServiceDep, tenant: TenantDep, limit: int = Query(100, ge=1, le=10_000),
                    state: Literal["queued", "running", "done", "failed", "cancelled"] | None = None):
    """The caller's tenant's most recent jobs first."""
    return service.jobs.list(limit, state, tenant)


@router.get("/{job_id}", response_model=JobInfo, responses=ERRORS)
async def status(job_id: str, service: ServiceDep, tenant: TenantDep):
    """State, progress (0..1), timings and error of a job."""
    return service.jobs.info(job_id, tenant)


@router.get("/{job_id}/result", responses={200: {"content": {CONTENT_TYPE: {}}}} | ERRORS)
async def result(job_id: str, service: ServiceDep, tenant: TenantDep):
    """The outputs as an Arrow stream (409 until the job is done)."""
    return FileResponse(service.jobs.result_path(job_id, tenant), media_type=CONTENT_TYPE)


@router.delete("/{job_id}", response_model=JobInfo, responses=ERRORS)
async def cancel(job_id: str, service: ServiceDep, tenant: TenantDep):
    """Cancel a queued or running job (a running one stops at its next block; poll until `cancelled`)."""
    return service.jobs.cancel(job_id, tenant)
