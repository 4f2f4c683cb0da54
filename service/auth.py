"""Bearer-token authentication and tenants.

A server has named tokens (`tenants`: each a tenant name, a token and optional quotas) and/or one shared token
(`token`: its holder is the tenant "default"). With neither, authentication is off and every request is "default".
`authenticate` maps an `Authorization` header to its Tenant or raises the 401; it reads no body, so the ingress
(`ingress.py`) runs it before any body byte is read and keeps the tenant in `scope["state"]["tenant"]`
(`request.state.tenant`). Jobs belong to the tenant that
made them (`job_manager.py`). Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every
configured token without stopping at a match, so the time taken says nothing about which token or how much of it.
/healthz and the OpenAPI docs stay open so that probes and people can reach them.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .settings import Settings

bearer = HTTPBearer(auto_error=False, description="the server's token (or a tenant's), when it is started with one")
DEFAULT = "default"


@dataclass(frozen=True)
class Tenant:
    name: str
    max_jobs: int | None = None             # its jobs queued or running at once (None: only the server's limits)
    max_output_bytes: int | None = None     # dataset-job output bytes of its jobs in the store


OPEN = Tenant(DEFAULT)                      # everyone, on a server without tokens


def auth_required(settings: Settings) -> bool:
    return settings.token is not None or bool(settings.tenants)


def _table(settings: Settings) -> list[tuple[bytes, Tenant]]:
    table = [(_digest(t.token.get_secret_value()), Tenant(t.name, t.max_jobs, t.max_output_bytes))
             for t in settings.tenants]
    if settings.token is not None:
        table.append((_digest(settings.token.get_secret_value()), Tenant(DEFAULT)))
    return table


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def authenticate(authorization: str | None, settings: Settings) -> Tenant:
    """The tenant an `Authorization` header value names; the 401 ApiError when it names none."""
    table = _table(settings)
    if not table:
        return OPEN
    challenge = {"WWW-Authenticate": "Bearer", "Connection": "close"}     # its body is never read
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise ApiError(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer <token>)",
                       challenge)
    offered, found = _digest(credentials), None
    for digest, tenant in table:                     # every entry compared: no early exit
        if hmac.compare_digest(digest, offered):
            found = tenant
    if found is None:
        raise ApiError(401, "unauthorized", "the bearer token is not valid for this server", challenge)
    return found


def tenant_of(request: Request) -> Tenant:
    """The request's tenant: the one the ingress stored, else authenticated here."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:
        tenant = request.state.tenant = authenticate(request.headers.get("authorization"),
                                                     request.app.state.service.settings)
    return tenant


async def require_token(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    # async (it never blocks): FastAPI would run a plain `def` dependency in a worker thread, a hop per request.
    # `credentials` only declares the scheme in the OpenAPI document; the header is read by `authenticate`.
    tenant_of(request)


async def current_tenant(request: Request) -> Tenant:
    """The dependency form of `tenant_of` (async: no thread hop)."""
    return tenant_of(request)


TenantDep = Annotated[Tenant, Depends(current_tenant)]
