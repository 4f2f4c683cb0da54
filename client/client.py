"""`Client`: kred reductions on a server, numpy (or torch) in, numpy (or torch) out, blocking.

    c = Client("http://127.0.0.1:8000", token=...)        # transport="auto": shared memory on the same host
    a = c.reduce("Exp(-SqDist(x,y))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], x, y, b, axis=1)
    op = c.Genred(formula, aliases, reduction_op="Sum", axis=1); a = op(x, y, b)
    job = c.submit(formula, aliases, x, y, b, axis=1); a = job.result(progress=True)

The protocol is written once, sans-IO (client/protocol.py); the operations once (client/operations.py); this
module only performs the steps with a blocking httpx client (aio.py is the async driver). httpx transports are
injectable, so tests run the client against the app in-process (httpx.ASGITransport) as well as over a socket.

Retries: calls that are safe to repeat (reads, reductions, validation) are retried on connection errors with
backoff; submitting a job is retried only when the connection was never made. `timeout` bounds each call whole
(connecting, sending, the reply, retries), and a reply is read only up to what the call can need.
"""
from __future__ import annotations

import itertools
import os
import time

import httpx

from .aio import (  # (as this module held them before the protocol was split out)
    AsyncClient,
    AsyncJob,
)
from .errors import JobFailed
from .http import (
    DEADLINE,
    CappedBody,
    blocking_transport,
    give_up,
    retry_delay,
    send_kwargs,
)
from .jobs import Job
from .operations import Operations, RemoteGenred
from .protocol import DEFAULT_URL, MAX_REPLY_BYTES, Call, Flow, Protocol, Reply, Sleep

__all__ = ["DEFAULT_URL", "AsyncClient", "AsyncJob", "Call", "Client", "Job", "JobFailed", "RemoteGenred"]


class Client(Operations):
    """A kred server. `token` defaults to $KRED_TOKEN; `http_transport` is any httpx transport (tests pass the app's
    ASGI transport); `transport` chooses how arrays travel: "auto" (shared memory when the server can read this
    client's memory, else Arrow), "arrow" or "shm". `timeout` (s) bounds each HTTP call whole; an array reply is
    capped at its expected size, or `max_reply_bytes` when that cannot be derived from the request."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, transport: str = "auto",
                 timeout: float = 300.0, retries: int = 3, http_transport: httpx.BaseTransport | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        token = token if token is not None else os.environ.get("KRED_TOKEN")
        self._flows = Protocol(url, token, transport, max_reply_bytes)
        self.timeout, self.retries = float(timeout), retries
        self.http = httpx.Client(base_url=self._flows.url, transport=http_transport or blocking_transport())

    def _send(self, call: Call) -> Reply:
        deadline = time.monotonic() + self.timeout
        token = DEADLINE.set(deadline)
        try:
            for attempt in itertools.count():
                try:
                    kwargs = send_kwargs(call, self._flows.headers, self.timeout)
                    with self.http.stream(call.method, call.path, **kwargs) as response:
                        body = CappedBody(response, call, deadline)
                        for chunk in response.iter_bytes():
                            body.add(chunk)
                        return body.reply()
                except httpx.TransportError as e:
                    delay = retry_delay(e, call, attempt, self.retries)
                    if delay is None or time.monotonic() + delay >= deadline:
                        give_up(e, call, self._flows.url, self.timeout, deadline)
                        raise
                    time.sleep(delay)
        finally:
            DEADLINE.reset(token)

    def _drive(self, flow: Flow, then=None):
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(self._send(step))
        except StopIteration as stop:
            return stop.value if then is None else then(stop.value)
        finally:
            flow.close()

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
