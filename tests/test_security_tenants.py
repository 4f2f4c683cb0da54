"""Issue 20 row 8, against a real uvicorn on 127.0.0.1: several named tokens, each a tenant; a job belongs to the
tenant that made it and is a 404 for every other (status, result, cancel, listing); /metrics counts per tenant; a
tenant's job quota; one shared token still works for a single user. `authenticate` maps headers to tenants.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest

from kred.service.app import create_app
from kred.service.auth import authenticate
from kred.service.errors import ApiError
from kred.service.settings import Settings
from kred.service.store import JobStore
from kred.wire import arrow
from service_helpers import ALIASES, FORMULA, Server, data, dense, settings

TENANTS = [{"name": "alice", "token": "alice-token-1"}, {"name": "bob", "token": "bob-token-2", "max_jobs": 1},
           {"name": "carol", "token": "carol-token-3", "max_jobs": 0}]


def submit(client, token, n=23):
    x, y, b = data(n=n)
    content = bytes(arrow.encode({"formula": FORMULA, "aliases": ALIASES, "axis": 1}, [x, y, b]))
    return client.post("/v1/jobs", content=content, headers={"content-type": arrow.CONTENT_TYPE,
                                                             "authorization": f"Bearer {token}"})


def as_(token):
    return {"authorization": f"Bearer {token}"}


def wait(client, job_id, token, timeout=60):
    deadline = time.monotonic() + timeout
    while (info := client.get(f"/v1/jobs/{job_id}", headers=as_(token)).json())["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    return info


def test_jobs_belong_to_their_tenant(tmp_path):
    app = create_app(settings(tmp_path, tenants=TENANTS))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        reply = submit(client, "alice-token-1")
        assert reply.status_code == 202, reply.text
        job = reply.json()["id"]
        assert wait(client, job, "alice-token-1")["state"] == "done"
        meta, (result,) = arrow.decode(client.get(f"/v1/jobs/{job}/result", headers=as_("alice-token-1")).content)
        x, y, b = data()
        np.testing.assert_allclose(result, dense("Sum", FORMULA, None, None, 1, x, y, b), rtol=1e-10)
        # bob: every route answers exactly as for an id that does not exist
        missing = "0" * 24
        for method, path in (("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/result"), ("DELETE", "/v1/jobs/{}")):
            theirs = client.request(method, path.format(job), headers=as_("bob-token-2"))
            nothing = client.request(method, path.format(missing), headers=as_("bob-token-2"))
            assert theirs.status_code == nothing.status_code == 404
            assert theirs.json()["detail"].replace(job, "ID") == nothing.json()["detail"].replace(missing, "ID")
        assert client.get("/v1/jobs", headers=as_("bob-token-2")).json() == []
        assert [j["id"] for j in client.get("/v1/jobs", headers=as_("alice-token-1")).json()] == [job]
        assert client.get(f"/v1/jobs/{job}", headers=as_("alice-token-1")).json()["state"] == "done"   # not cancelled
        # no token, a wrong one, a prefix of a real one: 401
        for headers in ({}, as_("dave"), as_("alice-token"), {"authorization": "Basic alice-token-1"}):
            assert client.get("/v1/jobs", headers=headers).status_code == 401
        # carol's quota: no job at all (max_jobs counts her queued and running ones: test_tenant_usage)
        refused = submit(client, "carol-token-3")
        assert refused.status_code == 429 and "max_jobs" in refused.json()["detail"], refused.text
        metrics = client.get("/metrics", headers=as_("alice-token-1")).text
    assert re.search(r'kred_tenant_jobs\{state="done",tenant="alice"\} 1\.0', metrics), metrics
    assert re.search(r'kred_tenant_requests_total\{status="404",tenant="bob"\} [3-9]', metrics)
    assert re.search(r'kred_tenant_requests_total\{status="202",tenant="alice"\} 1\.0', metrics)
    assert re.search(r'kred_tenant_requests_total\{status="401",tenant="-"\} [4-9]', metrics)


def test_one_shared_token_and_a_tenants_file(tmp_path):
    tokens = tmp_path / "tenants.json"
    tokens.write_text(json.dumps([{"name": "team", "token": "team-token"}]))
    app = create_app(settings(tmp_path, token="shared-token", tenants_file=tokens))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = submit(client, "shared-token").json()["id"]
        assert wait(client, job, "shared-token")["state"] == "done"
        assert [j["id"] for j in client.get("/v1/jobs", headers=as_("shared-token")).json()] == [job]
        assert client.get(f"/v1/jobs/{job}", headers=as_("team-token")).status_code == 404
        assert client.get("/v1/jobs", headers=as_("nope")).status_code == 401


def test_authenticate():
    config = Settings(tenants=TENANTS, token="shared")
    assert authenticate("Bearer alice-token-1", config).name == "alice"
    assert authenticate("bearer   bob-token-2 ", config).max_jobs == 1
    assert authenticate("Bearer shared", config).name == "default"
    for header in (None, "", "Bearer", "Bearer ", "Token alice-token-1", "Bearer alice-token-1x", "Bearer alice"):
        with pytest.raises(ApiError) as refused:
            authenticate(header, config)
        assert refused.value.status == 401
    assert authenticate(None, Settings()).name == "default"                 # no tokens: authentication is off
    with pytest.raises(ValueError, match="own non-empty token"):
        Settings(tenants=[{"name": "a", "token": "t"}, {"name": "b", "token": "t"}])
    with pytest.raises(ValueError, match="unique"):
        Settings(tenants=[{"name": "a", "token": "t"}, {"name": "a", "token": "u"}])


def test_tenant_usage(tmp_path):
    store = JobStore(tmp_path)
    jobs = [store.create({"request": {}}, [], 1, 1, tenant, output_bytes=size)["id"]
            for tenant, size in (("a", 10), ("a", 20), ("b", 40))]
    store.update(jobs[0], state="done")
    assert tuple(store.tenant_usage("a")) == (1, 30) and tuple(store.tenant_usage("b")) == (1, 40)
    assert store.tenant_counts() == {("a", "done"): 1, ("a", "queued"): 1, ("b", "queued"): 1}
    assert [r["id"] for r in store.list(tenant="b")] == [jobs[2]]
