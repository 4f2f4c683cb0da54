"""Errors the client raises. A server's engine error comes back as the same engine exception type (FormulaError,
ArgumentError, ...) with the server's message, so `except FormulaError` works locally and remotely alike."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kred.engine import errors as engine_errors

if TYPE_CHECKING:
    import httpx


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


def raise_for(response: "httpx.Response") -> None:
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
