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


async def require_token(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    # async (it never blocks): FastAPI would run a plain `def` dependency in a worker thread, a hop per request
    token = request.app.state.service.settings.token
    if token is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer <token>)",
                       challenge)
    if not hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "the bearer token is not valid for this server", challenge)
