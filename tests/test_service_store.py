"""The job store: one default store per server address, and the retention policy (age, count, bytes)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from kred.service.settings import Settings
from kred.service.store import JobStore


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_two_servers_do_not_share_the_default_store():
    first, second = Settings(port=8000), Settings(port=8001)
    assert first.store_dir != second.store_dir
    assert first.store_dir.name == "127.0.0.1_8000" and Settings(host="::1", port=80).store_dir.name == "--1_80"
    assert Settings(port=8001).store_dir == second.store_dir          # the same server finds its jobs again


def finished_job(store: JobStore, finished: float, nbytes: int = 800, state: str = "done") -> str:
    record = store.create({"request": {}}, [np.zeros(nbytes // 8)], 1, 1)
    store.write_result(record["id"], {"names": ["value"]}, [np.zeros(nbytes // 8)])
    store.update(record["id"], state=state, finished=finished)
    return record["id"]


def test_expire_by_age_count_and_bytes(tmp_path):
    store = JobStore(tmp_path)
    now = 1_000_000.0
    old = finished_job(store, now - 100)
    failed = finished_job(store, now - 50, state="failed")
    recent = [finished_job(store, now - k) for k in (3, 2, 1)]        # oldest first
    running = store.create({"request": {}}, [np.zeros(100)], 1, 1)["id"]
    store.update(running, state="running", started=now - 1000)

    assert store.expire(max_age_s=60, max_jobs=100, max_bytes=1 << 40, now=now) == [old]
    assert store.get(old) is None and not store.inputs_path(old).exists() and not store.result_path(old).exists()
    assert store.expire(max_age_s=60, max_jobs=2, max_bytes=1 << 40, now=now) == [recent[0], failed]
    sizes = {job: sum(p.stat().st_size for p in (store.inputs_path(job), store.result_path(job)))
             for job in recent[1:]}
    budget = store.inputs_path(running).stat().st_size + sizes[recent[2]]   # room for the running job + one
    assert store.expire(max_age_s=60, max_jobs=100, max_bytes=budget, now=now) == [recent[1]]
    assert store.get(running)["state"] == "running"                   # never deleted, whatever its age
    assert {r["id"] for r in store.list()} == {running, recent[2]}
    store.close()


@pytest.mark.anyio
async def test_the_server_applies_retention_periodically(tmp_path):
    from kred.service.app import create_app
    from service_helpers import Running, settings
    config = settings(tmp_path, job_retention_s=0.5, cleanup_interval_s=0.2)
    store = JobStore(config.store_dir)
    expired = finished_job(store, time.time())
    store.close()
    async with Running(create_app(config)) as running:
        async with running.client(transport="arrow") as c:
            assert (await c.job(expired)).id == expired
            for _ in range(50):
                await asyncio.sleep(0.1)
                if expired not in [info["id"] for info in await c.jobs()]:
                    break
            assert expired not in [info["id"] for info in await c.jobs()]
