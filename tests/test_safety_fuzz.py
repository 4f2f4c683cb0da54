"""Issue 10: the bounded fuzz run of CI. 2,000 grammar-aware formulas, 500 mutated Arrow bodies and 200 mutated
shared-memory descriptors, half against the app in-process and half against a real `kred serve`: no 5xx, the server
alive, its memory bounded. (The long run: `python -m benchmarks.fuzz --count 100000`.)"""
from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks.fuzz import fuzz
from kred.engine.numpy import Genred
from kred.service.app import create_app
from kred.wire import arrow
from safety_helpers import ServerProcess
from service_helpers import settings


@pytest.mark.slow
def test_fuzz_in_process(tmp_path):
    with TestClient(create_app(settings(tmp_path, compile_timeout_s=2.0)), raise_server_exceptions=False) as http:
        result = fuzz(http, random.Random(1), 1000, 250, 100)
        assert result["failures"] == [] and result["generator_errors"] == []
        assert result["sent"] == {"formula": 1000, "arrow": 250, "shm": 100}
        assert http.get("/healthz").status_code == 200


@pytest.mark.slow
def test_fuzz_a_real_server(tmp_path):
    with ServerProcess(tmp_path, compile_timeout_s=2.0) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            fuzz(http, random.Random(2), 50, 10, 10)                    # warm: workers, allocator, caches
            before = server.rss()
            result = fuzz(http, random.Random(3), 1000, 250, 100)
        assert result["failures"] == [] and result["generator_errors"] == []
        assert server.alive()
        assert server.rss() - before < 150 << 20


# Found by the long run (python -m benchmarks.fuzz --count 100000 --seconds 360, seed 0) --------------------------

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "p = Pm(1)"]


@pytest.mark.parametrize("text, scale", [("(1e300 * 1e300) * p", float("inf")), ("(2000 * 3000) * p", 6e6),
                                         ("(1e300 * 1e300) * (2 * p)", float("inf"))])
def test_products_of_constants_that_do_not_fold_are_kept(text, scale):
    """A product of constants that cannot fold (inf, or an integer past IntCst's range) sent the simplifier's two
    Mult rules into each other until RecursionError (a 500 from /v1/formulas/validate)."""
    p = np.array([0.5])
    x = np.zeros((2, 3))
    result = Genred(text, ALIASES[:1] + ALIASES[3:], axis=1)(x, p, backend="reference")
    np.testing.assert_array_equal(result, np.full((2, 1), scale * 0.5))


def test_the_fuzz_formula_is_a_4xx(tmp_path):
    body = {"formula": "(x / Sin((1 | Laplacian(((1e300 * 1e300) | p), 2.5))))", "aliases": ALIASES,
            "reduction_op": "Min", "axis": 0, "opt_arg": 1}
    with TestClient(create_app(settings(tmp_path)), raise_server_exceptions=False) as http:
        r = http.post("/v1/formulas/validate", json=body)
        assert r.status_code == 422 and "Laplacian" in r.json()["detail"], r.text


def test_an_arrow_field_name_that_is_not_utf8_is_a_400(tmp_path):
    body = bytes(arrow.encode({"formula": "x", "aliases": ["x = Vi(1)"], "axis": 1}, [np.ones((2, 1))]))
    at = body.index(b"a0")
    bad = body[:at] + b"\xa8\xdc" + body[at + 2:]
    with pytest.raises(arrow.WireError, match="UnicodeDecodeError"):
        arrow.decode(bad)
    with TestClient(create_app(settings(tmp_path)), raise_server_exceptions=False) as http:
        r = http.post("/v1/reduce", content=bad, headers={"content-type": arrow.CONTENT_TYPE})
        assert r.status_code == 400, r.text
