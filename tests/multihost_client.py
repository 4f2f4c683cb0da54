"""The client host of tests/test_multihost.py: `python tests/multihost_client.py ACTION JSON` in its own namespace.

It reaches the server only over TCP and prints one JSON object per line (events while a job runs, then the
result; arrays as .npy bytes in base64). Its inputs come from `data(seed, ...)`, which the test calls too for
its dense oracle, so no array has to cross between the hosts except through kred.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import time

import numpy as np

FORMULA = "Square((x | y)) * b"      # its oracle is cheap: x^T (sum_j b_j y_j y_j^T) x


def aliases(d: int) -> list[str]:
    return [f"x = Vi({d})", f"y = Vj({d})", "b = Vj(1)"]


def data(seed: int, n: int, m: int, d: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.random((m, 1))


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def packed(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def unpacked(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def client(args: dict, transport: str = "auto"):
    from kred import Client
    return Client(args["url"], token=args["token"], transport=transport)


def reduce(args: dict) -> None:
    """One reduction over HTTP: shared memory must be refused (another host), Arrow carries the arrays."""
    from kred.client.errors import RemoteError
    x, y, b = data(args["seed"], args["n"], args["m"], args["d"])
    with client(args, "shm") as forced:
        try:
            forced.reduce(FORMULA, aliases(args["d"]), x, y, b, axis=1)
            shm_refusal = None
        except RemoteError as e:
            shm_refusal = str(e)
    with client(args) as c:
        shared = c.shared_memory
        start = time.monotonic()
        out = c.reduce(FORMULA, aliases(args["d"]), x, y, b, axis=1)
        say(result=packed(out), seconds=time.monotonic() - start, shared_memory=shared, shm_refusal=shm_refusal)


def store(args: dict):
    """The object store as pyarrow opens a URI (reading AWS_ENDPOINT_URL, as the server and workers do)."""
    import pyarrow.fs as pafs
    return pafs.FileSystem.from_uri(f"s3://{args['bucket']}/")[0]


def upload(args: dict) -> None:
    """The dataset job's inputs, written to the object store (the endpoint comes from AWS_ENDPOINT_URL)."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    boto3.client("s3").create_bucket(Bucket=args["bucket"])
    fs = store(args)
    x, y, b = data(args["seed"], args["n"], args["m"], args["d"])
    root = f"{args['bucket']}/{args['prefix']}"
    pq.write_table(pa.table({f"x{k}": x[:, k] for k in range(x.shape[1])}), f"{root}/x/part-0.parquet",
                   filesystem=fs, row_group_size=args["rows_per_group"])
    pq.write_table(pa.table({f"y{k}": y[:, k] for k in range(y.shape[1])}), f"{root}/y.parquet", filesystem=fs)
    pq.write_table(pa.table({"b": b[:, 0]}), f"{root}/b.parquet", filesystem=fs)
    say(uploaded=root)


def dataset_job(args: dict) -> None:
    """A dataset job on the object store: submitted, followed (events for the test to act on), read back."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    root = f"s3://{args['bucket']}/{args['prefix']}"
    with client(args) as c:
        inputs = {"x": f"{root}/x/", "y": f"{root}/y.parquet", "b": f"{root}/b.parquet"}
        start = time.monotonic()
        job = c.submit_dataset(FORMULA, aliases(args["d"]), inputs, f"{root}/{args.get('out', 'out')}/", axis=1)
        say(submitted=job.id)
        while (info := job.status())["state"] not in ("done", "failed", "cancelled"):
            say(progress=info["progress"])
            time.sleep(0.2)
        seconds = time.monotonic() - start
        if info["state"] != "done":
            say(failed=info)
            return
    fs = store(args)
    listed = fs.get_file_info(pafs.FileSelector(f"{args['bucket']}/{args['prefix']}/{args.get('out', 'out')}"))
    files = sorted(f.path for f in listed if f.base_name.startswith("part-"))
    out = np.concatenate([pq.read_table(f, filesystem=fs).column("value_0").to_numpy() for f in files])
    say(result=packed(out), seconds=seconds, info=info, files=len(files))


if __name__ == "__main__":
    action, arguments = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    {"reduce": reduce, "upload": upload, "dataset_job": dataset_job}[action](arguments)
