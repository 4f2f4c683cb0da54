"""The HTTP service: what a round trip costs compared with calling the engine in-process, and how fast arrays move.

    python -m benchmarks.bench_service [--reps 200] [--megabytes 100] [--concurrent 200]

A real server (`kred serve --executor local`, uvicorn) runs in its own process on 127.0.0.1; the client is this
process. Rows written to benchmarks/results/service-<host kind>.json with the machine's description:

1. small call, Gaussian Sum N = M = 1000, D = 3, float32: p50 / p99 of the in-process engine call (same backend) and
   of the HTTP round trip with Arrow and with shared memory (goal: p50 <= 3 ms).
2. 100 MB of input (x = Vi(4) float64, reduced over i against one y: the output is 32 bytes): Arrow, shared memory,
   a raw-bytes HTTP POST of the same size (the server reads the body and answers 400), and a memcpy of 100 MB into
   warm and into fresh memory (goals: Arrow <= 150 ms, shared memory <= 40 ms). For the HTTP paths the server's own
   time (plan + reduction, from the reply) is reported too, and `transfer_p50_ms` = round trip - that time
   (sending, receiving and decoding the body included).
3. throughput of `--concurrent` small requests in flight at once (AsyncClient, N = M = 100).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .run import machine_info, results_path, save_results

GAUSS = "Exp(-SqDist(x, y)) * b"
GAUSS_ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"]
BULK = "x * y"
BULK_ALIASES = ["x = Vi(4)", "y = Vj(1)"]


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]     # noqa: E731
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * pick(0.99), "min_ms": 1e3 * ordered[0],
            "reps": len(ordered)}


def timed(call, reps: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Wall times of `call`, and the server's own reduction time when the call reports it (else 0)."""
    for _ in range(warmup):
        call()
    samples, server = [], []
    for _ in range(reps):
        start = time.perf_counter()
        meta = call()
        samples.append(time.perf_counter() - start)
        timings = meta.get("timings", {}) if isinstance(meta, dict) else {}
        server.append(timings.get("plan_s", 0.0) + timings.get("compute_s", 0.0))     # not receive_s: transfer
    return samples, server


def remote(client, formula, aliases, *arrays, **options):
    """A reduction through the client's own request path, returning the reply's metadata (timings) too."""
    spec = {"formula": formula, "aliases": aliases, "reduction_op": "Sum", "opt_arg": None, "formula2": None,
            "dtype_acc": "auto", "grad": None, **options}
    meta, outputs = client._drive(client._flows.send_arrays("/v1/reduce", spec, list(arrays), idempotent=True))
    return meta, outputs[0]


def summary(samples: tuple[list[float], list[float]]) -> dict:
    wall, server = samples
    row = percentiles(wall)
    if any(server):
        row["server_reduction_p50_ms"] = 1e3 * statistics.median(server)
        row["transfer_p50_ms"] = 1e3 * statistics.median(w - s for w, s in zip(wall, server))
    return row


