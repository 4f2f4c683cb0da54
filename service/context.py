"""What every route needs, held once per app on `app.state.service`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from .executors import Executor
from .job_manager import JobManager
from .metrics import Metrics
from .planning import Planner
from .settings import Settings
from .store import JobStore


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    planner: Planner
    executor: Executor
    store: JobStore
    jobs: JobManager
    limiter: anyio.CapacityLimiter          # synchronous reductions computing at once


async def get_service(request: Request) -> Service:
    """async so that FastAPI calls it on the event loop rather than in a worker thread (a hop per request)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
