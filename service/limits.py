"""Admission limits: what a request may ask of the server. Each check raises an ApiError naming the limit."""
from __future__ import annotations

from dataclasses import dataclass

import anyio
import numpy as np

from kred.engine.formula import I, J
from kred.engine.plan import Plan
from kred.engine.ranges import check_ranges
from kred.wire.arrow import CONTENT_TYPE

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


@dataclass(frozen=True)
class Budget:
    """What one request (or job) will take, known before any work: the admission budget `admit` checks."""
    input_bytes: int
    output_bytes: int
    pairs: float                  # (i, j) pairs reduced: N x M x batch items, or what `ranges` visit
    work: float                   # pairs x distinct nodes of the formula(s)
    items: int = 1                # batch items (each is a reduction of its own)


def formula_size(plan: Plan) -> int:
    return sum(len(f.postorder()) for f in (plan.formula, plan.formula2) if f is not None)


def budget(plan: Plan, rows: int, cols: int, items: int = 1, input_bytes: int = 0, itemsize: int = 8,
           pairs: float | None = None, output_widths: list[tuple[str, int]] | None = None) -> Budget:
    """The budget of `plan` on `rows` x `cols` (as the plan orients them) over `items` batch items. `pairs`: the
    pairs actually reduced when they are not all of them (`ranges_pairs`); `output_widths`: (kind, width) of each
    output when they are not the reduction's (a gradient's)."""
    widths = output_widths if output_widths is not None else plan.reduction.outputs
    output = sum(rows * width * items * (8 if kind == "index" else itemsize) for kind, width in widths)
    pairs = float(rows) * cols * items if pairs is None else float(pairs) * items
    return Budget(int(input_bytes), int(output), pairs, pairs * max(1, formula_size(plan)), items)


def input_bytes(plan: Plan, rows: int, cols: int, itemsize: int = 8) -> int:
    """The bytes of a plan's arguments at `rows` x `cols` (a dataset job's inputs, from its metadata)."""
    count = {I: rows, J: cols}
    return sum(count.get(arg.cat, 1) * arg.dim * itemsize for arg in plan.args)


def ranges_pairs(ranges, axis: int, rows: int, cols: int) -> float:
    """The pairs a `ranges` 6-tuple makes a reduction visit: each cluster's rows times the columns of each range it
    lists, overlaps and repeats counted (the engine reduces each listed range)."""
    clusters, slices, reduced = check_ranges(ranges, axis, rows, cols)
    lengths = np.concatenate([[0.0], np.cumsum(reduced[:, 1] - reduced[:, 0], dtype=np.float64)])
    ends = slices.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    return float(np.sum((clusters[:, 1] - clusters[:, 0]).astype(np.float64) * (lengths[ends] - lengths[starts])))


def admit(b: Budget, settings: Settings, scope: str = "request") -> None:
    """Refuse what is past this server's limits for a `scope` ("request": POST /v1/reduce, "job": POST /v1/jobs,
    dataset jobs included): 413 for bytes, 422 for work, each naming its setting."""
    job = scope == "job"
    checks = [
        (b.items, settings.max_batch_items, "max_batch_items", 422, "batch items"),
        (b.input_bytes, settings.max_input_bytes_per_job if job else settings.max_body_bytes,
         "max_input_bytes_per_job" if job else "max_body_bytes", 413, "bytes of inputs"),
        (b.output_bytes, settings.max_output_bytes_per_job if job else settings.max_output_bytes_per_request,
         f"max_output_bytes_per_{scope}", 413, "bytes of outputs"),
        (b.pairs, settings.max_pairs_per_job if job else settings.max_pairs_per_request,
         f"max_pairs_per_{scope}", 422, "pairs (N x M x batch items, or those ranges visit)"),
        (b.work, settings.max_work_per_job if job else settings.max_work_per_request,
         f"max_work_per_{scope}", 422, "pair-terms (pairs x formula nodes)"),
    ]
    for value, limit, name, status, what in checks:
        if value > limit:
            hint = "; submit it as a job (POST /v1/jobs)" if not job and status == 422 and name != "max_batch_items" \
                else ""
            raise ApiError(status, "limit", f"this {scope} needs {value:.4g} {what}; this server's limit is "
                                            f"{limit:.4g} ({name}){hint}")


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
    they arrive, given back when the request ends. Past `limit`, a request gets 429 (413 when it alone is larger);
    past `share` for its tenant (all of its requests together), 429 too: one tenant cannot take every other's room."""

    def __init__(self, limit: int, share: int | None = None):
        self.limit, self.share, self.used = limit, min(limit, share or limit), 0
        self.tenants: dict[str, int] = {}

    def take(self, n: int, held: int, tenant: str = "default") -> None:
        """Count `n` more bytes for a request of `tenant` that holds `held` already (called on the event loop)."""
        if held + n > self.share:
            raise ApiError(413, "limit", f"the request needs {held + n} bytes or more; this server holds at most "
                                         f"{self.share} bytes of one tenant's bodies at once (max_inflight_bytes, "
                                         "max_inflight_bytes_per_tenant)", CLOSE)
        if self.used + n > self.limit:
            raise ApiError(429, "too_busy", f"the server holds {self.used} bytes of other requests' bodies, its limit "
                                            f"is {self.limit} (max_inflight_bytes); retry later",
                           {"Retry-After": "1"} | CLOSE)
        mine = self.tenants.get(tenant, 0)
        if mine + n > self.share:
            raise ApiError(429, "too_busy", f"this tenant's requests hold {mine} bytes of bodies; its share is "
                                            f"{self.share} (max_inflight_bytes_per_tenant); retry later",
                           {"Retry-After": "1"} | CLOSE)
        self.used += n
        self.tenants[tenant] = mine + n

    def give_back(self, n: int, tenant: str) -> None:
        self.used -= n
        left = self.tenants.pop(tenant, 0) - n
        if left > 0:
            self.tenants[tenant] = left


