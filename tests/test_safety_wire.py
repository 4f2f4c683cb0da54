"""Issue 10 rows 3, 9 and 12: malformed bodies, bodies that never end, and empty tokens.

Malformed bodies are sent to the app in-process and to a real `kred serve`; body memory and stalls are measured on
the real server's process.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from kred.service.app import create_app
from kred.service.settings import Settings
from kred.wire import arrow
from kred.wire.shm import HEADER, new_key
from safety_helpers import SERVE, ServerProcess
from service_helpers import Running, data, request, settings

X, Y, B = data()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def column_body(shape_meta: bytes, values: pa.Array, offsets: list[int] | None = None, meta=None) -> bytes:
    """An Arrow stream whose first column is `values` with `shape_meta`, built field by field; `offsets` are then
    written over the column's list offsets in the body's bytes (pyarrow would not build them)."""
    meta = request(axis=1) if meta is None else meta
    column = pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values)
    others = [pa.LargeListArray.from_arrays(pa.array([0, a.size], pa.int64()), pa.array(a.ravel())) for a in (Y, B)]
    fields = [pa.field("a0", column.type, metadata={b"shape": shape_meta})] + [
        pa.field(f"a{k + 1}", c.type, metadata={b"shape": json.dumps(list(a.shape)).encode()})
        for k, (c, a) in enumerate(zip(others, (Y, B)))]
    schema = pa.schema(fields, metadata={b"kred": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays([column, *others], schema=schema))
    body = sink.getvalue().to_pybytes()
    if offsets is not None:
        valid = np.array([0, len(values)], np.int64).tobytes()
        at = body.rindex(valid)                 # in the message body, after the metadata
        body = body[:at] + np.array(offsets, np.int64).tobytes() + body[at + len(valid):]
    return body


def compressed_body(codec: str, arrays=(X, Y, B), meta=None) -> bytes:
    """The request's body as `arrow.encode` writes it, but with its record batch compressed by `codec`."""
    meta, arrays = arrow.decode(arrow.encode(request(axis=1) if meta is None else meta, list(arrays)))
    table = pa.ipc.open_stream(arrow.encode(meta, arrays)).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


VALUES = pa.array(X.ravel())
MALFORMED = {        # body -> what the answer must name
    "shape [2**64, 1]": (column_body(b"[18446744073709551616, 1]", VALUES), "shape"),
    "shape [true, 150]": (column_body(b"[true, 150]", VALUES), "non-negative integers"),
    "empty values, shape [2**32, 2**32]": (column_body(b"[4294967296, 4294967296]", pa.array([], pa.float64())),
                                           "values"),
    "list offsets [-8, 142]": (column_body(b"[23, 3]", VALUES, offsets=[-8, 142]), "offset"),
    "shape not JSON": (column_body(b"[23, 3", VALUES), "shape"),
    "shape nested": (column_body(b"[[23], 3]", VALUES), "non-negative integers"),
    "shape of 9 dimensions": (column_body(b"[1, 1, 1, 1, 1, 1, 1, 23, 3]", VALUES), "at most 8"),
    "zstd-compressed batch": (compressed_body("zstd"), "compressed"),
    "lz4-compressed batch": (compressed_body("lz4"), "compressed"),
}
SHM_SHAPES = {"[2**63, 1]": [2 ** 63, 1], "[2**62, 4]": [2 ** 62, 4], "[-1, 3]": [-1, 3]}


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("wire"), body_timeout_s=1.0) as running:
        yield running


async def malformed_answers(post) -> None:
    for name, (body, must_name) in MALFORMED.items():
        r = await post(content=body, headers={"content-type": arrow.CONTENT_TYPE})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert must_name in r.json()["detail"], (name, r.json())
    for name, shape in SHM_SHAPES.items():
        ref = {"segment": "kred_" + "0" * 32, "offset": HEADER, "dtype": "float64", "shape": shape}
        r = await post(json=request(arrays=[ref] * 3, shm_key=new_key()))
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)


@pytest.mark.anyio
async def test_malformed_bodies_are_4xx_in_process(tmp_path):
    """Row 9, in-process (the exceptions of the original defect were raised inside the app)."""
    async with Running(create_app(settings(tmp_path))) as running:
        await malformed_answers(lambda **kw: running.raw.post("/v1/reduce", **kw))
        await running.still_serving()


