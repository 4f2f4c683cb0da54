"""The front door: who may send a body, and how long a connection may take to say what it wants.

- `Ingress` (ASGI): authenticates a protected route from its headers alone (`auth.authenticate`) before any body
  byte is read or counted, and puts the tenant in `scope["state"]["tenant"]`. An unauthenticated request gets its
  401 with `Connection: close`: its body is never read, never held against the server-wide body budget.
- `guarded(protocol)` (uvicorn): a connection must finish a request's headers within `header_timeout_s` of opening
  (or of its previous reply), in total however slowly it drips; past `max_connections` (or
  `max_connections_per_client` from one address) a new connection closes the oldest one that has no request in
  progress, or is itself closed when every one is busy. So half-open connections cannot exhaust descriptors and an
  authorised client always gets a connection.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from .auth import authenticate
from .errors import ApiError, body
from .settings import Settings

PROTECTED = ("/v1/", "/metrics")


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED[0]) or path == PROTECTED[1] or path.startswith(PROTECTED[1] + "/")


class Ingress:
    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        header = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            tenant = authenticate(header, self.settings)
        except ApiError as e:        # answered without reading the body
            return await JSONResponse(body(e.kind, e.detail), e.status, headers=e.headers)(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def guarded(base, settings: Settings):
    """A subclass of uvicorn's HTTP protocol class `base` with the header deadline and the connection caps."""

    class Guarded(base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._arm()
            self._enforce_caps()

        def on_response_complete(self):
            super().on_response_complete()
            self._idle_since = self.loop.time()
            self._arm()

        def _busy(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self):
            self.loop.call_later(settings.header_timeout_s, self._check_headers)

        def _check_headers(self):
            if self.transport.is_closing() or self._busy():
                return                      # a request in progress: its body has its own deadline (BodyLimit)
            if self.loop.time() - self._idle_since >= settings.header_timeout_s - 1e-3:
                self.transport.close()      # headers not finished (or idle) for header_timeout_s in all
            else:
                self.loop.call_later(self._idle_since + settings.header_timeout_s - self.loop.time(),
                                     self._check_headers)

        def _enforce_caps(self):
            host = self.client[0] if self.client else None
            mine = [c for c in self.connections if c is not self and not c.transport.is_closing()]
            same = [c for c in mine if c.client and c.client[0] == host]
            for group, cap in ((same, settings.max_connections_per_client), (mine, settings.max_connections)):
                if len(group) + 1 <= cap:
                    continue
                idle = [c for c in group if not getattr(c, "_busy", lambda: True)()]
                if not idle:
                    self.transport.close()  # every connection is working: this one waits for a free place
                    return
                oldest = min(idle, key=lambda c: getattr(c, "_idle_since", 0.0))
                oldest.transport.close()
                group.remove(oldest)
                if group is same:
                    mine.remove(oldest)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
