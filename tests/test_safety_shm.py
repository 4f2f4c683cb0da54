"""Issue 10 rows 1 and 5, issue 15.4: what a shared-memory client can do to the server and to other clients.

Each test runs a real `kred serve` in its own process: the original defects killed it (SIGBUS) or let one client
read and overwrite another's arrays.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from kred.client import Client
from kred.wire.shm import HEADER, SegmentPool, pack
from safety_helpers import ServerProcess
from service_helpers import ALIASES, FORMULA, request


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("shm")) as running:
        yield running


def shm_request(pool: SegmentPool, arrays, room: int, key: str | None = None):
    segment = pool.acquire(sum(a.nbytes + 64 for a in arrays) + room)
    refs, end = pack(segment, arrays)
    body = request(axis=1, arrays=refs, shm_key=key or pool.key,
                   out={"segment": segment.name, "offset": end, "size": segment.size - end})
    return segment, body


def test_a_client_shrinking_its_segment_cannot_crash_the_server(server):
    """Row 1: ftruncate the segment again and again while the server reads the inputs and writes the result."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200_000, 3)), rng.normal(size=(4, 3))
    b = rng.normal(size=(4, 2))
    pool = SegmentPool()
    segment, body = shm_request(pool, [x, y, b], room=200_000 * 2 * 8 + 64)
    full = segment.size
    stop = threading.Event()

    def shrink_and_grow():
        fd = os.open(f"/dev/shm/{segment.name}", os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, HEADER + 4096)
                time.sleep(0.0005)
                os.ftruncate(fd, full)
                time.sleep(0.0005)
        finally:
            os.ftruncate(fd, full)
            os.close(fd)

    thread = threading.Thread(target=shrink_and_grow)
    thread.start()
    codes = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(30):
                codes.append(http.post("/v1/reduce", json=body).status_code)
    finally:
        stop.set()
        thread.join()
        pool.close()
    assert all(code == 200 or 400 <= code < 500 for code in codes), codes
    assert any(400 <= code < 500 for code in codes), codes       # the shrinking was seen, and refused
    assert server.alive()


def test_a_segment_truncated_before_the_request_is_a_4xx(server):
    x, y, b = np.ones((50, 3)), np.ones((7, 3)), np.ones((7, 2))
    pool = SegmentPool()
    try:
        segment, body = shm_request(pool, [x, y, b], room=50 * 2 * 8)
        os.truncate(f"/dev/shm/{segment.name}", HEADER)
        r = httpx.post(server.url + "/v1/reduce", json=body, timeout=30)
        assert r.status_code == 422 and "does not fit" in r.json()["detail"]
    finally:
        pool.close()
    assert server.alive()


def test_a_client_cannot_read_or_write_another_clients_segment(server):
    """Row 5: the victim's segment name is visible in /dev/shm; naming it without the victim's key gets nothing."""
    rng = np.random.default_rng(1)
    x, y, b = rng.normal(size=(30, 3)), rng.normal(size=(9, 3)), rng.normal(size=(9, 2))
    victim, attacker = SegmentPool(), SegmentPool()
    try:
        segment, body = shm_request(victim, [x, y, b], room=30 * 2 * 8 + 64)
        before = bytes(segment.buf)
        for key in (attacker.key, None):                 # the attacker's own key, or none
            stolen = dict(body, shm_key=key)
            r = httpx.post(server.url + "/v1/reduce", json=stolen, timeout=30)
            assert r.status_code == 422, r.text
            assert "does not belong to this client" in r.text or "shm_key" in r.text
        probe = {"segment": segment.name, "size": 64, "key": attacker.key}
        assert httpx.post(server.url + "/v1/shm/probe", json=probe).json() == {"shared_memory": False, "sha256": None}
        assert bytes(segment.buf) == before              # nothing was written into the victim's segment
        r = httpx.post(server.url + "/v1/reduce", json=body, timeout=30)   # the owner still can
        assert r.status_code == 200
        (out,) = r.json()["outputs"]
        result = segment.array(out["offset"], out["dtype"], out["shape"])
        sqdist = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1, keepdims=True)
        np.testing.assert_allclose(result, (sqdist * b[None]).sum(1), rtol=1e-12)
    finally:
        victim.close()
        attacker.close()


def test_the_client_still_uses_shared_memory(server):
    x, y, b = np.ones((5, 3)), np.zeros((4, 3)), np.ones((4, 2))
    with Client(server.url, transport="shm") as c:
        assert c.shared_memory
        np.testing.assert_allclose(c.reduce(FORMULA, ALIASES, x, y, b, axis=1), np.full((5, 2), 12.0))


SCRIPT = """
import numpy as np
from kred import Client
c = Client({url!r}, transport="shm")
x, y, b = np.ones((5, 3)), np.zeros((4, 3)), np.ones((4, 2))
print(c.reduce({formula!r}, {aliases!r}, x, y, b, axis=1).sum())
"""


def kred_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("kred_")}


def test_a_script_without_with_leaves_no_segment_and_no_warning(server):
    """Issue 15.4: no 'resource_tracker: There appear to be N leaked shared_memory objects' at exit."""
    before = kred_segments()
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(url=server.url, formula=FORMULA, aliases=ALIASES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "120.0"          # 5 rows x 2 x |x - 0|^2 = 3 x 4 columns
    assert "leaked" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr
    assert kred_segments() <= before
