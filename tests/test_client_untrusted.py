"""The client does not trust the server (issue 20 row 13; docs/SECURITY.md, "client"): against a malicious server
on 127.0.0.1 (a raw socket written here) a reply is read only up to what the call can need, `timeout` bounds a
call whole however slowly the server drips bytes, and ids the server (or the caller) chooses never become paths.
"""
from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
from kred.client import AsyncClient, Client, DeadlineExceeded, Job, ReplyTooLarge
from kred.engine.errors import ArgumentError

HUGE = 200 << 20                 # what the malicious server offers (the defect: read whole, +611 MB)
JUNK = b"\0" * (1 << 20)


class FakeServer:
    """Accepts connections on 127.0.0.1, records each request line and answers with `answer(conn, method, path)`."""

    def __init__(self, answer):
        self.answer, self.seen = answer, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            try:
                while True:                              # keep-alive: one request after another
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = conn.recv(65536)
                        if not data:
                            return
                        head += data
                    head, _, body = head.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = lines[0].split(" ", 2)
                    length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                                   if k.strip().lower() == "content-length"), 0)
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.seen.append((method, path))
                    self.answer(conn, method, path)
            except OSError:                              # the client hung up on us: what it should do
                return

    def close(self):
        self.listener.close()


@pytest.fixture
def serve():
    servers = []

    def start(answer) -> FakeServer:
        servers.append(FakeServer(answer))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def send_json(conn, body: bytes, status: str = "200 OK"):
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)


def huge_reply(declared: bool):
    def answer(conn, method, path):
        length = f"Content-Length: {HUGE}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.apache.arrow.stream\r\n{length}\r\n".encode())
        for _ in range(HUGE // len(JUNK)):
            conn.sendall(JUNK if declared else b"%x\r\n%b\r\n" % (len(JUNK), JUNK))
    return answer


def peak_bytes(call) -> int:
    """Peak Python memory allocated while `call` runs (the reply's buffers are Python bytes)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("formula,cap,limit", [
    ("x", None, 2 << 20),                      # the expected output (3 x 1 float64) plus framing: about 1 MiB
    ("NotAnOpHere(x)", 4 << 20, 5 << 20),      # not derivable here: max_reply_bytes
])
def test_a_huge_reply_is_refused_at_the_cap_and_memory_stays_bounded(serve, declared, formula, cap, limit):
    server = serve(huge_reply(declared))
    options = {} if cap is None else {"max_reply_bytes": cap}
    with Client(server.url, transport="arrow", retries=0, timeout=60, **options) as c:
        def call():
            with pytest.raises(ReplyTooLarge, match="more than the"):
                c.reduce(formula, ["x = Vi(1)"], np.ones((3, 1)))
        peak = peak_bytes(call)
    assert peak < 4 * limit, f"{peak / 2**20:.1f} MiB allocated for a reply capped at {limit / 2**20:.1f} MiB"


def test_a_job_result_is_capped_by_its_submitted_request(serve):
    def answer(conn, method, path):
        if method == "POST":
            send_json(conn, b'{"id": "abc123", "state": "queued", "progress": 0.0}', "202 Accepted")
        elif path == "/v1/jobs/abc123":
            send_json(conn, b'{"id": "abc123", "state": "done", "progress": 1.0}')
        else:
            huge_reply(True)(conn, method, path)
    server = serve(answer)
    with Client(server.url, transport="arrow", retries=0, timeout=60) as c:
        job = c.submit("x", ["x = Vi(1)"], np.ones((3, 1)))
        peak = peak_bytes(lambda: pytest.raises(ReplyTooLarge, job.result))
    assert peak < 8 << 20
    assert server.seen[-1] == ("GET", "/v1/jobs/abc123/result")


def drip(headers_only: bool):
    """Answers one byte every 50 ms, for far longer than the client's timeout (per-read timeouts never fire)."""
    def answer(conn, method, path):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
        for byte in (head if headers_only else head + b"\r\n") + b" " * 600:
            conn.sendall(bytes([byte]))
            time.sleep(0.05)
    return answer


@pytest.mark.parametrize("headers_only", [True, False], ids=["headers", "body"])
def test_timeout_bounds_the_whole_call_against_a_dripping_server(serve, headers_only):
    server = serve(drip(headers_only))
    with Client(server.url, transport="arrow", timeout=1.0) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="within 1.0 s"):
            c.health()
        elapsed = time.monotonic() - start
    assert elapsed < 4.0, f"timeout=1 took {elapsed:.1f} s"
    assert len(server.seen) == 1                  # a timeout is not retried: the server may still be computing


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_timeout_bounds_the_whole_call(serve, anyio_backend):
    server = serve(drip(False))
    async with AsyncClient(server.url, transport="arrow", timeout=1.0) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await c.health()
        assert time.monotonic() - start < 4.0


@pytest.mark.parametrize("bad_id", ["../../admin", "a/b", "..", "", "x?y=1", "%2e%2e", 42, None, "a" * 129])
def test_a_server_chosen_job_id_never_becomes_a_path(serve, bad_id):
    import json

    def answer(conn, method, path):
        send_json(conn, json.dumps({"id": bad_id, "state": "queued", "progress": 0.0}).encode(), "202 Accepted")
    server = serve(answer)
    with Client(server.url, transport="arrow", retries=0) as c:
        with pytest.raises(ArgumentError, match="job id"):
            c.submit("x", ["x = Vi(1)"], np.ones((3, 1)))
        with pytest.raises(ArgumentError, match="job id"):
            c.submit_dataset("x", ["x = Vi(1)"], {"x": "data/x.parquet"}, "out.parquet")
        with pytest.raises(ArgumentError, match="job id"):
            c.job(bad_id)                                       # the caller's id: refused before any request
        with pytest.raises(ArgumentError, match="job id"):
            Job(c, {"id": bad_id})
    assert server.seen == [("POST", "/v1/jobs"), ("POST", "/v1/jobs")]


def test_a_plain_job_id_is_used(serve):
    def answer(conn, method, path):
        send_json(conn, b'{"id": "Ab-9_z", "state": "running", "progress": 0.5}')
    server = serve(answer)
    with Client(server.url, transport="arrow", retries=0) as c:
        assert c.job("Ab-9_z").info["progress"] == 0.5
    assert server.seen == [("GET", "/v1/jobs/Ab-9_z")]
