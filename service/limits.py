"""Admission limits: what a request may ask of the server. Each check raises an ApiError naming the limit."""
from __future__ import annotations

import anyio
import numpy as np

from kred.engine.plan import Plan

from .errors import ApiError
from kred.engine.spec import Spec
from .settings import Settings


def check_text(spec: Spec, settings: Settings) -> None:
    """Before parsing: the sizes of the texts."""
    for name, text in (("formula", spec.formula), ("formula2", spec.formula2)):
        if text is not None and len(text) > settings.max_formula_chars:
            raise ApiError(422, "limit", f"{name} is {len(text)} characters long; this server accepts at most "
                                         f"{settings.max_formula_chars} (max_formula_chars)")


def check_plan(plan: Plan, settings: Settings) -> None:
    """After parsing (and differentiating): nesting, size and dimensions of the formula as it will run."""
    for formula in (plan.formula, plan.formula2):
        if formula is None:
            continue
        nodes = formula.postorder()
        if len(nodes) > settings.max_formula_nodes:
            raise ApiError(422, "limit", f"the formula has {len(nodes)} distinct nodes; this server accepts at most "
                                         f"{settings.max_formula_nodes} (max_formula_nodes)")
        depth: dict[int, int] = {}
        for node in nodes:
            depth[id(node)] = 1 + max((depth[id(c)] for c in node.children), default=0)
            if node.dim > settings.max_dim:
                raise ApiError(422, "limit", f"the formula has a term of dimension {node.dim}; this server accepts "
                                             f"at most {settings.max_dim} (max_dim)")
        if depth[id(formula)] > settings.max_formula_depth:
            raise ApiError(422, "limit", f"the formula nests {depth[id(formula)]} levels deep; this server accepts "
                                         f"at most {settings.max_formula_depth} (max_formula_depth)")
    if plan.out_dim > settings.max_dim:
        raise ApiError(422, "limit", f"the output has dimension {plan.out_dim}; this server accepts at most "
                                     f"{settings.max_dim} (max_dim)")


def check_pairs(rows: int, cols: int, limit: float, where: str) -> None:
    if rows * cols > limit:
        hint = "; submit it as a job (POST /v1/jobs)" if where == "max_pairs_per_request" else ""
        raise ApiError(422, "limit", f"N x M = {rows} x {cols} = {rows * cols:.3g} pairs exceeds this server's "
                                     f"limit of {limit:.3g} ({where}){hint}")


def check_finite(names: list[str], arrays: list[np.ndarray]) -> None:
    """NaN or infinite inputs are refused. One pass: a NaN or an infinity anywhere makes the sum non-finite; only
    then (or when a sum of huge finite values overflows) are the values looked at one by one."""
    for name, array in zip(names, arrays):
        if array.size and array.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.sum(array)):
                    continue
            if np.isnan(array).any():
                raise ApiError(422, "ArgumentError", f"{name} contains NaN; inputs must be finite")
            if np.isinf(array).any():
                raise ApiError(422, "ArgumentError", f"{name} contains an infinite value; inputs must be finite")


class Bodies:
    """Bytes of request bodies (and shared-memory inputs) the server holds at once, over all requests: counted as
    they arrive, given back when the request ends. Past `limit`, a request gets 429 (413 when it alone is larger)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int, held: int) -> None:
        """Count `n` more bytes for a request that holds `held` already (called on the event loop)."""
        if held + n > self.limit:
            raise ApiError(413, "limit", f"the request needs {held + n} bytes or more; this server holds at most "
                                         f"{self.limit} bytes of bodies at once (max_inflight_bytes)")
        if self.used + n > self.limit:
            raise ApiError(429, "too_busy", f"the server holds {self.used} bytes of other requests' bodies, its limit "
                                            f"is {self.limit} (max_inflight_bytes); retry later", {"Retry-After": "1"})
        self.used += n


class Held:
    """One request's share of `Bodies` (in its ASGI scope under `HELD`, so the transports can add to it)."""

    def __init__(self, bodies: Bodies):
        self.bodies, self.bytes = bodies, 0

    def take(self, n: int) -> None:
        self.bodies.take(n, self.bytes)
        self.bytes += n

    def release(self) -> None:
        self.bodies.used -= self.bytes
        self.bytes = 0


HELD = "kred.held"


class BodyLimit:
    """ASGI layer over every request body: larger than `limit` bytes is a 413 (by its Content-Length or as it
    streams); bytes count against the server-wide `bodies` budget as they arrive (never as announced); a client that
    sends nothing for `timeout` seconds in the middle of a body gets 408."""

    def __init__(self, app, limit: int, bodies: Bodies, timeout: float):
        self.app, self.limit, self.bodies, self.timeout = app, limit, bodies, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, int(length))
        held = scope[HELD] = Held(self.bodies)
        more = True

        async def counting_receive():
            nonlocal more
            if not more:                        # the body is complete: what follows is only a disconnect
                return await receive()
            try:
                with anyio.fail_after(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "timeout", f"the request body stalled: nothing arrived for {self.timeout} s "
                                               "(body_timeout_s)") from None
            if message["type"] == "http.request":
                more = message.get("more_body", False)
                size = len(message.get("body", b""))
                if held.bytes + size > self.limit:
                    raise ApiError(413, "limit", self._detail(held.bytes + size))
                held.take(size)
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            held.release()

    def _detail(self, size: int) -> str:
        return f"the request body is {size} bytes or more; this server accepts at most {self.limit} (max_body_bytes)"

    async def _refuse(self, scope, receive, send, size):
        from fastapi.responses import JSONResponse

        from .errors import body
        await JSONResponse(body("limit", self._detail(size)), 413)(scope, receive, send)
