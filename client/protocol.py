"""The client's HTTP protocol, written once and sans-IO: every operation is a generator ("flow") that yields the
steps it needs, a `Call` (one HTTP request) or a `Sleep`, and receives each call's `Reply`. The drivers
(client.py for `Client`, aio.py for `AsyncClient`) only perform the steps: they own the sockets, the retries and
the deadlines, and none of the protocol.

The server is not trusted (docs/SECURITY.md, "client"): each call carries the most reply bytes it may read
(`Call.limit`, derived from the request's expected output), ids the client puts into URLs are checked
(`job_path`), and shared-memory references in a reply are bounds-checked against the client's own segment.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kred.engine.batch import broadcast_batch, leading_shape
from kred.engine.errors import ArgumentError, KredError
from kred.engine.formula import CATEGORY_NAMES
from kred.engine.spec import Spec

from kred.wire import arrow
from kred.wire.shm import HEADER, SegmentPool, aligned, pack, packed_size

from .errors import JobFailed, RemoteError, raise_for

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("done", "failed", "cancelled")
FACTS_KEPT = 256                # reductions whose server reading a client remembers
JSON_REPLY_BYTES = 4 << 20      # most bytes of a control reply (status, validation, job list, error body)
REPLY_SLACK = 1 << 20           # an array reply's room beyond its arrays: Arrow framing and metadata
MAX_REPLY_BYTES = 1 << 30       # default cap of an array reply whose size the client cannot derive (Client(...))
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

CATEGORY_OF = {name: cat for cat, name in CATEGORY_NAMES.items()}     # 'Vi' -> 0, as the server names them


@dataclass
class Call:
    method: str
    path: str
    content: Any = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    idempotent: bool = True         # safe to repeat after a connection error once sent
    limit: int = JSON_REPLY_BYTES   # the most reply bytes the driver reads; more is refused (ReplyTooLarge)


@dataclass
class Sleep:
    seconds: float


@dataclass
class Reply:
    """What a driver hands back for a `Call`: the status, the headers (lower-case names) and the whole body."""
    status_code: int
    headers: Mapping[str, str]
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return bytes(self.content).decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


Flow = Generator["Call | Sleep", Reply, Any]


def request(call: Call, check: bool = True) -> Flow:
    """One call; an error status raises the client's exception for it (with `check`)."""
    reply = yield call
    if check:
        raise_for(reply)
    return reply


def request_json(call: Call) -> Flow:
    reply = yield from request(call)
    try:
        return reply.json()
    except ValueError:
        raise RemoteError(reply.status_code, "bad_reply", f"{call.method} {call.path} answered with no JSON body") \
            from None


def job_path(job_id, suffix: str = "") -> str:
    """The URL path of a job; ids (the server's or the caller's) are refused unless they are a plain token, so that
    an id such as '../../admin' never becomes a request."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ArgumentError(f"a job id is 1 to 128 letters, digits, '-' or '_', got {str(job_id)[:80]!r}")
    return f"/v1/jobs/{job_id}{suffix}"


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


def request_body(formula, aliases, options: dict, grad=None, ranges=None) -> dict:
    """The request body: an engine Spec (its cheap checks made here, the formula parsed by the server) and `grad`.
    `options` are the Spec's other fields (reduction_op, axis, opt_arg, formula2, dtype_acc, fast_math)."""
    spec = Spec(formula, aliases, **options, ranges=ranges is not None)
    return spec.to_json() | {"grad": None if grad is None else {"wrt": grad}}


def with_ranges(args, ranges) -> list:
    """The arrays of a request: the reduction's, then the six of `ranges` (as int64) when given."""
    if ranges is None:
        return list(args)
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 6:
        raise ArgumentError("ranges must be the pykeops 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, "
                            "slices_j, redranges_i)")
    arrays, _ = to_numpy(ranges)
    return [*args, *(np.ascontiguousarray(a, dtype=np.int64) for a in arrays)]


def decode(reply: Reply) -> tuple[dict, list[np.ndarray]]:
    try:
        meta, arrays = arrow.decode(reply.content)
    except (KredError, ValueError, OSError) as e:        # pyarrow's errors are ValueError/OSError subclasses
        raise RemoteError(reply.status_code, "bad_reply", f"the server's Arrow reply does not decode: {e}") from None
    return meta, [np.array(a) for a in arrays]          # writable copies, independent of the reply body


# Reply sizes, from the request ----------------------------------------------------------------------------

def local_facts(body: dict) -> dict | None:
    """The reading of a request that /v1/formulas/validate would give, from this process's own parse of it; None
    when it does not parse here (the server, which may be newer, is the judge of that)."""
    try:
        plan = Spec.from_fields(body).plan()
    except (KredError, TypeError, ValueError, RecursionError):
        return None
    return {"axis": plan.axis,
            "args": [{"position": a.pos, "name": a.name, "category": CATEGORY_NAMES[a.cat], "dim": a.dim}
                     for a in plan.args],
            "outputs": [{"kind": kind, "dim": width} for kind, width in plan.reduction.outputs]}


