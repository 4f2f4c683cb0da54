"""What both drivers do with httpx: the request's keyword arguments, reading a reply up to its cap, the retry
policy, and the per-call deadline (httpx's timeouts are per read, so a server sending a byte a second would never
time out: the blocking driver clips every socket operation to the call's deadline, the async one cancels the call).
"""
from __future__ import annotations

import contextvars
import socket
import time

import httpcore
import httpx

from .errors import DeadlineExceeded, ReplyTooLarge, ServerUnreachable
from .protocol import Call, Reply

# Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body back until the
# server's delayed ACK of the headers (tens of ms per call).
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
CONNECT_S = 10.0

DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("kred_call_deadline", default=None)


def send_kwargs(call: Call, headers: dict, timeout: float, asynchronous: bool = False) -> dict:
    kwargs = {"headers": headers | call.headers, "params": call.params,
              "timeout": httpx.Timeout(timeout, connect=min(CONNECT_S, timeout))}
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


class CappedBody:
    """A reply read chunk by chunk, refused as soon as it passes `limit` bytes (its Content-Length first)."""

    def __init__(self, response: httpx.Response, call: Call, deadline: float):
        self.response, self.call, self.deadline = response, call, deadline
        self.chunks: list[bytes] = []
        self.size = 0
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > call.limit:
            self._refuse(f"declares {int(declared)} bytes")

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.call.limit:
            self._refuse(f"passed {self.size} bytes")
        self.chunks.append(chunk)
        if time.monotonic() > self.deadline:
            raise httpx.ReadTimeout("the call's deadline passed while reading the reply")

    def _refuse(self, what: str):
        raise ReplyTooLarge(self.response.status_code, "reply_too_large",
                            f"{self.call.method} {self.call.path}: the reply {what}, more than the {self.call.limit} "
                            "this call can need (Client(max_reply_bytes=...) when the client cannot size it)")

    def reply(self) -> Reply:
        return Reply(self.response.status_code, self.response.headers, b"".join(self.chunks),
                     self.response.reason_phrase)


def retry_delay(error: Exception, call: Call, attempt: int, retries: int) -> float | None:
    """Seconds to wait before repeating `call` after the transport `error`, or None to give up. Only what cannot
    have been done twice is repeated: a connection never made, or an idempotent call cut short."""
    if attempt >= retries or isinstance(error, httpx.TimeoutException):   # a timeout: the server may still compute
        return None
    if isinstance(error, httpx.ConnectError) or (
            call.idempotent and isinstance(error, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))):
        return 0.1 * 2 ** attempt
    return None


def give_up(error: httpx.TransportError, call: Call, url: str, timeout: float, deadline: float) -> None:
    """The client's own error for a call past its deadline or a server that never answered; other transport errors
    (a read cut short) stay httpx's, since the server may have done the work."""
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(f"{call.method} {call.path} got no complete reply within {timeout} s") from error
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        raise ServerUnreachable(url, str(error) or type(error).__name__) from error


# The blocking driver's deadline: every socket operation's timeout is clipped to what is left of the call --------

def _left(timeout: float | None, error) -> float:
    deadline = DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def blocking_transport() -> httpx.HTTPTransport:
    """httpx's transport with TCP_NODELAY and the deadline on every socket operation (httpx has no public hook for
    a network backend: the pool's is wrapped; tests/test_client_untrusted.py holds this against a slow server)."""
    transport = httpx.HTTPTransport(socket_options=NO_DELAY)
    pool = transport._pool
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport
