"""Bearer-token authentication: when the server has a token, every /v1 route and /metrics require it (401 otherwise).
/healthz and the OpenAPI docs stay open so that probes and people can reach them.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

bearer = HTTPBearer(auto_error=False, description="the server's token, when it is started with one")


def authenticate(authorization: str | None, settings) -> str:
    """The tenant an `Authorization` header speaks for: "default" when the server has one token (or none), else a
    401 ApiError. Called by the ingress layer (service/ingress.py) from the headers alone, before any body byte."""
    token = settings.token
    if token is None:
        return "default"
    challenge = {"WWW-Authenticate": "Bearer", "Connection": "close"}
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise ApiError(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer <token>)",
                       challenge)
    if not hmac.compare_digest(credentials.strip().encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "the bearer token is not valid for this server", challenge)
    return "default"


async def require_token(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    # async (it never blocks): FastAPI would run a plain `def` dependency in a worker thread, a hop per request.
    # The ingress layer authenticated the request already; this keeps routes safe when mounted without it.
    if "tenant" not in request.scope.get("state", {}):
        request.scope.setdefault("state", {})["tenant"] = authenticate(request.headers.get("authorization"),
                                                                       request.app.state.service.settings)