def result_bytes(facts: dict, spec: dict, arrays: list[np.ndarray]) -> int | None:
    """The bytes of a reduction's outputs, from a reading of it (`facts`): (batch x rows) x width per output, or
    the argument's size for a gradient; None when the arrays do not fit the reading (the server says why)."""
    args = facts["args"]
    try:
        if spec.get("grad") is not None:
            wrt = spec["grad"]["wrt"]
            return max(aligned(arrays[a["position"]].nbytes) for a in args if wrt in (a["position"], a["name"]))
        rows_category = "Vi" if facts["axis"] == 1 else "Vj"
        rows = 1
        for a in args:
            shape = arrays[a["position"]].shape
            if a["category"] == rows_category and rows == 1:
                rows = shape[-2] if len(shape) >= 2 else shape[0]
        leads = [leading_shape(CATEGORY_OF[a["category"]], a["dim"], arrays[a["position"]].shape) for a in args]
        count = rows * math.prod(broadcast_batch(leads, [a["name"] for a in args]))
    except (ArgumentError, IndexError, KeyError, TypeError, ValueError):
        return None
    itemsize = {"value": arrays[0].dtype.itemsize if arrays else 8, "index": 8}
    return sum(aligned(count * out["dim"] * itemsize.get(out["kind"], 8)) for out in facts["outputs"])


def reply_limit(expected: int | None, cap: int) -> int:
    """The most bytes an array reply may have: its expected outputs plus framing, or `cap` when not derivable."""
    return cap if expected is None else expected + expected // 8 + REPLY_SLACK


# The operations ---------------------------------------------------------------------------------------------

