"""Every error the service answers with: a status and a JSON body `{"error": kind, "detail": message}`.

User mistakes are 4xx naming the problem (engine errors keep the engine's message). Anything unexpected is a 500
whose body says only "internal error" with a reference; the traceback goes to the server log, never to the client.
"""
from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from kred.engine.errors import BackendError, KredError

from kred.wire import WireError
from kred.wire.shm import SharedMemoryError

log = logging.getLogger("kred.service")


class Interrupted(BackendError):
    """The executor lost the run through no fault of its input (e.g. the cluster's driver process died): run it
    again once `health()` is None. Here, with the service's errors, so that the cluster driver needs no executor."""


class ApiError(HTTPException):
    """An error with its HTTP status, raised anywhere in the service. An HTTPException, so that FastAPI passes it
    through unchanged when it is raised while the body is read (it turns other exceptions there into a bare 400)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.status, self.kind = status, kind


def body(kind: str, detail: str) -> dict[str, str]:
    return {"error": kind, "detail": detail}


MAX_ERRORS = 5          # validation errors named in a reply; the rest are counted (a reply stays small)


def _validation_detail(errors) -> str:
    parts = []
    for e in errors[:MAX_ERRORS]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")[:200]
        message = str(e.get("msg"))[:300]
        parts.append(f"{where}: {message}" if where else message)
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more errors")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(body(exc.kind, exc.detail), exc.status, headers=exc.headers)

    @app.exception_handler(KredError)
    async def engine_error(request: Request, exc: KredError):
        if isinstance(exc, BackendError):        # the server's fault (a compiler or device), not the user's
            log.error("backend error: %s", exc)
            return JSONResponse(body("BackendError", str(exc)), 503)
        return JSONResponse(body(type(exc).__name__, str(exc)), 422)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(body("invalid_request", _validation_detail(exc.errors())), 422)

    @app.exception_handler(ValidationError)
    async def model_invalid(request: Request, exc: ValidationError):
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        return JSONResponse(body("invalid_request", _validation_detail(errors)), 422)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError):
        return JSONResponse(body("invalid_body", str(exc)), 400)

    @app.exception_handler(SharedMemoryError)
    async def shm_error(request: Request, exc: SharedMemoryError):
        return JSONResponse(body("shared_memory", str(exc)), 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(body(kind, str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))


class CatchAll:
    """Outermost ASGI layer: an unexpected exception becomes a 500 without a traceback (logged with a reference)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            reference = secrets.token_hex(6)
            log.exception("internal error %s on %s %s", reference, scope.get("method"), scope.get("path"))
            if started:          # headers are out: nothing sensible can be sent any more
                return
            response = JSONResponse(body("internal", f"internal server error (reference {reference})"), 500)
            await response(scope, receive, send)
