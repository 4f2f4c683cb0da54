"""`AsyncClient`: `Client`'s operations (client/operations.py), every call awaited; this module only performs the
protocol's steps with an async httpx client. The deadline of a call cancels it whole (anyio's cancel scope)."""
from __future__ import annotations

import itertools
import os
import time

import anyio
import httpx

from .errors import DeadlineExceeded
from .http import NO_DELAY, CappedBody, give_up, retry_delay, send_kwargs
from .jobs import AsyncJob
from .operations import AsyncOperations
from .protocol import DEFAULT_URL, MAX_REPLY_BYTES, Call, Flow, Protocol, Reply, Sleep

__all__ = ["AsyncClient", "AsyncJob"]


class AsyncClient(AsyncOperations):
    """The async twin of `Client` (same arguments; every call is awaited)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, transport: str = "auto",
                 timeout: float = 300.0, retries: int = 3, http_transport: httpx.AsyncBaseTransport | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        token = token if token is not None else os.environ.get("KRED_TOKEN")
        self._flows = Protocol(url, token, transport, max_reply_bytes)
        self.timeout, self.retries = float(timeout), retries
        self.http = httpx.AsyncClient(base_url=self._flows.url,
                                      transport=http_transport or httpx.AsyncHTTPTransport(socket_options=NO_DELAY))

    async def _send(self, call: Call) -> Reply:
        deadline = time.monotonic() + self.timeout
        with anyio.move_on_after(self.timeout):
            for attempt in itertools.count():
                try:
                    kwargs = send_kwargs(call, self._flows.headers, self.timeout, asynchronous=True)
                    async with self.http.stream(call.method, call.path, **kwargs) as response:
                        body = CappedBody(response, call, deadline)
                        async for chunk in response.aiter_bytes():
                            body.add(chunk)
                        return body.reply()
                except httpx.TransportError as e:
                    delay = retry_delay(e, call, attempt, self.retries)
                    if delay is None or time.monotonic() + delay >= deadline:
                        give_up(e, call, self._flows.url, self.timeout, deadline)
                        raise
                    await anyio.sleep(delay)
        raise DeadlineExceeded(f"{call.method} {call.path} got no complete reply within {self.timeout} s")

    async def _run(self, flow: Flow):
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await anyio.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(await self._send(step))
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    async def _drive(self, flow: Flow, then=None):
        result = await self._run(flow)
        return result if then is None else then(result)

    async def aclose(self) -> None:
        await self.http.aclose()
        self._flows.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