class Protocol:
    """One client's state (token, shared-memory pool, the server's readings) and its operations as flows."""

    def __init__(self, url: str, token: str | None, transport: str, max_reply_bytes: int = MAX_REPLY_BYTES):
        if transport not in ("auto", "arrow", "shm"):
            raise ValueError(f"transport must be 'auto', 'arrow' or 'shm', not {transport!r}")
        self.url, self.transport, self.max_reply_bytes = url.rstrip("/"), transport, int(max_reply_bytes)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._shared: bool | None = None if transport != "arrow" else False
        self._pool = SegmentPool()
        self._facts: dict[str, dict] = {}           # the server's reading of each reduction sent through shm

    def shared_memory(self) -> Flow:
        """Whether this client and the server see the same shared memory (asked once, with a probe segment)."""
        if self._shared is None:
            nonce = secrets.token_bytes(64)
            probe = self._pool.segment(len(nonce))
            try:
                probe.buf[HEADER:HEADER + len(nonce)] = nonce
                reply = yield from request(Call("POST", "/v1/shm/probe", json={
                    "segment": probe.name, "size": len(nonce), "key": self._pool.key}), check=False)
            finally:
                self._pool.discard(probe)
            try:
                ok = reply.status_code == 200 and reply.json().get("sha256") == hashlib.sha256(nonce).hexdigest()
            except (ValueError, AttributeError):
                ok = False
            if not ok and self.transport == "shm":
                raise RemoteError(reply.status_code, "shared_memory",
                                  "transport='shm' but the server cannot read this client's shared memory")
            self._shared = ok
        return self._shared

    def facts(self, spec: dict) -> Flow:
        """The server's reading of `spec` (arguments, categories, outputs), asked once per reduction; None when it
        refuses the spec (the request itself then reports why)."""
        plan_fields = {key: value for key, value in spec.items() if key not in ("grad", "ranges")}   # what plans read
        key = repr(sorted(plan_fields.items()))
        if key not in self._facts:
            reply = yield from request(Call("POST", "/v1/formulas/validate", json=plan_fields), check=False)
            if reply.status_code != 200:
                return None
            if len(self._facts) >= FACTS_KEPT:
                self._facts.pop(next(iter(self._facts)))
            self._facts[key] = reply.json()
        return self._facts[key]

    def expected_bytes(self, spec: dict, arrays: list[np.ndarray]) -> int | None:
        facts = local_facts(spec)
        return None if facts is None else result_bytes(facts, spec, arrays)

    def send_arrays(self, path: str, spec: dict, arrays: list[np.ndarray], idempotent: bool) -> Flow:
        """POST a request with its arrays; returns (meta, outputs)."""
        limit = reply_limit(self.expected_bytes(spec, arrays), self.max_reply_bytes)
        if (yield from self.shared_memory()):
            facts = yield from self.facts(spec)
            room = (result_bytes(facts, spec, arrays) or 0) if facts is not None else 0
            segment = self._pool.acquire(packed_size(arrays) + room)
            try:
                refs, end = pack(segment, arrays)
                body = dict(spec, arrays=refs, shm_key=self._pool.key,
                            out={"segment": segment.name, "offset": end, "size": segment.size - end})
                reply = yield from request(Call("POST", path, json=body, idempotent=idempotent, limit=limit))
                if reply.headers.get("content-type", "").startswith(arrow.CONTENT_TYPE):
                    return decode(reply)
                meta = reply.json()
                if "outputs" not in meta:                # a job: the server copied the inputs, nothing to read
                    return meta, []
                return meta, [self._output(segment, ref) for ref in meta["outputs"]]
            finally:
                self._pool.release(segment)
        body = arrow.encode(spec, arrays)
        reply = yield from request(Call("POST", path, content=memoryview(body), idempotent=idempotent, limit=limit,
                                        headers={"Content-Type": arrow.CONTENT_TYPE}))
        if reply.headers.get("content-type", "").startswith(arrow.CONTENT_TYPE):
            return decode(reply)
        return reply.json(), []

    @staticmethod
    def _output(segment, ref) -> np.ndarray:
        """An output the server wrote into this client's segment (the reference is bounds-checked there)."""
        if not isinstance(ref, dict) or ref.get("segment") != segment.name:
            raise RemoteError(200, "bad_reply", "the server's reply names an output outside this call's segment")
        try:
            return segment.array(ref["offset"], ref["dtype"], ref["shape"]).copy()
        except (KredError, KeyError, TypeError, ValueError) as e:
            raise RemoteError(200, "bad_reply", f"the server's output reference is refused: {e}") from None

    # The operations of Client and AsyncClient (client/operations.py names and documents them) ------------
    def reduce(self, formula, aliases, args, ranges=None, options=None, grad=None) -> Flow:
        spec = request_body(formula, aliases, options or {}, grad=grad, ranges=ranges)
        arrays, like = to_numpy(with_ranges(args, ranges))
        _, outputs = yield from self.send_arrays("/v1/reduce", spec, arrays, idempotent=True)
        return from_numpy(outputs, like)

    def validate(self, formula, aliases, options) -> Flow:
        return (yield from request_json(Call("POST", "/v1/formulas/validate",
                                             json=request_body(formula, aliases, options))))

    def get(self, path: str, **params) -> Flow:
        return (yield from request_json(Call("GET", path, params=params or None)))

    def jobs(self, limit: int, state: str | None) -> Flow:
        return (yield from self.get("/v1/jobs", limit=limit, **({"state": state} if state else {})))

    # Jobs ----------------------------------------------------------------------------------------------
    def submit(self, formula, aliases, args, ranges=None, options=None) -> Flow:
        """Queue a job; returns (its status, the torch tensor results are shaped like, its expected reply bytes)."""
        spec = request_body(formula, aliases, options or {}, ranges=ranges)
        arrays, like = to_numpy(with_ranges(args, ranges))
        info, _ = yield from self.send_arrays("/v1/jobs", spec, arrays, idempotent=False)
        job_path(_id_of(info))                          # the server's id is checked before anything uses it
        return info, like, self.expected_bytes(spec, arrays)

    def submit_dataset(self, formula, aliases, inputs: dict, output: str, options) -> Flow:
        spec = request_body(formula, aliases, options)
        sources = {name: {"uri": source} if isinstance(source, str) else source for name, source in inputs.items()}
        body = {k: v for k, v in spec.items() if k not in ("grad", "ranges")} | {"inputs": sources, "output": output}
        info = yield from request_json(Call("POST", "/v1/jobs", json=body, idempotent=False))
        job_path(_id_of(info))
        return info

    def job_status(self, job_id: str) -> Flow:
        info = yield from self.get(job_path(job_id))
        if not isinstance(info, dict) or not isinstance(info.get("state"), str):
            raise RemoteError(200, "bad_reply", f"job {job_id}'s status has no state")
        return info

    def job_wait(self, job_id: str, timeout: float | None, bar=None, poll: float = 0.1) -> Flow:
        """Poll until the job finishes, advancing `bar` (a tqdm bar in percent, closed at the end); TimeoutError
        after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                info = yield from self.job_status(job_id)
                if bar is not None:
                    done = info.get("progress")
                    if isinstance(done, (int, float)) and math.isfinite(done):
                        bar.update(min(max(round(100 * done), 0), 100) - bar.n)
                if info["state"] in FINISHED:
                    return info
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {info['state']} after {timeout} s")
                yield Sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def job_result(self, job_id: str, like, expected: int | None, timeout: float | None, bar=None) -> Flow:
        """Wait for the job, then its outputs; JobFailed if it failed or was cancelled."""
        info = yield from self.job_wait(job_id, timeout, bar)
        if info["state"] != "done":
            raise JobFailed(200, info["state"], str(info.get("error") or f"job {job_id} was {info['state']}"))
        reply = yield from request(Call("GET", job_path(job_id, "/result"),
                                        limit=reply_limit(expected, self.max_reply_bytes)))
        return from_numpy(decode(reply)[1], like)

    def job_cancel(self, job_id: str, wait: bool, timeout: float) -> Flow:
        """Cancel; with `wait`, until the job has really stopped."""
        info = yield from request_json(Call("DELETE", job_path(job_id)))
        return (yield from self.job_wait(job_id, timeout)) if wait else info

    def close(self) -> None:
        self._pool.close()


def _id_of(info) -> Any:
    return info.get("id") if isinstance(info, dict) else None