@pytest.mark.anyio
async def test_malformed_bodies_are_4xx_on_a_real_server(real_server):
    async with httpx.AsyncClient(base_url=real_server.url) as http:
        await malformed_answers(lambda **kw: http.post("/v1/reduce", **kw))
    assert real_server.alive()


def test_decode_names_the_column_and_its_shape():
    with pytest.raises(arrow.WireError, match=r"column 'a0'.*18446744073709551616"):
        arrow.decode(MALFORMED["shape [2**64, 1]"][0])
    meta, arrays = arrow.decode(arrow.encode({"k": 1}, [X, Y]))      # and a well-formed body still decodes
    np.testing.assert_array_equal(arrays[0], X)
    np.testing.assert_array_equal(arrays[1], Y)


def test_a_compressed_bomb_is_refused_before_it_is_decompressed(real_server):
    """A 128 MB column compressed into a few kB: refused with a 400 naming compression, with no memory taken."""
    bomb = compressed_body("zstd", [np.zeros((16_000_000, 1)), Y, B])
    assert len(bomb) < 1 << 20
    before = real_server.rss()
    r = httpx.post(real_server.url + "/v1/reduce", content=bomb, headers={"content-type": arrow.CONTENT_TYPE},
                   timeout=60)
    assert r.status_code == 400 and "compressed" in r.json()["detail"], r.text
    assert real_server.rss() - before < 50 << 20
    assert real_server.alive()


# Row 3: bodies that are announced but never sent ---------------------------------------------------------

def open_upload(url: str, length: int, first: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/reduce HTTP/1.1\r\nHost: kred\r\nContent-Type: " + arrow.CONTENT_TYPE.encode() +
              b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n" + first)
    return s


def answer(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_announced_bodies_take_no_memory_and_stalls_time_out(real_server):
    """Row 3: 4 connections announcing 1e9 bytes and sending 10 held 3.9 GB; now memory follows the bytes received
    and each stalled upload is answered 408 after body_timeout_s (1 s here)."""
    before = real_server.rss()
    uploads = [open_upload(real_server.url, 10 ** 9, b"0123456789") for _ in range(4)]
    try:
        time.sleep(0.5)
        assert real_server.rss() - before < 50 << 20
        began = time.monotonic()
        for s in uploads:
            assert answer(s).startswith(b"HTTP/1.1 408"), "a stalled upload must get 408"
        assert time.monotonic() - began < 10
    finally:
        for s in uploads:
            s.close()
    assert real_server.alive()


def test_the_in_flight_budget_answers_429_then_recovers(tmp_path):
    """Past max_inflight_bytes of bodies held at once, a request gets 429; one larger than the budget alone, 413."""
    with ServerProcess(tmp_path, max_inflight_bytes=1 << 20, body_timeout_s=5.0) as server:
        first = open_upload(server.url, 900_000, b"x" * 700_000)
        try:
            time.sleep(0.3)
            second = open_upload(server.url, 900_000, b"x" * 700_000)
            try:
                assert answer(second).startswith(b"HTTP/1.1 429")
            finally:
                second.close()
        finally:
            first.close()
        alone = open_upload(server.url, 2_000_000, b"x" * 1_200_000)
        try:
            assert answer(alone).startswith(b"HTTP/1.1 413")
        finally:
            alone.close()
        time.sleep(0.3)
        x, y, b = data()
        r = httpx.post(server.url + "/v1/reduce", content=bytes(arrow.encode(request(axis=1), [x, y, b])),
                       headers={"content-type": arrow.CONTENT_TYPE})
        assert r.status_code == 200                       # the budget was given back


# Row 12: empty tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["", "   ", "\t\n"])
def test_an_empty_token_is_refused(token, monkeypatch):
    monkeypatch.setenv("KRED_TOKEN", token)
    with pytest.raises(ValueError, match="KRED_TOKEN is set but empty"):
        Settings()


def test_kred_serve_refuses_an_empty_token_at_start(tmp_path):
    env = {"KRED_TOKEN": "  ", "KRED_STORE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os
    done = subprocess.run([sys.executable, "-c", SERVE, "serve", "--executor", "local", "--host", "0.0.0.0"],
                          env=os.environ | env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "KRED_TOKEN is set but empty" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
