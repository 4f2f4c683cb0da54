"""The FastAPI app factory: `create_app(settings, executor=None)`.

Layers, outermost first: CatchAll (500s without tracebacks) > metrics > ingress (authentication from the headers,
before any body byte) > body-size limit > FastAPI (error handlers). `server_config` is the uvicorn configuration `kred
serve` runs it with (header deadline, connection caps: see ingress.py). Startup opens the job store, starts the
executor (unless one is given, as tests do) and re-queues the jobs a previous server left unfinished; shutdown stops
the job workers and the executor it started.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from . import errors
from .auth import require_token
from .context import Service
from .executors import Executor, make_executor
from .ingress import Ingress, guarded
from .job_manager import JobManager
from .limits import Bodies, BodyLimit
from .metrics import Metrics, Middleware
from .planning import Planner
from .routers import formulas, health, jobs, reductions
from .routers.health import VERSION
from .settings import Settings
from .store import JobStore

log = logging.getLogger("kred.service")
DOCS_ASSETS = "/docs-assets"


def widen_uvicorn_reads(limit: int = 4 << 20) -> None:
    """uvicorn stops reading a request body every 64 KiB until the app has taken it: one event-loop round trip per
    64 KiB, 1600 for a 100 MB upload, which halves upload speed. Its high-water mark is a module constant; raise it
    (per connection, memory stays bounded by `limit`). Harmless if a uvicorn version no longer has it."""
    import importlib
    for name in ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl"):
        try:
            module = importlib.import_module(name)
        except ImportError:              # httptools is optional
            continue
        if hasattr(module, "HIGH_WATER_LIMIT"):
            module.HIGH_WATER_LIMIT = limit


def _start_executor(settings: Settings) -> Executor:
    """The configured executor. `ray.init` replaces the SIGTERM handler with one that exits on the spot; the server's
    own is put back so that SIGTERM (docker stop, Kubernetes) still shuts it down gracefully."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        return make_executor(settings.executor, settings.backend, settings.ray_address, settings.local_below_pairs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


async def _apply_retention(store: JobStore, settings: Settings) -> None:
    """Delete finished jobs past the retention settings, at start and every `cleanup_interval_s`."""
    while True:
        try:
            expired = await asyncio.to_thread(store.expire, settings.job_retention_s, settings.max_stored_jobs,
                                              settings.max_store_bytes)
            if expired:
                log.info("job retention: deleted %d finished jobs", len(expired))
        except Exception:                                   # a full disk or a locked file must not stop the server
            log.exception("job retention failed; trying again in %s s", settings.cleanup_interval_s)
        await asyncio.sleep(settings.cleanup_interval_s)


def create_app(settings: Settings | None = None, executor: Executor | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_executor = executor is None
        runner = _start_executor(settings) if own_executor else executor
        store = JobStore(settings.store_dir)
        planner = Planner(settings)
        manager = JobManager(store, planner, runner, settings, metrics)
        app.state.service = Service(settings, metrics, planner, runner, store, manager,
                                    anyio.CapacityLimiter(settings.threads))
        metrics.watch(store.counts, lambda: (planner.hits, planner.misses))
        await manager.start()
        cleanup = asyncio.create_task(_apply_retention(store, settings), name="kred-job-retention")
        log.info("kred service ready: executor %s, job store %s, auth %s", runner.name, settings.store_dir,
                 "on" if settings.token else "off")
        try:
            yield
        finally:
            cleanup.cancel()
            await asyncio.gather(cleanup, return_exceptions=True)
            await manager.stop()
            planner.close()
            store.close()
            if own_executor:
                runner.close()

    # /docs and /redoc load Swagger UI and ReDoc from the assets fastapi-offline ships (no CDN: they work offline)
    app = FastAPIOffline(title="kred", version=VERSION, lifespan=lifespan, static_url=DOCS_ASSETS,
                  description="KeOps-style formula reductions over HTTP: arrays travel as Arrow IPC streams or, "
                              "on the same host, through shared memory.")
    errors.install(app)
    protected = [Depends(require_token)]
    app.include_router(reductions.router, dependencies=protected)
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(formulas.router, dependencies=protected)
    app.include_router(health.router)
    bodies = Bodies(settings.max_inflight_bytes, settings.max_inflight_bytes_per_tenant)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, bodies=bodies,
                       timeout=settings.body_timeout_s, json_limit=settings.max_json_bytes,
                       rate=settings.min_body_bytes_per_s)
    app.add_middleware(Ingress, settings=settings)
    app.add_middleware(Middleware, metrics=metrics)
    app.add_middleware(errors.CatchAll)
    return app


def server_config(app, settings: Settings, **options):
    """The uvicorn configuration to serve `app` with: its HTTP protocol class closes connections that take longer
    than `header_timeout_s` to send their headers and caps connections (ingress.guarded); idle keep-alive
    connections close after `header_timeout_s` too."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:                  # httptools is optional
        base = H11Protocol
    options = {"host": settings.host, "port": settings.port, "timeout_graceful_shutdown": settings.shutdown_timeout_s,
               "timeout_keep_alive": max(1, int(settings.header_timeout_s))} | options
    return uvicorn.Config(app, http=guarded(base, settings), **options)
