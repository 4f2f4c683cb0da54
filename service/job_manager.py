"""Jobs: admitted into a bounded queue, run `max_running_jobs` at a time, persisted in the JobStore.

Submission checks everything a synchronous request would (plan, shapes, limits) before the job is stored, so a job
that is accepted only fails for reasons found while computing. Stopping the server leaves running jobs marked
`running`; the next server on the same store re-queues them (and the queued ones) when it starts. A job that the
executor lost (`Interrupted`: the cluster's driver process died) is queued again and run once the executor is
healthy, at most `MAX_RERUNS` times.

Every job belongs to the tenant that submitted it (`auth.Tenant`): another tenant gets the same 404 as for an id that
does not exist, and sees none of it in listings. A tenant's quotas (jobs at once, dataset output bytes) are checked
at submission, with the server's own limits.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kred.engine.errors import BackendError, KredError

from . import datasets, limits
from .auth import OPEN, Tenant
from .errors import ApiError
from .executors import Cancelled, Executor, Interrupted
from .metrics import Metrics
from .planning import Planner
from .schemas import DatasetJobRequest, JobInfo, ReductionSpec
from .settings import Settings
from .store import JobStore, StoreFull

log = logging.getLogger("kred.service.jobs")
MAX_RERUNS = 3                 # a job that keeps killing the executor fails instead of running forever
HEALTH_POLL_S = 0.5


@dataclass
class _Running:
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: float = 0.0


class JobManager:
    def __init__(self, store: JobStore, planner: Planner, executor: Executor, settings: Settings, metrics: Metrics):
        self.store, self.planner, self.executor, self.settings, self.metrics = store, planner, executor, settings, metrics
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.running: dict[str, _Running] = {}
        self._admitting = 0
        self._admitting_for: dict[str, int] = {}
        self._workers: list[asyncio.Task] = []
        self._reruns: dict[str, int] = {}
        self._waiting: set[asyncio.Task] = set()         # interrupted jobs waiting for a healthy executor
        metrics.watch_tenants(store.tenant_counts)

    # Life cycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for job_id in self.store.unfinished():
            self.store.update(job_id, state="queued", progress=0.0, started=None)
            self._enqueue(job_id)
        self._workers = [asyncio.create_task(self._work(), name=f"kred-job-worker-{k}")
                         for k in range(self.settings.max_running_jobs)]

    async def stop(self) -> None:
        for running in self.running.values():
            running.cancel.set()             # lets the computing threads stop early; the jobs stay `running`
        tasks = [*self._workers, *self._waiting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers = []

    # Requests --------------------------------------------------------------------------------------------
    async def submit(self, spec: ReductionSpec, arrays: list[np.ndarray], tenant: Tenant = OPEN) -> JobInfo:
        capacity = self.settings.max_running_jobs + self.settings.max_queued_jobs
        if len(self.queued) + len(self.running) + self._admitting >= capacity:
            raise ApiError(429, "too_busy", f"{capacity} jobs are already running or queued (max_running_jobs + "
                                            "max_queued_jobs); retry later", {"Retry-After": "5"})
        if tenant.max_jobs is not None:
            unfinished, _ = await asyncio.to_thread(self.store.tenant_usage, tenant.name)
            if unfinished + self._admitting_for.get(tenant.name, 0) >= tenant.max_jobs:
                raise ApiError(429, "quota", f"tenant {tenant.name} has {tenant.max_jobs} jobs queued or running "
                                             "(its max_jobs); retry when one has finished", {"Retry-After": "5"})
        self._admitting += 1
        self._admitting_for[tenant.name] = self._admitting_for.get(tenant.name, 0) + 1
        try:
            if isinstance(spec, DatasetJobRequest):
                record = await self._admit_dataset(spec, tenant)
            else:
                plan = await self.planner.plan(spec)
                await self.planner.compile(self.executor, plan, arrays)
                work = await asyncio.to_thread(self.planner.bind, plan, spec, arrays,
                                               self.settings.max_pairs_per_job, "max_pairs_per_job")
                request = spec.model_dump(mode="json", include=set(ReductionSpec.model_fields))
                record = await self._create({"request": request}, arrays, work.rows, work.cols, tenant)
        finally:
            self._admitting -= 1
            self._admitting_for[tenant.name] -= 1
        self._enqueue(record["id"])
        return self.info(record["id"], tenant)

    async def _create(self, meta, arrays, rows, cols, tenant: Tenant, output_bytes: int = 0) -> dict:
        try:
            return await asyncio.to_thread(self.store.create, meta, arrays, rows, cols, tenant.name, output_bytes,
                                           self.settings.max_store_bytes)
        except StoreFull as e:
            raise ApiError(507, "store_full", f"{e}; retry once jobs have finished and been collected",
                           {"Retry-After": "30"}) from None

    async def _admit_dataset(self, spec: DatasetJobRequest, tenant: Tenant) -> dict:
        if not hasattr(self.executor, "run_dataset"):
            raise ApiError(422, "dataset_jobs", "dataset jobs run on the cluster's workers: start the server with "
                                                "the cluster executor (KRED_EXECUTOR=cluster)")
        if spec.grad is not None or spec.ranges:
            raise ApiError(422, "invalid_request", "dataset jobs compute dense reductions: no grad, no ranges")
        plan = await self.planner.plan(spec)
        found = await asyncio.to_thread(datasets.sources, plan, spec, self.settings)
        limits.admit(limits.budget(plan, found.rows, found.cols,
                                   input_bytes=limits.input_bytes(plan, found.rows, found.cols)),
                     self.settings, "job")         # the one admission budget, from the datasets' metadata
        if tenant.max_output_bytes is not None:
            _, used = await asyncio.to_thread(self.store.tenant_usage, tenant.name)
            if used + found.output_bytes > tenant.max_output_bytes:
                raise ApiError(413, "quota", f"this job's output may take {found.output_bytes} bytes; tenant "
                                             f"{tenant.name}'s jobs in the store already budget {used} of its "
                                             f"max_output_bytes ({tenant.max_output_bytes})")
        request = spec.model_dump(mode="json")
        return await self._create({"request": request, "dataset": True}, [], found.rows, found.cols, tenant,
                                  found.output_bytes)

    def info(self, job_id: str, tenant: Tenant | None = OPEN) -> JobInfo:
        """`tenant` None: any tenant's (the job workers' own reads)."""
        record = self.store.get(job_id)
        if record is None or tenant is not None and record["tenant"] != tenant.name:
            raise ApiError(404, "not_found", f"no job {job_id!r} on this server")
        running = self.running.get(job_id)
        if running is not None and record["state"] == "running":
            record["progress"] = running.progress
        return JobInfo(**record)

    def list(self, limit: int, state: str | None, tenant: Tenant = OPEN) -> list[JobInfo]:
        return [self.info(r["id"], None) for r in self.store.list(limit, state, tenant.name)]

    def cancel(self, job_id: str, tenant: Tenant = OPEN) -> JobInfo:
        info = self.info(job_id, tenant)
        if info.state == "queued":
            self.store.update(job_id, state="cancelled", finished=time.time())
            self.queued.discard(job_id)
        elif info.state == "running" and job_id in self.running:
            self.running[job_id].cancel.set()        # the worker records `cancelled` when the executor stops
        return self.info(job_id, tenant)

    def result_path(self, job_id: str, tenant: Tenant = OPEN):
        info = self.info(job_id, tenant)
        if info.state != "done":
            detail = f": {info.error}" if info.error else ""
            raise ApiError(409, "not_ready", f"job {job_id} is {info.state}{detail}; its result exists once done")
        return self.store.result_path(job_id)

    # Workers ---------------------------------------------------------------------------------------------
    def _enqueue(self, job_id: str) -> None:
        self.queued.add(job_id)
        self.queue.put_nowait(job_id)

    def _rerun(self, job_id: str, error: Interrupted) -> bool:
        """Queue an interrupted job again, to run once the executor is healthy; False past MAX_RERUNS."""
        reruns = self._reruns.get(job_id, 0) + 1
        if reruns > MAX_RERUNS:
            return False
        self._reruns[job_id] = reruns
        log.warning("job %s interrupted (%s); queued again (rerun %d of at most %d)", job_id, error, reruns,
                    MAX_RERUNS)
        self.store.update(job_id, state="queued", progress=0.0, started=None)
        self.queued.add(job_id)

        async def when_healthy():
            while self.executor.health() is not None:
                await asyncio.sleep(HEALTH_POLL_S)
            if job_id in self.queued:                # not cancelled meanwhile
                self.queue.put_nowait(job_id)

        task = asyncio.create_task(when_healthy(), name=f"kred-job-rerun-{job_id}")
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)
        return True

    async def _work(self) -> None:
        while True:
            job_id = await self.queue.get()
            if job_id not in self.queued:            # cancelled while queued
                continue
            self.queued.discard(job_id)
            record = self.store.get(job_id)
            if record is None or record["state"] != "queued":
                continue
            running = self.running[job_id] = _Running()
            started = time.time()
            self.store.update(job_id, state="running", started=started, progress=0.0)
            timings = {"queued_s": started - record["created"]}
            try:
                names, outputs, compute_s, extra = await asyncio.to_thread(self._compute, job_id, running)
                timings["compute_s"] = compute_s
                await asyncio.to_thread(self.store.write_result, job_id,
                                        {"names": names, "timings": timings, **extra}, outputs,
                                        self.settings.max_store_bytes)
            except Cancelled:
                self._finish(job_id, started, timings, "cancelled", running.progress)
            except asyncio.CancelledError:           # the server is stopping: the job stays `running` in the store
                raise
            except Interrupted as e:
                if not self._rerun(job_id, e):
                    self._finish(job_id, started, timings, "failed", running.progress,
                                 f"{e} (the job was interrupted {MAX_RERUNS + 1} times; not run again)")
                    self.metrics.reductions.labels("job", "error_503").inc()
            except (KredError, ApiError, StoreFull) as e:
                status = 503 if isinstance(e, BackendError) else 422
                self._finish(job_id, started, timings, "failed", running.progress, _message(e))
                self.metrics.reductions.labels("job", f"error_{status}").inc()
            except Exception:
                reference = secrets.token_hex(6)
                log.exception("job %s failed (reference %s)", job_id, reference)
                self._finish(job_id, started, timings, "failed", running.progress,
                             f"internal error (reference {reference})")
                self.metrics.reductions.labels("job", "error_500").inc()
            else:
                self._finish(job_id, started, timings, "done", 1.0)
                self.metrics.reduced("job", (record["rows"] or 0) * (record["cols"] or 0), timings["compute_s"])
            finally:
                self.running.pop(job_id, None)

    def _finish(self, job_id, started, timings, state, progress, error=None) -> None:
        self._reruns.pop(job_id, None)
        finished = time.time()
        timings = timings | {"total_s": finished - started}
        self.store.update(job_id, state=state, finished=finished, progress=progress, error=error, timings=timings)

    def _compute(self, job_id: str, running: _Running):
        """Blocking: read the stored inputs, rebuild the work and run it on the executor. A dataset job's workers
        write its output (blocks written before an interruption are kept); its result names the output."""
        meta, arrays = self.store.load_inputs(job_id)

        def progress(fraction: float) -> None:
            running.progress = float(fraction)

        if meta.get("dataset"):
            spec = DatasetJobRequest.model_validate(meta["request"])
            plan = self.planner.build(spec)
            found = datasets.sources(plan, spec, self.settings)
            start = time.perf_counter()
            self.executor.run_dataset(plan, found.inputs, found.output, progress, running.cancel.is_set)
            return [], [], time.perf_counter() - start, {"output": spec.output}
        spec = ReductionSpec.model_validate(meta["request"])
        plan = self.planner.build(spec)
        work = self.planner.bind(plan, spec, arrays, self.settings.max_pairs_per_job, "max_pairs_per_job")

        def run(plan, arrays, **options):          # options: ranges
            return self.executor.run(plan, arrays, progress=progress, cancelled=running.cancel.is_set, **options)

        start = time.perf_counter()
        outputs = work.compute(run)
        return work.names, outputs, time.perf_counter() - start, {}


def _message(e: Exception) -> str:
    return e.detail if isinstance(e, ApiError) else str(e)
