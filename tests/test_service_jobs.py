"""Jobs through the HTTP API (in-process): lifecycle, progress, cancel, queue limits, failures, restart recovery."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from kred.client import JobFailed, LimitExceeded, TooBusy
from kred.engine.errors import ArgumentError
from kred.service.app import create_app
from kred.service.executors import Cancelled, LocalExecutor
from service_helpers import ALIASES, FORMULA, Running, assert_matches, data, dense, request, settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


class Gated(LocalExecutor):
    """Holds every run at a gate (reporting progress 0.5) until `gate` is set; honours cancellation meanwhile."""

    def __init__(self):
        super().__init__("reference")
        self.gate, self.started = threading.Event(), threading.Event()

    def run(self, plan, arrays, progress=None, cancelled=None, **options):
        if progress is not None:
            progress(0.5)
        self.started.set()
        while not self.gate.wait(0.01):
            if cancelled is not None and cancelled():
                raise Cancelled()
        return super().run(plan, arrays, progress, cancelled, **options)


class Failing(LocalExecutor):
    def __init__(self, error):
        super().__init__("reference")
        self.error = error

    def run(self, plan, arrays, progress=None, cancelled=None, **options):
        raise self.error


async def until(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def state(running, job_id):
    return (await running.raw.get(f"/v1/jobs/{job_id}")).json()


async def test_job_lifecycle(tmp_path):
    gated = Gated()
    async with Running(create_app(settings(tmp_path), executor=gated)) as running:
        x, y, b = data()
        r = await running.submit_arrow(request(axis=1), [x, y, b])
        assert r.status_code == 202
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] in ("queued", "running")
        assert (job["rows"], job["cols"]) == (23, 17)
        await until(lambda: asyncio.sleep(0, gated.started.is_set()))
        info = await state(running, job["id"])
        assert info["state"] == "running" and info["progress"] == 0.5
        r = await running.raw.get(f"/v1/jobs/{job['id']}/result")
        assert r.status_code == 409 and "running" in r.json()["detail"]
        gated.gate.set()
        await until(lambda: _is(running, job["id"], "done"))
        info = await state(running, job["id"])
        assert info["progress"] == 1.0 and info["error"] is None
        assert {"queued_s", "compute_s", "total_s"} <= set(info["timings"])
        async with running.client(transport="arrow") as c:
            result = await (await c.job(job["id"])).result(timeout=5)
            listed = await c.jobs(state="done")
        assert_matches(result, dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)
        assert [j["id"] for j in listed] == [job["id"]]
        metrics = (await running.raw.get("/metrics")).text
        assert 'kred_jobs{state="done"} 1.0' in metrics


async def _is(running, job_id, wanted):
    return (await state(running, job_id))["state"] == wanted


@pytest.mark.parametrize("transport", ["arrow", "shm"])
async def test_client_jobs_with_both_transports_and_every_output_kind(tmp_path, transport):
    async with Running(create_app(settings(tmp_path))) as running:
        x, y, b = data(np.float32)
        async with running.client(transport=transport) as c:
            job = await c.submit(FORMULA, ALIASES, x, y, b, reduction_op="KMin_ArgKMin", opt_arg=2, axis=0)
            result = await job.result(timeout=10, progress=True)
    assert_matches(result, dense("KMin_ArgKMin", FORMULA, None, 2, 0, x, y, b), np.float32)


async def test_cancel_a_running_job(tmp_path):
    gated = Gated()
    async with Running(create_app(settings(tmp_path), executor=gated)) as running:
        async with running.client(transport="arrow") as c:
            job = await c.submit(FORMULA, ALIASES, *data(), axis=1)
            await until(lambda: asyncio.sleep(0, gated.started.is_set()))
            info = await job.cancel(wait=True, timeout=10)
            assert info["state"] == "cancelled" and info["finished"] is not None
            with pytest.raises(JobFailed, match="cancelled"):
                await job.result(timeout=5)
        r = await running.raw.get(f"/v1/jobs/{job.id}/result")
        assert r.status_code == 409


async def test_cancel_a_queued_job_and_the_queue_limit(tmp_path):
    gated = Gated()
    app = create_app(settings(tmp_path, max_running_jobs=1, max_queued_jobs=1), executor=gated)
    async with Running(app) as running:
        x, y, b = data()
        async with running.client(transport="arrow") as c:
            first = await c.submit(FORMULA, ALIASES, x, y, b, axis=1)
            await until(lambda: asyncio.sleep(0, gated.started.is_set()))
            second = await c.submit(FORMULA, ALIASES, x, y, b, axis=0)
            assert (await second.status())["state"] == "queued"
            r = await running.submit_arrow(request(axis=1), [x, y, b])
            assert r.status_code == 429 and r.headers["retry-after"] and "max_queued_jobs" in r.json()["detail"]
            with pytest.raises(TooBusy):
                await c.submit(FORMULA, ALIASES, x, y, b, axis=1)
            assert (await second.cancel(wait=False))["state"] == "cancelled"
            third = await c.submit(FORMULA, ALIASES, x, y, b, axis=0)     # the cancelled job freed its slot
            gated.gate.set()
            assert_matches(await first.result(timeout=10), dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)
            assert_matches(await third.result(timeout=10), dense("Sum", FORMULA, None, None, 0, x, y, b), np.float64)
            assert (await second.status())["state"] == "cancelled"


async def test_job_limits_and_validation_happen_at_submission(tmp_path):
    async with Running(create_app(settings(tmp_path, max_pairs_per_job=100))) as running:
        async with running.client(transport="arrow") as c:
            with pytest.raises(LimitExceeded, match="max_pairs_per_job"):
                await c.submit(FORMULA, ALIASES, *data(), axis=1)
            x, y, b = data()
            with pytest.raises(ArgumentError, match="b"):
                await c.submit(FORMULA, ALIASES, x, y, b[:3], axis=1)
            assert await c.jobs() == []                    # nothing was stored


async def test_failed_jobs_report_user_errors_and_hide_internal_ones(tmp_path):
    async with Running(create_app(settings(tmp_path), executor=Failing(ArgumentError("x is wrong")))) as running:
        async with running.client(transport="arrow") as c:
            job = await c.submit(FORMULA, ALIASES, *data(), axis=1)
            with pytest.raises(JobFailed, match="x is wrong"):
                await job.result(timeout=10)
    secret = RuntimeError("secret /srv/internal detail")
    async with Running(create_app(settings(tmp_path), executor=Failing(secret))) as running:
        async with running.client(transport="arrow") as c:
            job = await c.submit(FORMULA, ALIASES, *data(), axis=1)
            info = await job.wait(timeout=10)
    assert info["state"] == "failed" and "internal error" in info["error"] and "secret" not in info["error"]


async def test_restart_requeues_unfinished_jobs(tmp_path):
    x, y, b = data()
    gated = Gated()                                          # the first server never finishes anything
    app = create_app(settings(tmp_path, max_running_jobs=1), executor=gated)
    async with Running(app) as running:
        async with running.client(transport="arrow") as c:
            running_job = await c.submit(FORMULA, ALIASES, x, y, b, axis=1)
            queued_job = await c.submit(FORMULA, ALIASES, x, y, b, reduction_op="Max", axis=0)
            await until(lambda: asyncio.sleep(0, gated.started.is_set()))
            assert (await queued_job.status())["state"] == "queued"
    # a new server on the same store: both jobs run to the end
    async with Running(create_app(settings(tmp_path, max_running_jobs=1))) as running:
        async with running.client(transport="arrow") as c:
            first, second = await c.job(running_job.id), await c.job(queued_job.id)
            assert_matches(await first.result(timeout=10), dense("Sum", FORMULA, None, None, 1, x, y, b), np.float64)
            assert_matches(await second.result(timeout=10), dense("Max", FORMULA, None, None, 0, x, y, b),
                           np.float64)