class Held:
    """One request's share of `Bodies` (in its ASGI scope under `HELD`, so the transports can add to it)."""

    def __init__(self, bodies: Bodies, tenant: str = "default"):
        self.bodies, self.tenant, self.bytes = bodies, tenant, 0

    def take(self, n: int) -> None:
        self.bodies.take(n, self.bytes, self.tenant)
        self.bytes += n

    def release(self) -> None:
        self.bodies.give_back(self.bytes, self.tenant)
        self.bytes = 0


HELD = "kred.held"


class BodyLimit:
    """ASGI layer over every request body: larger than `limit` bytes (`json_limit` for any body that is not an Arrow
    stream: JSON holds no bulk data) is a 413, by its Content-Length or as it streams; bytes count against the
    server-wide `bodies` budget as they arrive (never as announced); a body must arrive within `timeout` seconds in
    all plus one second per `rate` bytes received (a total deadline: dripping a byte at a time does not extend it),
    else 408. Refusals close the connection, so that the rest of the body is not waited for."""

    def __init__(self, app, limit: int, bodies: Bodies, timeout: float, json_limit: int | None = None,
                 rate: float = float("inf")):
        self.app, self.limit, self.bodies, self.timeout = app, limit, bodies, timeout
        self.json_limit, self.rate = json_limit if json_limit is not None else limit, rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = self.limit if kind == ARROW else min(self.limit, self.json_limit)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(scope, receive, send, int(length), limit)
        held = scope[HELD] = Held(self.bodies, scope.get("state", {}).get("tenant", "default"))
        more, began = True, anyio.current_time()

        async def counting_receive():
            nonlocal more
            if not more:                        # the body is complete: what follows is only a disconnect
                return await receive()
            try:
                with anyio.fail_at(began + self.timeout + held.bytes / self.rate):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "timeout", f"the request body did not arrive within {self.timeout} s plus 1 s "
                                               f"per {self.rate:.0f} bytes (body_timeout_s, min_body_bytes_per_s)",
                               CLOSE) from None
            if message["type"] == "http.request":
                more = message.get("more_body", False)
                size = len(message.get("body", b""))
                if held.bytes + size > limit:
                    raise ApiError(413, "limit", self._detail(held.bytes + size, limit), CLOSE)
                held.take(size)
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            held.release()

    def _detail(self, size: int, limit: int) -> str:
        name = "max_body_bytes" if limit == self.limit else "max_json_bytes; arrays travel as Arrow streams"
        return f"the request body is {size} bytes or more; this server accepts at most {limit} ({name})"

    async def _refuse(self, scope, receive, send, size, limit):
        from fastapi.responses import JSONResponse

        from .errors import body
        await JSONResponse(body("limit", self._detail(size, limit)), 413, headers=CLOSE)(scope, receive, send)


ARROW = CONTENT_TYPE.encode()
CLOSE = {"Connection": "close"}
