"""Fuzzing dataset URIs (issue 20) against a real uvicorn on 127.0.0.1 with the cluster executor on a real local Ray:
percent-encodings (once and twice), dot segments, empty segments, symlinks made here (out of the root, into it, a
loop, an absolute one, a dangling one), query strings and fragments, schemes (local, file://, s3:// on a local
S3-compatible server, others), globs and odd characters, as inputs and as outputs. Whatever the URI: no 5xx, no
connection to a listener named in a URI, and nothing outside the root read (the files there carry a marker column,
a width and a row count that no reply may show) or written (its tree is unchanged).
"""
from __future__ import annotations

import os
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from kred.service.app import create_app
from kred.service.executors import ClusterExecutor
from service_helpers import Server, settings
from test_security_datasets import Listener, cluster, moto  # noqa: F401 - the module's fixtures

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REQUEST = {"formula": "SqDist(x, y)", "aliases": ["x = Vi(3)", "y = Vj(3)"], "axis": 1}
MARK = "OUTSIDE_MARK"


def table(rows: int, names):
    rng = np.random.default_rng(rows)
    return pa.table({n: rng.random(rows) for n in names})


@pytest.fixture(scope="module")
def world(tmp_path_factory, cluster, moto):  # noqa: F811 - the imported fixtures
    base = tmp_path_factory.mktemp("fuzz")
    root, outside = base / "root", base / "outside"
    for folder in (root / "in", root / "a b", root / "%2e%2e", outside / "data", outside / "victim"):
        folder.mkdir(parents=True)
    for path in (root / "in" / "x.parquet", root / "a b" / "x.parquet", root / "%2e%2e" / "x.parquet",
                 root / "y.parquet"):
        pq.write_table(table(10, "uvw"), path)
    for path in (outside / "data" / "x.parquet", outside / "victim" / "part-000000.parquet", outside / "y.parquet"):
        pq.write_table(table(7, [MARK, "b", "c", "d"]), path)
    os.symlink("../outside", root / "out_link")
    os.symlink("in", root / "in_link")
    os.symlink(".", root / "loop")
    os.symlink(str(outside), root / "abs_out")
    os.symlink("nowhere", root / "dangling")
    s3, _ = pafs.FileSystem.from_uri("s3://fuzz?allow_bucket_creation=true")
    s3.create_dir("fuzz")
    with s3.open_output_stream("fuzz/kred/in/x.parquet") as sink:
        pq.write_table(table(10, "uvw"), sink)
    with s3.open_output_stream("fuzz/secret/x.parquet") as sink:      # beside the root, outside it
        pq.write_table(table(7, [MARK, "b", "c", "d"]), sink)
    listener = Listener()
    config = settings(base, dataset_roots=[str(root), "s3://fuzz/kred/"], max_queued_jobs=500)
    with Server(create_app(config, executor=ClusterExecutor(cluster=cluster))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield dict(root=root, outside=outside, client=client, listener=listener, accepted=[], s3=s3,
                   before=snapshot(outside))


def snapshot(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


SEGMENTS = ["in", "x.parquet", "y.parquet", "a b", "a%20b", "..", ".", "", "%2e%2e", "%2E%2e", "%252e%252e",
            ".%2e", "%2e.", "...", "out_link", "in_link", "loop", "abs_out", "dangling", "outside", "data",
            "victim", "%2f..%2f", "%2F", "..%5c..", "\\..", "%00", "%c0%ae%c0%ae", "%ff", "*", "*.parquet", "?",
            "[a]", "~", "%", "%zz", "kred", "secret", "fuzz", "new", "é", "%C3%A9", ";x", "@", ":"]
SUFFIXES = ["", "", "", "/", "?endpoint_override=127.0.0.1:{port}&scheme=http", "#frag", "?", "?region=x",
            "%3Fendpoint_override=127.0.0.1:{port}"]


@st.composite
def uris(draw, world_root: str):
    prefix = draw(st.sampled_from([world_root, f"file://{world_root}", f"file://localhost{world_root}",
                                   f"FILE://{world_root}", f"file:{world_root}", f"file://evil{world_root}",
                                   "s3://fuzz/kred", "s3://fuzz", "S3://fuzz/kred", "gs://fuzz/kred",
                                   "http://127.0.0.1:{port}", "hdfs://x", "", ".", "relative", "/", "//",
                                   "mock://x", os.path.dirname(world_root)]))
    segments = draw(st.lists(st.sampled_from(SEGMENTS), max_size=6))
    suffix = draw(st.sampled_from(SUFFIXES))
    return "/".join([prefix, *segments]) + suffix


def check_reply(world, reply, request):
    assert reply.status_code < 500, reply.text
    assert MARK not in reply.text and "4 components" not in reply.text, reply.text
    if reply.status_code == 202:
        assert reply.json()["rows"] != 7, reply.text
        world["accepted"].append((reply.json()["id"], request))


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzz_dataset_uris(world, data):
    root, port = str(world["root"]), world["listener"].port
    uri = data.draw(uris(root)).replace("{port}", str(port))
    which = data.draw(st.sampled_from(["x", "y", "output"]))
    request = REQUEST | {"inputs": {"x": {"uri": f"{root}/in/x.parquet"}, "y": {"uri": f"{root}/y.parquet"}},
                         "output": f"{root}/out/{len(world['accepted'])}/"}
    if which == "output":
        request["output"] = uri
    else:
        request["inputs"][which] = {"uri": uri}
    check_reply(world, world["client"].post("/v1/jobs", json=request), request)


def test_after_the_fuzz_nothing_outside_was_read_or_written(world):
    """Runs after the fuzz (same module, in order): the accepted jobs finish, none read the marked files, the
    outside tree is as it was and the listener saw no connection."""
    client, deadline = world["client"], time.monotonic() + 300
    assert world["accepted"], "the fuzz reached no valid URI: it tested only refusals"
    for job, request in world["accepted"]:
        while (info := client.get(f"/v1/jobs/{job}").json())["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        assert info["rows"] != 7 and MARK not in (info["error"] or ""), (info, request)
        assert "internal error" not in (info["error"] or ""), (info, request)
    assert snapshot(world["outside"]) == world["before"]
    secret = [i.path for i in world["s3"].get_file_info(pafs.FileSelector("fuzz/secret", recursive=True))]
    assert secret == ["fuzz/secret/x.parquet"]
    assert not world["listener"].connected()
