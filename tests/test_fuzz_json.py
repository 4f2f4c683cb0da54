"""JSON-body fuzz (issue 20): random and extreme JSON (sizes, nesting, long arrays, wrong types in every field) against
every JSON route of a real `kred serve` on 127.0.0.1: never a 5xx, small replies, and the server's memory bounded.
"""
from __future__ import annotations

import json

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from safety_helpers import ServerProcess
from service_helpers import ALIASES, FORMULA

TOKEN = "fuzz-token"
ROUTES = ["/v1/reduce", "/v1/jobs", "/v1/formulas/validate", "/v1/shm/probe"]
MAX_JSON = 1 << 20
FIELDS = ["formula", "aliases", "reduction_op", "axis", "opt_arg", "formula2", "ranges", "grad", "arrays", "out",
          "shm_key", "inputs", "output", "dtype_acc", "fast_math", "segment", "size", "key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("fuzz"), token=TOKEN, max_json_bytes=MAX_JSON) as running:
        running.base_rss = running.rss()
        running.http = httpx.Client(base_url=running.url, timeout=60,
                                    headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
        yield running
        running.http.close()


scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10), inner, max_size=6), max_leaves=40)


@st.composite
def bodies(draw) -> bytes:
    """A request with some fields replaced by anything, or a large or deep document, or bytes that are not JSON."""
    kind = draw(st.sampled_from(["mutated", "random", "long array", "deep", "long string", "raw"]))
    if kind == "mutated":
        body = {"formula": FORMULA, "aliases": ALIASES, "reduction_op": "Sum", "axis": 1}
        body |= draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=4))
        return json.dumps(body).encode()
    if kind == "random":
        return json.dumps(draw(values)).encode()
    if kind == "long array":
        n = draw(st.sampled_from([65_536, 65_537, 100_000, 200_000]))
        field = draw(st.sampled_from(["inputs", "aliases", "arrays", "formula"]))
        item = draw(scalars)
        array = [item] * n
        doc = {"formula": FORMULA, "aliases": ALIASES, "reduction_op": "Sum", "output": "/tmp/x",
               field: {"p": array} if field == "inputs" else array}
        return json.dumps(doc).encode()[:MAX_JSON + 10]
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if kind == "long string":
        size = draw(st.sampled_from([10_001, 100_000, MAX_JSON - 100, MAX_JSON + 1]))
        field = draw(st.sampled_from(["formula", "reduction_op", "shm_key", "output"]))
        return json.dumps({"formula": FORMULA, "aliases": ALIASES, field: "S" * size}).encode()
    return draw(st.binary(max_size=200))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies(), route=st.sampled_from(ROUTES))
def test_json_bodies_never_get_a_5xx(server, body, route):
    r = server.http.post(route, content=body)
    assert r.status_code < 500, (route, r.status_code, r.text[:300], body[:200])
    assert len(r.content) < 16384, len(r.content)
    # every body is at most ~1 MB; the server never holds more than a bounded multiple of that
    assert psutil.Process(server.process.pid).memory_info().rss - server.base_rss < 256 << 20


def test_the_server_still_serves_after_the_fuzz(server):
    r = server.http.post("/v1/formulas/validate",
                         content=json.dumps({"formula": FORMULA, "aliases": ALIASES, "reduction_op": "Sum",
                                             "axis": 1}))
    assert r.status_code == 200 and r.json()["reduction_op"] == "Sum"
    assert server.alive()
