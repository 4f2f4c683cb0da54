"""Issue 10 row 4: a plan past compile_timeout_s is stopped, other clients are not starved, SIGTERM is prompt.

Four nested Laplacians take ~20 s to differentiate on this machine. (If a node budget refuses them sooner, the 422s
come sooner and the kill checks below have nothing to kill: they are then checked on what is left.)
"""
from __future__ import annotations

import threading
import time

import httpx
import psutil

from safety_helpers import NESTED, ServerProcess

ALIASES = ["x=Vi(3)", "y=Vj(3)"]


def workers(server) -> set[int]:
    """The server's plan worker processes (not multiprocessing's resource tracker)."""
    return {p.pid for p in psutil.Process(server.process.pid).children()
            if "multiprocessing.spawn" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())}


def test_a_timed_out_plan_is_killed_and_other_clients_are_served(tmp_path):
    with ServerProcess(tmp_path, compile_timeout_s=1.0) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/formulas/validate", json={"formula": "x+y", "aliases": ALIASES}).status_code == 200
            first = workers(server)
            answers = []

            def nested():
                answers.append(http.post("/v1/formulas/validate", json={"formula": NESTED, "aliases": ALIASES}))

            threads = [threading.Thread(target=nested) for _ in range(2)]      # both workers busy
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [r.status_code for r in answers] == [422, 422], [r.text for r in answers]
            assert time.monotonic() - began < 6
            timed_out = any("compile_timeout_s" in r.json()["detail"] for r in answers)
            began = time.monotonic()
            r = http.post("/v1/formulas/validate", json={"formula": "Exp(-SqDist(x,y)*1.25)", "aliases": ALIASES})
            assert r.status_code == 200 and time.monotonic() - began < 3       # not starved
            if timed_out:                                                        # the busy workers were replaced
                assert not workers(server) & first and len(workers(server)) <= 2
                assert server.rss() < 1 << 30


def test_sigterm_stops_a_busy_server_within_seconds(tmp_path):
    with ServerProcess(tmp_path, compile_timeout_s=60.0, shutdown_timeout_s=2.0) as server:
        def nested():
            try:
                httpx.post(server.url + "/v1/formulas/validate", json={"formula": NESTED, "aliases": ALIASES},
                           timeout=30)
            except httpx.TransportError:
                pass

        threads = [threading.Thread(target=nested, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)                  # planning in earnest
        children = [p for p in psutil.Process(server.process.pid).children(recursive=True)]
        assert server.stop(timeout=15) < 8
        time.sleep(0.5)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
