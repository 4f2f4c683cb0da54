"""Issue 10: the bounded fuzz run of CI. 2,000 grammar-aware formulas, 500 mutated Arrow bodies and 200 mutated
shared-memory descriptors, half against the app in-process and half against a real `kred serve`: no 5xx, the server
alive, its memory bounded. (The long run: `python -m benchmarks.fuzz --count 100000`.)"""
from __future__ import annotations

import random

import httpx
import pytest
from fastapi.testclient import TestClient

from benchmarks.fuzz import fuzz
from kred.service.app import create_app
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
