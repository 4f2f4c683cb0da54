"""Reading a request's arrays from its transport, and replying through the same one.

- Arrow: the body is an Arrow IPC stream (request JSON in its schema metadata, arrays as columns); so is the reply.
- Shared memory: the body is the request JSON whose `arrays` name slices of the client's segments (headed by the key
  in `shm_key`); they are copied into the server's memory (never mapped: see kred.wire.shm). The reply is JSON saying
  where in the client's `out` room the outputs were written, or an Arrow reply when they do not fit.
"""
from __future__ import annotations

import math

import anyio
import numpy as np
import pydantic_core
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kred.wire import arrow
from kred.wire.arrow import check_shape
from .errors import ApiError
from .limits import HELD
from .schemas import MAX_JSON_NUMBERS, DatasetJobRequest, ReduceRequest, SharedResult
from .settings import Settings
from kred.wire.shm import HEADER, ClientSegments

JSON = "application/json"


async def read_request(request: Request, settings: Settings, datasets: bool = False
                       ) -> tuple[ReduceRequest, list[np.ndarray], ClientSegments | None]:
    """`datasets`: a JSON body with an `output` field is a DatasetJobRequest (it has no arrays)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request)
    if datasets and kind == JSON:          # parsed once, then validated as the model its fields call for
        data = parse_json(body)
        del body
        if isinstance(data, dict) and "output" in data:
            return DatasetJobRequest.model_validate(data), [], None
        spec = ReduceRequest.model_validate(data)
        return (spec, *await _read_shared(request, spec, settings))
    if kind == arrow.CONTENT_TYPE:
        meta, arrays = arrow.decode(body)
        spec = ReduceRequest.model_validate(meta)
        if spec.arrays is not None or spec.out is not None:
            raise ApiError(422, "invalid_request", "an Arrow request carries its arrays as columns; "
                                                   "'arrays' and 'out' belong to shared-memory requests")
        return spec, arrays, None
    if kind == JSON:
        spec = validate_json(ReduceRequest, body)
        return (spec, *await _read_shared(request, spec, settings))
    raise ApiError(415, "unsupported_media_type", f"send {arrow.CONTENT_TYPE} (arrays in an Arrow stream) or "
                                                  f"{JSON} (arrays in shared memory), not {kind or 'no content type'}")


async def _read_shared(request: Request, spec: ReduceRequest, settings: Settings
                       ) -> tuple[list[np.ndarray], ClientSegments]:
    """The arrays a JSON request names in the client's shared memory, and its segments; the output room is checked
    here too, before any work (a foreign or impossible room is refused up front)."""
    if spec.arrays is None:
        raise ApiError(422, "invalid_request", "a JSON request must name its arrays in shared memory ('arrays'); "
                                               f"send arrays in an Arrow stream ({arrow.CONTENT_TYPE}) otherwise")
    if not settings.allow_shm:
        raise ApiError(422, "shared_memory", "this server does not accept shared-memory requests (allow_shm)")
    segments = ClientSegments(spec.shm_key)
    held = request.scope.get(HELD)
    try:
        size = shared_bytes(spec, settings)
        if held is not None:          # the server's copies count against the same budget as bodies
            held.take(size)
        arrays = await anyio.to_thread.run_sync(lambda: [segments.read(a.model_dump()) for a in spec.arrays])
        check_room(spec, segments)
        return arrays, segments
    except BaseException:
        segments.close()
        raise


# Values (numbers, strings, keys, containers) a JSON body may hold: the inline numbers of a dataset job and room for
# the rest. Each value may cost a validation error, and pydantic keeps every error: counting them first bounds that.
MAX_JSON_VALUES = MAX_JSON_NUMBERS + 16_384


def check_json_size(body) -> None:
    """Before parsing: at most MAX_JSON_VALUES values. Every value but the first of a container follows a ',' or a
    ':', so these and the openings bound the count from above (cheap, in C, with no parse)."""
    count = sum(body.count(c) for c in (b",", b":", b"[", b"{")) + 1
    if count > MAX_JSON_VALUES:
        raise ApiError(422, "limit", f"the JSON body holds up to {count} values; this server accepts at most "
                                     f"{MAX_JSON_VALUES} (arrays travel as Arrow streams or in shared memory)")


def parse_json(body) -> object:
    """A JSON body parsed once (pydantic's parser; its nesting is bounded); a 422 naming the error otherwise."""
    check_json_size(body)
    try:
        return pydantic_core.from_json(body)
    except ValueError as e:
        raise ApiError(422, "invalid_request", f"the body is not valid JSON: {str(e)[:200]}") from None


def validate_json(model, body):
    """`model` read from a JSON body in one pass, within MAX_JSON_VALUES."""
    check_json_size(body)
    return model.model_validate_json(body)


def check_room(spec: ReduceRequest, segments: ClientSegments) -> None:
    """The output room a shared-memory request names: in a segment of the client's (its key heads it), past the
    header and inside the segment. (A room too small for the result is not an error: the reply is Arrow then.)"""
    if spec.out is None:
        return
    size = segments.size(spec.out.segment)        # opens it and checks its key
    if spec.out.offset < HEADER or spec.out.offset + spec.out.size > size:
        raise ApiError(422, "shared_memory", f"the output room [{spec.out.offset}, {spec.out.offset + spec.out.size})"
                                             f" is not inside segment {spec.out.segment} past its header "
                                             f"([{HEADER}, {size}))")


async def read_body(request: Request) -> bytearray:
    """The body, appended to one buffer as it arrives: memory follows the bytes received, never the Content-Length
    announced (a large bytearray grows in place through realloc/mremap; joining chunks, as `request.body()` does,
    would hold a large body twice). Size, stalls and the server-wide budget are policed by `limits.BodyLimit`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def shared_bytes(spec: ReduceRequest, settings: Settings) -> int:
    """What copying the arrays a shared-memory request names will take (8 bytes a value at most), within the same
    size limit as a body."""
    total = sum(math.prod(check_shape(a.shape, f"segment {a.segment}")) * 8 for a in spec.arrays)
    if total > settings.max_body_bytes:
        raise ApiError(413, "limit", f"the arrays named in shared memory hold up to {total} bytes; this server "
                                     f"accepts at most {settings.max_body_bytes} (max_body_bytes)")
    return total


def write_shared(spec: ReduceRequest, segments: ClientSegments | None, outputs: list[np.ndarray]):
    """Write outputs into the client's room (blocking); their refs, or None to reply with Arrow."""
    if segments is None or spec.out is None:
        return None
    return segments.write(spec.out.model_dump(), outputs)


def reply(meta: dict, outputs: list[np.ndarray], refs) -> Response:
    if refs is not None:
        result = SharedResult(outputs=refs, names=meta["names"], timings=meta["timings"])
        return JSONResponse(result.model_dump())
    return Response(memoryview(arrow.encode(meta, outputs)), media_type=arrow.CONTENT_TYPE)
