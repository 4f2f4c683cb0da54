"""`Client` and `AsyncClient`: kred reductions on a server, numpy (or torch) in, numpy (or torch) out.

    c = Client("http://127.0.0.1:8000", token=...)        # transport="auto": shared memory on the same host
    a = c.reduce("Exp(-SqDist(x,y))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], x, y, b, axis=1)
    op = c.Genred(formula, aliases, reduction_op="Sum", axis=1); a = op(x, y, b)
    job = c.submit(formula, aliases, x, y, b, axis=1); a = job.result(progress=True)

Each operation is written once, as a generator that yields the HTTP calls it needs and receives their responses
(`_Flows`); `Client` drives it with a blocking httpx client and `AsyncClient` with an async one. httpx transports are
injectable, so tests run the client against the app in-process (httpx.ASGITransport) as well as over a socket.

Retries: calls that are safe to repeat (reads, reductions, validation) are retried on connection errors with
backoff; submitting a job is retried only when the connection was never made.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Generator

import httpx
import numpy as np

from kred.engine.batch import broadcast_batch, leading_shape
from kred.engine.errors import ArgumentError
from kred.engine.formula import CATEGORY_NAMES
from kred.engine.spec import Spec
from kred.wire import arrow
from kred.wire.shm import HEADER, SegmentPool, aligned, pack, packed_size

from .errors import RemoteError, ServerUnreachable, raise_for

DEFAULT_URL = "http://127.0.0.1:8000"
# Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body back until the
# server's delayed ACK of the headers (tens of ms per call).
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
FINISHED = ("done", "failed", "cancelled")
FACTS_KEPT = 256                # reductions whose server reading a client remembers
LOG_REDRAW_S = 10.0             # a job's progress bar, written to a log rather than a terminal, redraws this rarely
Flow = Generator["Call", httpx.Response, Any]

CATEGORY_OF = {name: cat for cat, name in CATEGORY_NAMES.items()}     # 'Vi' -> 0, as the server names them


class JobFailed(RemoteError):
    """The job ended `failed` (detail: the server's message) or `cancelled`."""


@dataclass
class Call:
    method: str
    path: str
    content: Any = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    idempotent: bool = True
    check: bool = True              # raise on an error status (else the flow reads the response itself)


# Arrays in and out -------------------------------------------------------------------------------------

def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def to_numpy(args) -> tuple[list[np.ndarray], Any]:
    """numpy arrays of `args`, and the first torch tensor among them (results then come back as tensors)."""
    arrays, like = [], None
    for value in args:
        if _is_torch(value):
            like = value if like is None else like
            value = value.detach().cpu().numpy()
        arrays.append(np.asarray(value))
    return arrays, like


def from_numpy(outputs: list[np.ndarray], like):
    if like is not None:
        import torch
        outputs = [torch.from_numpy(o).to(like.device) for o in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _result_bytes(facts: dict, spec: dict, arrays: list[np.ndarray]) -> int:
    """Room for the outputs of a shared-memory call, from the server's reading of the reduction (`facts`, the
    reply of /v1/formulas/validate): (batch x rows) x width per output, or the argument's size for a gradient."""
    args = facts["args"]
    if spec.get("grad") is not None:
        wrt = spec["grad"]["wrt"]
        return max((aligned(arrays[a["position"]].nbytes) for a in args if wrt in (a["position"], a["name"])),
                   default=0)
    rows_category = "Vi" if facts["axis"] == 1 else "Vj"
    rows = 1
    for a in args:
        shape = arrays[a["position"]].shape
        if a["category"] == rows_category and rows == 1:
            rows = shape[-2] if len(shape) >= 2 else shape[0]
    leads = [leading_shape(CATEGORY_OF[a["category"]], a["dim"], arrays[a["position"]].shape) for a in args]
    try:
        count = rows * math.prod(broadcast_batch(leads, [a["name"] for a in args]))
    except ArgumentError:                # the server names what does not broadcast
        return 0
    itemsize = {"value": arrays[0].dtype.itemsize if arrays else 8, "index": 8}
    return sum(aligned(count * out["dim"] * itemsize[out["kind"]]) for out in facts["outputs"])


def _spec(formula, aliases, options: dict, grad=None, ranges=None) -> dict:
    """The request body: an engine Spec (its cheap checks made here, the formula parsed by the server) and `grad`.
    `options` are the Spec's other fields (reduction_op, axis, opt_arg, formula2, dtype_acc, fast_math)."""
    spec = Spec(formula, aliases, **options, ranges=ranges is not None)
    return spec.to_json() | {"grad": None if grad is None else {"wrt": grad}}


def _with_ranges(args, ranges) -> list:
    """The arrays of a request: the reduction's, then the six of `ranges` (as int64) when given."""
    if ranges is None:
        return list(args)
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 6:
        raise ArgumentError("ranges must be the pykeops 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, "
                            "slices_j, redranges_i)")
    arrays, _ = to_numpy(ranges)
    return [*args, *(np.ascontiguousarray(a, dtype=np.int64) for a in arrays)]


def _decode(response: httpx.Response) -> tuple[dict, list[np.ndarray]]:
    meta, arrays = arrow.decode(response.content)
    return meta, [np.array(a) for a in arrays]          # writable copies, independent of the response body


# The operations, written once ---------------------------------------------------------------------------

class _Flows:
    def __init__(self, url: str, token: str | None, transport: str):
        if transport not in ("auto", "arrow", "shm"):
            raise ValueError(f"transport must be 'auto', 'arrow' or 'shm', not {transport!r}")
        self.url, self.transport = url.rstrip("/"), transport
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._shared: bool | None = None if transport != "arrow" else False
        self._pool = SegmentPool()
        self._facts: dict[tuple, dict] = {}          # the server's reading of each reduction sent through shm

    def shared_memory(self) -> Flow:
        """Whether this client and the server see the same shared memory (asked once, with a probe segment)."""
        if self._shared is None:
            nonce = secrets.token_bytes(64)
            probe = self._pool.segment(len(nonce))
            try:
                probe.buf[HEADER:HEADER + len(nonce)] = nonce
                response = yield Call("POST", "/v1/shm/probe", check=False,
                                      json={"segment": probe.name, "size": len(nonce), "key": self._pool.key})
            finally:
                self._pool.discard(probe)
            ok = response.status_code == 200 and response.json().get("sha256") == hashlib.sha256(nonce).hexdigest()
            if not ok and self.transport == "shm":
                raise RemoteError(response.status_code, "shared_memory",
                                  "transport='shm' but the server cannot read this client's shared memory")
            self._shared = ok
        return self._shared

    def facts(self, spec: dict) -> Flow:
        """The server's reading of `spec` (arguments, categories, outputs), asked once per reduction; None when it
        refuses the spec (the request itself then reports why)."""
        request = {key: value for key, value in spec.items() if key not in ("grad", "ranges")}   # what plans read
        key = repr(sorted(request.items()))
        if key not in self._facts:
            response = yield Call("POST", "/v1/formulas/validate", json=request, check=False)
            if response.status_code != 200:
                return None
            if len(self._facts) >= FACTS_KEPT:
                self._facts.pop(next(iter(self._facts)))
            self._facts[key] = response.json()
        return self._facts[key]

    def send_arrays(self, path: str, spec: dict, arrays: list[np.ndarray], idempotent: bool) -> Flow:
        """POST a request with its arrays; returns (meta, outputs)."""
        if (yield from self.shared_memory()):
            facts = yield from self.facts(spec)
            room = _result_bytes(facts, spec, arrays) if facts is not None else 0
            segment = self._pool.acquire(packed_size(arrays) + room)
            try:
                refs, end = pack(segment, arrays)
                body = dict(spec, arrays=refs, shm_key=self._pool.key,
                            out={"segment": segment.name, "offset": end, "size": segment.size - end})
                response = yield Call("POST", path, json=body, idempotent=idempotent)
                if response.headers.get("content-type", "").startswith(arrow.CONTENT_TYPE):
                    return _decode(response)
                reply = response.json()
                if "outputs" not in reply:               # a job: the server copied the inputs, nothing to read
                    return reply, []
                outputs = [segment.array(r["offset"], r["dtype"], r["shape"]).copy() for r in reply["outputs"]]
                return reply, outputs
            finally:
                self._pool.release(segment)
        body = arrow.encode(spec, arrays)
        response = yield Call("POST", path, content=memoryview(body),
                              headers={"Content-Type": arrow.CONTENT_TYPE}, idempotent=idempotent)
        if response.headers.get("content-type", "").startswith(arrow.CONTENT_TYPE):
            return _decode(response)
        return response.json(), []

    def reduce(self, spec: dict, args) -> Flow:
        arrays, like = to_numpy(args)
        _, outputs = yield from self.send_arrays("/v1/reduce", spec, arrays, idempotent=True)
        return from_numpy(outputs, like)

    def submit(self, spec: dict, args) -> Flow:
        arrays, like = to_numpy(args)
        info, _ = yield from self.send_arrays("/v1/jobs", spec, arrays, idempotent=False)
        return info, like

    def job_result(self, job_id: str, like) -> Flow:
        response = yield Call("GET", f"/v1/jobs/{job_id}/result")
        return from_numpy(_decode(response)[1], like)

    def close(self) -> None:
        self._pool.close()


def _send_kwargs(call: Call, headers: dict, asynchronous: bool = False) -> dict:
    kwargs = {"headers": headers | call.headers, "params": call.params}
    if call.json is not None:
        kwargs["json"] = call.json
    elif isinstance(call.content, memoryview):
        # Streamed in 1 MiB slices of the encoded body: never copied whole, and httpcore's sync writer, which
        # re-slices (copies) what is left of a chunk after every partial send, stays linear.
        chunks = chunked(call.content)
        kwargs["content"] = _async_chunks(chunks) if asynchronous else chunks
        kwargs["headers"] = kwargs["headers"] | {"Content-Length": str(call.content.nbytes)}
    elif call.content is not None:
        kwargs["content"] = call.content
    return kwargs


def chunked(view: memoryview, size: int = 1 << 20) -> list[memoryview]:
    view = view.cast("B")
    return [view[k:k + size] for k in range(0, len(view), size)] or [view]


async def _async_chunks(chunks):
    for chunk in chunks:
        yield chunk


def _retryable(error: Exception, call: Call) -> bool:
    if isinstance(error, httpx.ConnectError):                  # nothing reached the server
        return True
    if isinstance(error, httpx.TimeoutException):               # the server may still be computing
        return False
    return call.idempotent and isinstance(error, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))


def _raise_unreachable(error: httpx.TransportError, url: str) -> None:
    """The client's own error for a server that never answered; other transport errors (a read cut short, a
    timeout while the server computes) stay httpx's, since the server may have done the work."""
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        raise ServerUnreachable(url, str(error) or type(error).__name__) from error


# Blocking client ----------------------------------------------------------------------------------------

class Client:
    """A kred server. `token` defaults to $KRED_TOKEN; `http_transport` is any httpx transport (tests pass the app's
    ASGI transport); `transport` chooses how arrays travel: "auto" (shared memory when the server can read this
    client's memory, else Arrow), "arrow" or "shm"."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, transport: str = "auto",
                 timeout: float = 300.0, retries: int = 3, http_transport: httpx.BaseTransport | None = None):
        token = token if token is not None else os.environ.get("KRED_TOKEN")
        self._flows = _Flows(url, token, transport)
        self.retries = retries
        self.http = httpx.Client(base_url=self._flows.url, transport=http_transport or httpx.HTTPTransport(
                                 socket_options=NO_DELAY), timeout=httpx.Timeout(timeout, connect=10.0))

    # Driving flows --------------------------------------------------------------------------------------
    def _send(self, call: Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(call.method, call.path, **_send_kwargs(call, self._flows.headers))
                break
            except httpx.TransportError as e:
                if attempt == self.retries or not _retryable(e, call):
                    _raise_unreachable(e, self._flows.url)
                    raise
                time.sleep(0.1 * 2 ** attempt)
        if call.check:
            raise_for(response)
        return response

    def _drive(self, flow: Flow):
        try:
            call = next(flow)
            while True:
                call = flow.send(self._send(call))
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    def _get(self, path: str, **params) -> Any:
        return self._send(Call("GET", path, params=params or None)).json()

    # Reductions -----------------------------------------------------------------------------------------
    def reduce(self, formula: str, aliases, *args, ranges=None, **options):
        """`reduction_op` over `axis` of `formula` on the server (pykeops Genred semantics: leading batch
        dimensions, block-sparse `ranges`). `options` are the fields of `kred.engine.spec.Spec`: reduction_op,
        axis, opt_arg, formula2, dtype_acc, fast_math."""
        spec = _spec(formula, aliases, options, ranges=ranges)
        return self._drive(self._flows.reduce(spec, _with_ranges(args, ranges)))

    def grad(self, formula: str, aliases, *args, wrt, cotangent, **options):
        """sum_r <cotangent_r, d result_r / d arg[wrt]> (a vector-Jacobian product), shaped like that argument."""
        spec = _spec(formula, aliases, options, grad=wrt)
        return self._drive(self._flows.reduce(spec, [*args, cotangent]))

    def Genred(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, **options) -> "RemoteGenred":
        """A remote Genred: `op = c.Genred(...); op(x, y, b)`."""
        return RemoteGenred(self, formula, aliases, reduction_op=reduction_op, axis=axis, **options)

    def validate(self, formula: str, aliases=(), **options) -> dict:
        """The normalised formula, arguments and outputs; raises FormulaError (with the column) when wrong."""
        spec = _spec(formula, aliases, options)
        return self._send(Call("POST", "/v1/formulas/validate", json=spec)).json()

    # Jobs -----------------------------------------------------------------------------------------------
    def submit(self, formula: str, aliases, *args, ranges=None, **options) -> "Job":
        """Queue a reduction as a job on the server; returns at once."""
        spec = _spec(formula, aliases, options, ranges=ranges)
        info, like = self._drive(self._flows.submit(spec, _with_ranges(args, ranges)))
        return Job(self, info, like)

    def submit_dataset(self, formula: str, aliases, inputs: dict, output: str, **options) -> "Job":
        """Queue an out-of-core job on the server's cluster: `inputs` maps each alias name to a Parquet dataset
        the server can read (a path or URI, or {"uri": ..., "columns": [...]}) or, for a parameter, a list of
        numbers; the workers write the result to the Parquet dataset `output`, which the finished job names."""
        spec = _spec(formula, aliases, options)
        sources = {name: {"uri": source} if isinstance(source, str) else source for name, source in inputs.items()}
        body = {k: v for k, v in spec.items() if k not in ("grad", "ranges")} | {"inputs": sources, "output": output}
        return Job(self, self._send(Call("POST", "/v1/jobs", json=body, idempotent=False)).json(), None)

    def job(self, job_id: str) -> "Job":
        return Job(self, self._get(f"/v1/jobs/{job_id}"), None)

    def jobs(self, limit: int = 100, state: str | None = None) -> list[dict]:
        return self._get("/v1/jobs", limit=limit, **({"state": state} if state else {}))

    # The server -----------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._get("/healthz")

    @property
    def shared_memory(self) -> bool:
        """Whether arrays go through shared memory (asks the server the first time)."""
        return self._drive(self._flows.shared_memory())

    def close(self) -> None:
        self.http.close()
        self._flows.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteGenred:
    """`Client.Genred`: a reduction bound to a server, called like `engine.numpy.Genred`."""

    def __init__(self, client, formula, aliases, reduction_op="Sum", axis=0, **options):
        self.client = client
        self.spec = Spec(formula, aliases, reduction_op, axis, **options)     # checked once, here
        self.formula, self.aliases = formula, list(self.spec.aliases)
        self.options = self.spec.options()

    def __call__(self, *args, ranges=None):
        return self.client.reduce(self.formula, self.aliases, *args, ranges=ranges, **self.options)

    def grad(self, *args, wrt, cotangent):
        return self.client.grad(self.formula, self.aliases, *args, wrt=wrt, cotangent=cotangent, **self.options)

    def submit(self, *args, ranges=None):
        return self.client.submit(self.formula, self.aliases, *args, ranges=ranges, **self.options)


class Job:
    """A job on the server: `status()`, `progress`, `wait()`, `result(progress=True)`, `cancel()`."""

    def __init__(self, client: Client, info: dict, like=None):
        self.client, self.info, self._like = client, info, like
        self.id: str = info["id"]

    def status(self) -> dict:
        self.info = self.client._get(f"/v1/jobs/{self.id}")
        return self.info

    @property
    def state(self) -> str:
        return self.status()["state"]

    @property
    def progress(self) -> float:
        return self.status()["progress"]

    def wait(self, timeout: float | None = None, progress: bool = False, poll: float = 0.1) -> dict:
        """Poll until the job finishes (a tqdm bar with `progress`); TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _bar(self.id) if progress else None
        try:
            while True:
                info = self.status()
                if bar is not None:
                    bar.update(round(100 * info["progress"]) - bar.n)
                if info["state"] in FINISHED:
                    return info
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {info['state']} after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def result(self, timeout: float | None = None, progress: bool = False):
        """The outputs once done; raises JobFailed if the job failed or was cancelled."""
        _check_done(self.wait(timeout, progress))
        return self.client._drive(self.client._flows.job_result(self.id, self._like))

    def cancel(self, wait: bool = True, timeout: float = 30.0) -> dict:
        """Cancel; with `wait`, until the job has really stopped."""
        self.info = self.client._send(Call("DELETE", f"/v1/jobs/{self.id}")).json()
        return self.wait(timeout) if wait else self.info


def _check_done(info: dict) -> None:
    if info["state"] != "done":
        detail = info.get("error") or f"job {info['id']} was {info['state']}"
        raise JobFailed(200, info["state"], detail)


def _bar(job_id: str, file=None):
    """A job's progress bar in percent. Its rate would read "%/s", so the format leaves it out; in a log (not a
    terminal) it is redrawn at most every LOG_REDRAW_S seconds rather than at every poll."""
    import sys

    from tqdm.auto import tqdm
    file = sys.stderr if file is None else file
    terminal = getattr(file, "isatty", lambda: False)()
    return tqdm(total=100, desc=f"kred job {job_id[:8]}", file=file, mininterval=0.1 if terminal else LOG_REDRAW_S,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")


# Async client --------------------------------------------------------------------------------------------

class AsyncClient:
    """The async twin of `Client` (same arguments; every call is awaited)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, transport: str = "auto",
                 timeout: float = 300.0, retries: int = 3, http_transport: httpx.AsyncBaseTransport | None = None):
        token = token if token is not None else os.environ.get("KRED_TOKEN")
        self._flows = _Flows(url, token, transport)
        self.retries = retries
        self.http = httpx.AsyncClient(base_url=self._flows.url, transport=http_transport or httpx.AsyncHTTPTransport(
                                      socket_options=NO_DELAY), timeout=httpx.Timeout(timeout, connect=10.0))

    async def _send(self, call: Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(call.method, call.path,
                                                   **_send_kwargs(call, self._flows.headers, True))
                break
            except httpx.TransportError as e:
                if attempt == self.retries or not _retryable(e, call):
                    _raise_unreachable(e, self._flows.url)
                    raise
                await asyncio.sleep(0.1 * 2 ** attempt)
        if call.check:
            raise_for(response)
        return response

    async def _drive(self, flow: Flow):
        try:
            call = next(flow)
            while True:
                call = flow.send(await self._send(call))
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    async def _get(self, path: str, **params) -> Any:
        return (await self._send(Call("GET", path, params=params or None))).json()

    async def reduce(self, formula: str, aliases, *args, ranges=None, **options):
        spec = _spec(formula, aliases, options, ranges=ranges)
        return await self._drive(self._flows.reduce(spec, _with_ranges(args, ranges)))

    async def grad(self, formula: str, aliases, *args, wrt, cotangent, **options):
        spec = _spec(formula, aliases, options, grad=wrt)
        return await self._drive(self._flows.reduce(spec, [*args, cotangent]))

    def Genred(self, formula: str, aliases, reduction_op: str = "Sum", axis: int = 0, **options) -> RemoteGenred:
        """A remote Genred whose calls return awaitables."""
        return RemoteGenred(self, formula, aliases, reduction_op=reduction_op, axis=axis, **options)

    async def validate(self, formula: str, aliases=(), **options) -> dict:
        spec = _spec(formula, aliases, options)
        return (await self._send(Call("POST", "/v1/formulas/validate", json=spec))).json()

    async def submit(self, formula: str, aliases, *args, ranges=None, **options) -> "AsyncJob":
        spec = _spec(formula, aliases, options, ranges=ranges)
        info, like = await self._drive(self._flows.submit(spec, _with_ranges(args, ranges)))
        return AsyncJob(self, info, like)

    async def job(self, job_id: str) -> "AsyncJob":
        return AsyncJob(self, await self._get(f"/v1/jobs/{job_id}"), None)

    async def jobs(self, limit: int = 100, state: str | None = None) -> list[dict]:
        return await self._get("/v1/jobs", limit=limit, **({"state": state} if state else {}))

    async def health(self) -> dict:
        return await self._get("/healthz")

    async def shared_memory(self) -> bool:
        return await self._drive(self._flows.shared_memory())

    async def aclose(self) -> None:
        await self.http.aclose()
        self._flows.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


class AsyncJob:
    """The async twin of `Job`."""

    def __init__(self, client: AsyncClient, info: dict, like=None):
        self.client, self.info, self._like = client, info, like
        self.id: str = info["id"]

    async def status(self) -> dict:
        self.info = await self.client._get(f"/v1/jobs/{self.id}")
        return self.info

    async def wait(self, timeout: float | None = None, progress: bool = False, poll: float = 0.1) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _bar(self.id) if progress else None
        try:
            while True:
                info = await self.status()
                if bar is not None:
                    bar.update(round(100 * info["progress"]) - bar.n)
                if info["state"] in FINISHED:
                    return info
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {info['state']} after {timeout} s")
                await asyncio.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    async def result(self, timeout: float | None = None, progress: bool = False):
        _check_done(await self.wait(timeout, progress))
        return await self.client._drive(self.client._flows.job_result(self.id, self._like))

    async def cancel(self, wait: bool = True, timeout: float = 30.0) -> dict:
        self.info = (await self.client._send(Call("DELETE", f"/v1/jobs/{self.id}"))).json()
        return await self.wait(timeout) if wait else self.info
