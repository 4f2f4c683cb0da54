"""Errors the client raises. A server's engine error comes back as the same engine exception type (FormulaError,
ArgumentError, ...) with the server's message, so `except FormulaError` works locally and remotely alike."""
from __future__ import annotations

from kred.engine import errors as engine_errors


class RemoteError(Exception):
    """The server answered with an error status: `status`, `kind` (its short name) and `detail`."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


class ServerUnreachable(ConnectionError):
    """No kred server answers at `url` (refused, unknown host, timed out connecting), after the client's retries."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot reach a kred server at {url}: {reason}")
        self.url, self.reason = url, reason


class Unauthorized(RemoteError):
    """401: the server needs a (different) bearer token."""


class TooBusy(RemoteError):
    """429: the server's job queue is full; retry later."""


class LimitExceeded(RemoteError):
    """413 or 422 with kind "limit": the request asks more than the server allows."""


ENGINE = {cls.__name__: cls for cls in (engine_errors.FormulaError, engine_errors.DimensionError,
                                        engine_errors.ArgumentError, engine_errors.BackendError)}


def raise_for(response) -> None:
    """Raise the client's exception for an error status (`response`: a protocol Reply or an httpx.Response)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
        kind, detail = str(body["error"]), str(body["detail"])
    except (ValueError, KeyError, TypeError):
        kind, detail = "http_error", response.text[:500] or response.reason_phrase
    status = response.status_code
    if kind in ENGINE:
        error = ENGINE[kind](detail)
        error.status = status
        raise error
    if status == 401:
        raise Unauthorized(status, kind, detail)
    if status == 429:
        raise TooBusy(status, kind, detail)
    if status == 413 or kind == "limit":
        raise LimitExceeded(status, kind, detail)
    raise RemoteError(status, kind, detail)


class ReplyTooLarge(RemoteError):
    """The server's reply is larger than this call can need (its expected outputs, else `max_reply_bytes`): it was
    not read past the cap."""


class DeadlineExceeded(TimeoutError):
    """One HTTP call (connecting, sending, the whole reply, retries included) took longer than the client's
    `timeout`; the server may still be working on it."""


class JobFailed(RemoteError):
    """The job ended `failed` (detail: the server's message) or `cancelled`."""
