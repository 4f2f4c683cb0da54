"""A real `kred serve` in its own process (a crash of the server must not take the test down with it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil

from service_helpers import free_port

SERVE = "from kred.client.cli import app; app()"


class ServerProcess:
    """`kred serve --executor local` on 127.0.0.1 with the reference backend; `env` adds KRED_* settings."""

    def __init__(self, tmp_path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {"KRED_BACKEND": "reference", "KRED_STORE_DIR": str(tmp_path / "jobs")} | {
            f"KRED_{k.upper()}": str(v) for k, v in env.items()}
        self.log = tmp_path / f"server-{self.port}.log"

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--executor", "local", "--port",
                                         str(self.port), "--log-level", "warning"], env=self.env,
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kred serve did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(self.url + "/healthz", timeout=10).status_code == 200

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self, timeout: float = 10) -> float:
        """SIGTERM; the seconds it took to exit."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return time.monotonic() - began

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.stop()


def nested_laplacians(depth: int) -> str:
    """Issue 10 row 2's formula: `depth` Laplacians around Exp(-SqDist(x,y))*Sin(Sum(x*y)); 4 take ~20 s to plan."""
    formula = "Exp(-SqDist(x,y))*Sin(Sum(x*y))"
    for _ in range(depth):
        formula = f"Laplacian(Sum({formula}),x)"
    return formula


NESTED = nested_laplacians(4)
