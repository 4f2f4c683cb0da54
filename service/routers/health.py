"""GET /healthz (open), GET /metrics (Prometheus), POST /v1/shm/probe (do client and server share memory?)."""
from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from .. import metrics
from ..auth import require_token
from ..context import ServiceDep
from ..schemas import Health, ShmProbe
from kred.wire.shm import ClientSegments, SharedMemoryError

router = APIRouter(tags=["health"])

try:
    VERSION = version("kred")
except PackageNotFoundError:       # running from a source tree without installing
    VERSION = "0+unknown"


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(service: ServiceDep):
    """200 when the server can compute; 503 with the reason while its executor cannot (e.g. the cluster's driver
    process is being restarted after its raylet died)."""
    problem = service.executor.health()
    health = Health(status="ok" if problem is None else "unavailable", version=VERSION,
                    executor=service.executor.name, shared_memory=service.settings.allow_shm, reason=problem)
    return health if problem is None else JSONResponse(health.model_dump(), 503)


@router.get("/metrics", dependencies=[Depends(require_token)], response_class=Response)
async def prometheus(service: ServiceDep):
    return Response(service.metrics.render(), media_type=metrics.CONTENT_TYPE)


@router.post("/v1/shm/probe", dependencies=[Depends(require_token)])
async def probe(body: ShmProbe, service: ServiceDep) -> dict:
    """SHA-256 of the first `size` bytes of the client's probe segment: equal to the client's own hash only when both
    see the same memory, which is how a client decides to use shared memory. Only a segment headed by the client's
    `key` is read: the probe reveals nothing about anyone else's segments."""
    if not service.settings.allow_shm:
        return {"shared_memory": False, "sha256": None}
    try:
        with ClientSegments(body.key) as segments:
            digest = hashlib.sha256(segments.read_bytes(body.segment, body.size)).hexdigest()
    except SharedMemoryError:        # not on this host, not visible to this server, or not the client's
        return {"shared_memory": False, "sha256": None}
    return {"shared_memory": True, "sha256": digest}
