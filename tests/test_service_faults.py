"""Fault injection against a real `kred serve --executor cluster` (its own embedded Ray): the server SIGKILLed in
the middle of a job leaves no Ray process behind, and the next server on the same store re-runs the job to the exact
result (rows checked against dense numpy). SIGKILL of a Ray worker mid-job: tests/test_cluster.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    env = {**os.environ, "KRED_STORE_DIR": str(store), "RAY_ADDRESS": "local", "KRED_LOCAL_BELOW_PAIRS": "0"}
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


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
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
