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


def test_max_store_bytes_holds_at_every_write(tmp_path):
    """Issue 20 row 10: the cap is applied when a file is written, not by the periodic retention pass: the oldest
    finished jobs are evicted to make room, and a file that cannot fit beside the unfinished jobs is refused."""
    from kred.service.store import StoreFull
    store, cap = JobStore(tmp_path), 20_000

    def held():
        return sum(p.stat().st_size for p in (tmp_path / "inputs").iterdir()) + \
            sum(p.stat().st_size for p in (tmp_path / "results").iterdir())

    finished = []
    for k in range(12):                     # each job ~ 2 x 1.6 kB: 12 of them would be ~ 40 kB
        record = store.create({"request": {}}, [np.zeros(200)], 1, 1, max_bytes=cap)
        store.write_result(record["id"], {"names": ["value"]}, [np.zeros(200)], max_bytes=cap)
        store.update(record["id"], state="done", finished=1000.0 + k)
        finished.append(record["id"])
        assert held() <= cap
    kept = [job for job in finished if store.get(job) is not None]
    assert kept == finished[-len(kept):] and len(kept) < 12            # the oldest went first
    unfinished = [store.create({"request": {}}, [np.zeros(200)], 1, 1, max_bytes=cap)["id"] for _ in range(5)]
    assert held() <= cap
    with pytest.raises(StoreFull, match="max_store_bytes"):
        for _ in range(20):                 # unfinished jobs are never evicted: at some point nothing fits
            unfinished.append(store.create({"request": {}}, [np.zeros(200)], 1, 1, max_bytes=cap)["id"])
            assert held() <= cap
    assert held() <= cap and all(store.get(job) is not None for job in unfinished)
    assert len(list((tmp_path / "inputs").iterdir())) == len(store.list(1000))   # the refused file is gone


def test_a_job_that_does_not_fit_the_store_is_a_507(tmp_path):
    import httpx

    from kred.service.app import create_app
    from kred.wire import arrow
    from service_helpers import ALIASES, FORMULA, Server, data, settings
    content = bytes(arrow.encode({"formula": FORMULA, "aliases": ALIASES, "axis": 1}, list(data(n=200))))
    with Server(create_app(settings(tmp_path, max_store_bytes=len(content) // 2))) as server:
        reply = httpx.post(f"{server.url}/v1/jobs", content=content, headers={"content-type": arrow.CONTENT_TYPE})
    assert reply.status_code == 507 and "max_store_bytes" in reply.json()["detail"], reply.text
    assert list((tmp_path / "jobs" / "inputs").iterdir()) == []


def test_a_store_made_before_tenants_opens_with_its_jobs_as_default(tmp_path):
    import sqlite3
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "old.arrow").write_bytes(b"x" * 1000)
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, "
               "created REAL NOT NULL, started REAL, finished REAL, error TEXT, rows INTEGER, cols INTEGER, "
               "timings TEXT NOT NULL DEFAULT '{}')")
    db.execute("INSERT INTO jobs (id, state, created) VALUES ('old', 'queued', 1.0)")
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    assert store.get("old")["tenant"] == "default" and [r["id"] for r in store.list(tenant="default")] == ["old"]
    from kred.service.store import StoreFull
    with pytest.raises(StoreFull):          # its 1000 bytes were counted when the store was opened
        store.create({"request": {}}, [], 1, 1, max_bytes=1010)
    assert store.create({"request": {}}, [], 1, 1, max_bytes=10_000)["tenant"] == "default"
