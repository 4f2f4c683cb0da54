"""An executor that loses its runs (the cluster's driver process died): the server stays up, /healthz answers 503
with the reason, interrupted jobs are queued again and run once the executor is healthy (result vs dense numpy),
and a job interrupted every time fails after MAX_RERUNS reruns instead of looping. In-process; the real thing (a
raylet SIGKILLed under `kred serve`) is in tests/test_service_faults.py."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from kred.client import JobFailed
from kred.service import job_manager
from kred.service.app import create_app
from kred.service.executors import Interrupted, LocalExecutor
from service_helpers import ALIASES, FORMULA, Running, data, settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


class Flaky(LocalExecutor):
    """Loses its first `losses` runs, and is unhealthy after each loss until `back` is set (or at once, with
    `recovers`)."""

    def __init__(self, losses: int, recovers: bool = False):
        super().__init__("reference")
        self.losses, self.runs, self.recovers = losses, 0, recovers
        self.problem: str | None = None
        self.back = threading.Event()

    def health(self):
        if self.problem is not None and self.back.is_set():
            self.problem = None
        return self.problem

    def run(self, plan, arrays, progress=None, cancelled=None, **options):
        self.runs += 1
        if self.runs <= self.losses:
            self.problem = "the cluster driver process exited (test)"
            if not self.recovers:
                self.back.clear()
            raise Interrupted(self.problem)
        return super().run(plan, arrays, progress, cancelled, **options)


def expected(x, y, b):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1, keepdims=True)
    return (d2 * b[None, :, :]).sum(1)


async def test_an_interrupted_job_waits_for_a_healthy_executor_and_runs_again(tmp_path):
    flaky = Flaky(losses=1)
    async with Running(create_app(settings(tmp_path), executor=flaky)) as running:
        assert (await running.raw.get("/healthz")).status_code == 200
        async with running.client(transport="arrow") as c:
            x, y, b = data()
            job = await c.submit(FORMULA, ALIASES, x, y, b, axis=1)
            for _ in range(500):                   # lost once: unhealthy, the job queued again, not run
                reply = await running.raw.get("/healthz")
                if reply.status_code == 503:
                    break
                await asyncio.sleep(0.01)
            assert reply.status_code == 503
            assert reply.json()["status"] == "unavailable" and "driver process exited" in reply.json()["reason"]
            assert (await job.status())["state"] == "queued" and flaky.runs == 1
            flaky.back.set()
            got = await job.result(timeout=20)
            assert (await running.raw.get("/healthz")).json() == {**reply.json(), "status": "ok", "reason": None}
    assert flaky.runs == 2
    np.testing.assert_allclose(got, expected(x, y, b), rtol=1e-12)


async def test_a_job_interrupted_every_time_fails_after_the_reruns(tmp_path):
    flaky = Flaky(losses=10**9, recovers=True)
    flaky.back.set()                               # healthy again at once: each rerun is lost too
    async with Running(create_app(settings(tmp_path), executor=flaky)) as running:
        async with running.client(transport="arrow") as c:
            job = await c.submit(FORMULA, ALIASES, *data(), axis=1)
            with pytest.raises(JobFailed, match="interrupted 4 times"):
                await job.result(timeout=20)
    assert flaky.runs == job_manager.MAX_RERUNS + 1