def start_server(backend: str, store: str):
    """`kred serve` in a subprocess on a free loopback port: (process, url)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, KRED_STORE_DIR=store, KRED_BACKEND=backend, KRED_MAX_BODY_BYTES=str(1 << 31))
    process = subprocess.Popen([sys.executable, "-m", "kred.client.cli", "serve", "--executor", "local", "--port",
                                str(port), "--log-level", "warning"], env=env)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(client, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.health()
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--bulk-reps", type=int, default=10)
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--backend", default="auto", help="engine backend of the server and the in-process call")
    args = parser.parse_args(argv)

    import httpx

    from kred.client import AsyncClient, Client
    from kred.client.http import NO_DELAY, chunked
    from kred.engine.backends import auto_choice
    from kred.engine.numpy import Genred
    from kred.wire import arrow

    backend = auto_choice() if args.backend == "auto" else args.backend
    info = machine_info()
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row))

    with tempfile.TemporaryDirectory() as store:
        process, url = start_server(backend, store)
        try:
            with Client(url, transport="arrow") as arrow_client, Client(url, transport="shm") as shm_client:
                wait_ready(arrow_client, process)
                assert shm_client.shared_memory

                # 1. small call ---------------------------------------------------------------------------------
                rng = np.random.default_rng(0)
                x, y = rng.random((1000, 3), np.float32), rng.random((1000, 3), np.float32)
                b = rng.random((1000, 1), np.float32)
                local = Genred(GAUSS, GAUSS_ALIASES, axis=1)
                reference = local(x, y, b, backend=backend)
                calls = {
                    "in-process": lambda: local(x, y, b, backend=backend),
                    "http-arrow": lambda: arrow_client.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1),
                    "http-shm": lambda: shm_client.reduce(GAUSS, GAUSS_ALIASES, x, y, b, axis=1),
                }
                for name, call in calls.items():
                    assert np.allclose(call(), reference, rtol=1e-5)
                for name, client in (("http-arrow", arrow_client), ("http-shm", shm_client)):
                    calls[name] = lambda client=client: remote(client, GAUSS, GAUSS_ALIASES, x, y, b, axis=1)[0]
                for name, call in calls.items():
                    record({"bench": "small-call", "n": 1000, "m": 1000, "d": 3, "dtype": "float32",
                            "backend": backend, "path": name, **summary(timed(call, args.reps))})

                # 2. bulk input ---------------------------------------------------------------------------------
                n = int(args.megabytes * 2**20 / (4 * 8))
                big = rng.random((n, 4))
                one = np.ones((1, 1))
                expected = big.sum(0, keepdims=True)
                nbytes = big.nbytes
                local_bulk = Genred(BULK, BULK_ALIASES, axis=0)
                bulk_calls = {
                    "in-process": lambda: local_bulk(big, one, backend=backend),
                    "http-arrow": lambda: arrow_client.reduce(BULK, BULK_ALIASES, big, one, axis=0),
                    "http-shm": lambda: shm_client.reduce(BULK, BULK_ALIASES, big, one, axis=0),
                }
                raw = np.random.default_rng(1).bytes(nbytes)
                http = httpx.Client(base_url=url, timeout=120, transport=httpx.HTTPTransport(socket_options=NO_DELAY))
                # The same bytes as a plain POST (the server reads them all, then answers 400: not an Arrow stream).
                # Sent in 1 MiB chunks like the client's: httpcore copies what is left of a chunk after each partial
                # send, so one 100 MB chunk would measure that quadratic copy rather than HTTP.
                bulk_calls["raw-bytes-post"] = lambda: http.post(
                    "/v1/reduce", content=chunked(memoryview(raw)),
                    headers={"content-type": arrow.CONTENT_TYPE, "content-length": str(nbytes)})
                warm = np.empty_like(big)
                bulk_calls["memcpy-warm"] = lambda: np.copyto(warm, big)
                bulk_calls["memcpy-fresh"] = lambda: big.copy()
                for name, call in bulk_calls.items():
                    if name.startswith(("in-", "http-")):
                        assert np.allclose(call(), expected, rtol=1e-9), name
                for name, client in (("http-arrow", arrow_client), ("http-shm", shm_client)):
                    bulk_calls[name] = lambda client=client: remote(client, BULK, BULK_ALIASES, big, one, axis=0)[0]
                for name, call in bulk_calls.items():
                    record({"bench": "bulk-input", "megabytes": nbytes / 2**20, "path": name, "backend": backend,
                            **summary(timed(call, args.bulk_reps, warmup=1))})
                http.close()
                del raw, warm

                # 3. concurrent small requests ---------------------------------------------------------------
                xs, ys, bs = rng.random((100, 3)), rng.random((100, 3)), rng.random((100, 1))
                for transport in ("arrow", "shm"):
                    async def burst():
                        limits = httpx.Limits(max_connections=args.concurrent)
                        http_transport = httpx.AsyncHTTPTransport(limits=limits)
                        async with AsyncClient(url, transport=transport, http_transport=http_transport) as c:
                            await c.reduce(GAUSS, GAUSS_ALIASES, xs, ys, bs, axis=1)          # warm up
                            start = time.perf_counter()
                            results = await asyncio.gather(*[c.reduce(GAUSS, GAUSS_ALIASES, xs, ys, bs, axis=1)
                                                             for _ in range(args.concurrent)])
                            return time.perf_counter() - start, results
                    seconds, results = asyncio.run(burst())
                    assert all(np.allclose(r, results[0]) for r in results)
                    record({"bench": "concurrent", "requests": args.concurrent, "n": 100, "m": 100,
                            "transport": transport, "seconds": seconds, "requests_per_s": args.concurrent / seconds})
        finally:
            process.terminate()
            process.wait(30)

    settings = vars(args) | {"server": "kred serve --executor local (uvicorn, 1 process, same host)",
                             "load_average_at_end": os.getloadavg()}
    save_results(results_path("service", info), {"settings": settings, "machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
