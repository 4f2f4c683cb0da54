"""Fault injection against a real `kred serve --executor cluster` (its own embedded Ray, driven from a child process):
the server SIGKILLed in the middle of a job leaves no Ray process behind, and the next server on the same store
re-runs the job to the exact result (rows checked against dense numpy); the raylet SIGKILLed mid-job leaves the
server up (503 with the reason while its driver restarts), the job re-run to the exact result and no orphan.
SIGKILL of a Ray worker mid-job: tests/test_cluster.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kred.client import Client
from kred.client.client import Job
from kred.engine.cluster.reaper import descendants

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")]

GAUSS, ALIASES = "Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]


def serve(store: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # RAY_ADDRESS=local: a Ray of the server's own, never another one found on this machine
    env = {**os.environ, "KRED_STORE_DIR": str(store), "RAY_ADDRESS": "local", "KRED_LOCAL_BELOW_PAIRS": "0",
           "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(200 << 20)}
    process = subprocess.Popen([sys.executable, "-m", "kred.client.cli", "serve", "--executor", "cluster", "--port",
                                str(port), "--log-level", "warning"], env=env, cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with Client(url, transport="arrow") as client:
        while True:
            try:
                client.health()
                return process, url
            except Exception:
                assert process.poll() is None and time.monotonic() < deadline, "kred serve did not start"
                time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out {why()}"
        time.sleep(0.1)


def test_server_killed_mid_job_leaves_no_ray_process_and_the_job_is_rerun(tmp_path):
    rng = np.random.default_rng(7)
    n, m = 400_000, 20_000                      # 8e9 pairs: seconds of work on 2 cores, long enough to be cut
    x, y, b = (rng.random((n, 3), dtype=np.float32), rng.random((m, 3), dtype=np.float32),
               rng.random((m, 1), dtype=np.float32))
    server, url = serve(tmp_path / "store")
    try:
        with Client(url, transport="arrow") as client:
            job = client.submit(GAUSS, ALIASES, x, y, b, axis=1)
            wait_for(lambda: job.status()["state"] == "running" and 0 < job.status()["progress"], timeout=120)
            assert job.status()["progress"] < 1, "the job ended before the server could be killed"
        ray_processes = descendants(server.pid)
        assert ray_processes
        server.send_signal(signal.SIGKILL)
        server.wait()
        wait_for(lambda: not any(alive(p) for p in ray_processes), timeout=30)     # no orphan
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    server, url = serve(tmp_path / "store")          # the same store: the job is re-queued and run again
    try:
        with Client(url, transport="arrow") as client:
            got = Job(client, {"id": job.id}).result(timeout=600)
    finally:
        server.terminate()
        server.wait(60)
    rows = rng.choice(n, 300, replace=False)         # dense numpy on a sample of rows
    d2 = ((x[rows, None, :].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(got[rows], np.exp(-d2) @ b.astype(np.float64), rtol=1e-5)
    assert got.shape == (n, 1) and np.isfinite(got).all()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


VICTIMS = {"raylet": lambda pid: name(pid) == "raylet",
           "dashboard agent": lambda pid: "dashboard/agent.py" in cmdline(pid)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", VICTIMS)
def test_ray_killed_mid_job_leaves_the_server_up_and_the_job_exact(tmp_path, victim):
    """Killing the raylet (or Ray's dashboard agent, which takes the raylet with it) ends the server's Ray driver
    process, not the server: /healthz answers 503 and why, a new driver with a new Ray is started, the interrupted
    job runs again, and no process of the old Ray is left."""
    rng = np.random.default_rng(8)
    n, m = 300_000, 20_000
    x, y, b = (rng.random((n, 3), dtype=np.float32), rng.random((m, 3), dtype=np.float32),
               rng.random((m, 1), dtype=np.float32))
    server, url = serve(tmp_path / "store")
    try:
        with Client(url, transport="arrow") as client:
            job = client.submit(GAUSS, ALIASES, x, y, b, axis=1)
            wait_for(lambda: job.status()["state"] == "running" and 0 < job.status()["progress"], timeout=90)
            raylets = [p for p in descendants(server.pid) if name(p) == "raylet"]
            assert len(raylets) == 1
            driver = parent(raylets[0])                # ray.init started the raylet: the server's driver process
            old_ray = [driver, *descendants(driver)]
            targets = [p for p in old_ray if VICTIMS[victim](p)]
            assert len(targets) == 1, f"{len(targets)} {victim} processes"
            assert job.status()["progress"] < 1, f"the job ended before the {victim} could be killed"
            os.kill(targets[0], signal.SIGKILL)
            replies = []

            def unhealthy():
                reply = httpx.get(f"{url}/healthz", timeout=10)
                replies.append(reply)
                return reply.status_code == 503

            wait_for(unhealthy, timeout=60)
            assert "driver process exited" in replies[-1].json()["reason"]
            wait_for(lambda: not any(alive(p) for p in old_ray), timeout=30,       # the old Ray is gone, whole
                     why=lambda: [(p, name(p), cmdline(p)[:200]) for p in old_ray if alive(p)])
            got = job.result(timeout=150)                                          # run again on the new driver
            assert server.poll() is None                                           # the HTTP server stayed up
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        new_ray = descendants(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    wait_for(lambda: not any(alive(p) for p in new_ray), timeout=30)
    rows = rng.choice(n, 300, replace=False)
    d2 = ((x[rows, None, :].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(got[rows], np.exp(-d2) @ b.astype(np.float64), rtol=1e-5)
    assert got.shape == (n, 1) and np.isfinite(got).all()
